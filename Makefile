# Tapestry developer entry points. `make setup demo` and `make test` are all a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup testbin test test-fast fuzz demo kube-demo operator bench lint fmt clean

## setup: virtualenv with the project (editable) and every dev/test dependency
setup: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

## testbin: build the real servers the tests run (MinIO, etcd, kube-apiserver, ...); cached
testbin:
	bash tests/testbin/build-minio.sh >/dev/null
	bash tests/testbin/build-kube.sh >/dev/null
	bash tests/testbin/build-tools.sh >/dev/null
	bash tests/testbin/build-kueue.sh >/dev/null

## test: every test, against real MinIO, SeaweedFS and a real Kubernetes control plane
test: setup testbin
	$(PY) -m pytest

## test-fast: every test that needs no server and no network (torch tests included)
test-fast: setup
	$(PY) -m pytest -m "not s3 and not kube and not network and not tools"

## fuzz: the property-based tests with a long budget (many more examples per property)
fuzz: setup
	TAPESTRY_FUZZ_EXAMPLES=20000 $(PY) -m pytest tests/protocol/test_reader_fuzz.py tests/aggregator/test_fuzz_round.py

## demo: a 3-participant federation on this machine, ending in the evaluation table
demo: setup
	$(VENV)/bin/tapestry local run --fresh

## kube-demo: the single-cluster example on a real control plane and MinIO, built here
kube-demo: setup testbin
	$(PY) -m tests.kube.demo

## operator: run the operator (both roles) against the current kubeconfig
operator: setup
	$(PY) -m tapestry_operator --role both --log-format text

## bench: aggregation (streaming vs plain read vs load-everything, scale-out over K parts), transfer, operator scale, the case for joining, compressed deltas, trainer throughput, cluster start, attacks x robust policies, the cost of differential privacy; results in bench/results/ (bench/gpu.sh: the GPU benchmark, on a GPU machine)
bench: setup testbin
	$(PY) bench/aggregate.py --out bench/results/aggregate.json
	$(PY) bench/cluster_start.py --out bench/results/cluster-start.json
	$(PY) bench/robust.py --out bench/results/robust.json
	$(PY) bench/privacy.py --out bench/results/privacy.json
	$(PY) bench/scaleout.py --out bench/results/scaleout.json
	$(PY) bench/transfer.py --out bench/results/transfer.json
	$(PY) bench/operator_scale.py --members 50 100 200 --out bench/results/operator-scale.json
	$(PY) -m pip install --quiet -e '.[docs]'
	$(PY) bench/joining.py --out bench/results/joining.json --plot docs/images/joining.png
	$(PY) bench/compression.py --out bench/results/compression.json
	$(PY) bench/trainer.py --out bench/results/trainer.json

## dashboards: regenerate the Grafana dashboards; draw docs/images/dashboard-*.png from a demo
.PHONY: dashboards
dashboards: setup testbin
	$(PY) -m pip install --quiet -e '.[docs]'
	$(PY) -m tests.dashboards.generate
	$(PY) -m tests.dashboards.render

## lint: ruff and mypy, as CI would
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
