"""Each image has what its pods run, and no more: the pods' own commands (as the
operator builds them from defaulted resources, and as the chart renders them) run in
processes that can import only the distributions the image's build file installs
(tests/images/closure.py). A round goes through that way: the bootstrap Job publishes
round 0's base, the training Job trains and uploads, the aggregator Job merges."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tapestry_operator.builders import (
    build_aggregator_job,
    build_bootstrap_job,
    build_training_job,
)
from tapestry_operator.config import FederationConfig, ParticipantConfig, RoundConfig
from tapestry_protocol import pod
from tapestry_protocol.documents import CloseTrigger, Outcome
from tapestry_protocol.exchange import (
    COORDINATOR,
    close_round,
    make_plan,
    publish_plan,
    read_model,
    read_result,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store.filesystem import FilesystemStore
from tests.images import closure, images
from tests.operator import crd_defaults

Obj = dict[str, Any]
VENV_BIN = Path(sys.executable).parent
# The commands a pod may start with, as the image's PATH resolves them (its venv first).
PROGRAMS = {"python": sys.executable, "tapestry": str(VENV_BIN / "tapestry")}
# What each image must be able to import, whole (the CLI only where it runs there).
OPERATOR_PACKAGES = [
    "tapestry_protocol", "tapestry_lifecycle", "tapestry_aggregator", "tapestry_operator",
    "tapestry_telemetry", "tapestry_cli.main", "tapestry_cli.inspect",
]  # fmt: skip
TRAINER_PACKAGES = ["tapestry_protocol", "tapestry_trainer"]


@dataclass(frozen=True)
class Image:
    name: str
    env: dict[str, str]  # a restricted environment: only this image's distributions
    hidden: Path  # the modules it was refused, one a line


@pytest.fixture(scope="module")
def operator_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return _image("operator", tmp_path_factory.mktemp("operator-image"))


@pytest.fixture(scope="module")
def trainer_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return _image("trainer", tmp_path_factory.mktemp("trainer-image"))


def _image(name: str, scratch: Path) -> Image:
    env = closure.restricted_environment(name, images.extras_of(name), scratch)
    return Image(name, env, scratch / "hidden-imports.txt")


def run_in(
    image: Image, argv: list[str], cwd: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    program = PROGRAMS[argv[0]]  # a command the image's PATH would not resolve fails here
    done = subprocess.run(
        [program, *argv[1:]], env={**image.env, **env}, cwd=cwd, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    return done


def _explain(image: Image, done: subprocess.CompletedProcess[str]) -> str:
    hidden = image.hidden.read_text().split() if image.hidden.exists() else []
    return (
        f"{image.name} image: exit {done.returncode}; modules it lacks that were asked "
        f"for: {sorted(set(hidden))}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    )


# --- the mechanism -------------------------------------------------------------------


def test_the_operator_image_has_no_torch_and_the_trainer_image_no_kopf(
    operator_image: Image, trainer_image: Image, tmp_path: Path
) -> None:
    code = "import importlib.util as u, sys; print(*(bool(u.find_spec(m)) for m in sys.argv[1:]))"
    modules = ["torch", "kopf", "kubernetes", "numpy", "pytest"]
    seen = {}
    for image in (operator_image, trainer_image):
        done = run_in(image, ["python", "-c", code, *modules], tmp_path)
        assert done.returncode == 0, _explain(image, done)
        seen[image.name] = dict(zip(modules, done.stdout.split(), strict=True))
    assert seen["operator"] == {
        "torch": "False", "kopf": "True", "kubernetes": "True", "numpy": "True", "pytest": "False",
    }  # fmt: skip
    assert seen["trainer"] == {
        "torch": "True", "kopf": "False", "kubernetes": "False", "numpy": "True", "pytest": "False",
    }  # fmt: skip
    done = run_in(operator_image, ["python", "-c", "import torch"], tmp_path)
    assert done.returncode == 1 and "No module named 'torch'" in done.stderr


def _import_all_script(names: list[str]) -> str:
    """A script importing every module of each package (or the module) that exists."""
    return (
        "import importlib, importlib.util, pkgutil, sys\n"
        f"for name in {names!r}:\n"
        "    if importlib.util.find_spec(name.partition('.')[0]) is None:\n"
        "        print('absent', name); continue\n"
        "    module = importlib.import_module(name)\n"
        "    for info in pkgutil.walk_packages(getattr(module, '__path__', []), name + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "    print('imported', name)\n"
    )


def test_the_operator_image_imports_everything_it_runs(
    operator_image: Image, tmp_path: Path
) -> None:
    done = run_in(operator_image, ["python", "-c", _import_all_script(OPERATOR_PACKAGES)], tmp_path)
    assert done.returncode == 0, _explain(operator_image, done)
    imported = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("imported")}
    assert imported >= set(OPERATOR_PACKAGES) - {"tapestry_telemetry"}, done.stdout


@pytest.mark.torch
def test_the_trainer_image_imports_everything_it_runs(trainer_image: Image, tmp_path: Path) -> None:
    done = run_in(trainer_image, ["python", "-c", _import_all_script(TRAINER_PACKAGES)], tmp_path)
    assert done.returncode == 0, _explain(trainer_image, done)
    assert done.stdout.split() == [w for n in TRAINER_PACKAGES for w in ("imported", n)]


def test_the_operator_runs_in_its_image(operator_image: Image, tmp_path: Path) -> None:
    entrypoint = images.dockerfile("operator").final.exec_form("ENTRYPOINT")
    assert entrypoint is not None
    done = run_in(operator_image, [*entrypoint, "--help"], tmp_path)
    assert done.returncode == 0, _explain(operator_image, done)
    assert done.stdout.startswith("usage: python -m tapestry_operator")


# --- a round through the pods' commands ----------------------------------------------


@dataclass
class Cluster:
    """What the pods of one namespace mount, as local folders."""

    root: Path
    store: FilesystemStore
    coordinator: SigningKey
    member: SigningKey
    federation: FederationConfig
    federation_body: Obj
    round_body: Obj
    participant: ParticipantConfig
    participant_body: Obj

    def mounts(self, key: SigningKey) -> dict[str, Path]:
        """Pod path -> local folder: the signing key Secret, the data PVC, the work dir."""
        keys = self.root / "secrets" / key.key_id
        if not keys.exists():
            keys.mkdir(parents=True)
            (keys / "signing.key").write_bytes(key.private_pem())
        return {
            pod.SIGNING_KEY_DIR: keys,
            pod.DATA_MOUNT: self.root / "data",
            pod.WORK_MOUNT: self.root / "work" / key.key_id,
        }

    def localise(self, value: str, key: SigningKey) -> str:
        """A pod's argument or environment value with its mounts and store made local."""
        if value == self.federation.store.pod_url():
            return str(self.root / "store")
        for mount, folder in self.mounts(key).items():
            if value == mount or value.startswith(mount + "/"):
                folder.mkdir(parents=True, exist_ok=True)
                return str(folder) + value[len(mount) :]
        return value


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    """A Federation, its round 0 and one Participant, defaulted as the API server
    stores them, the store a local folder, member `alpha` the only one."""
    coordinator = SigningKey.generate(COORDINATOR)
    member = SigningKey.generate("alpha")
    federation_body = crd_defaults.federation(
        members=[{"name": "alpha", "publicKey": member.public_key_text}]
    )
    round_body = crd_defaults.federation_round(round=0)
    participant_body = crd_defaults.participant(
        compute={"resources": {}}, coordinatorPublicKey=coordinator.public_key_text
    )
    store = FilesystemStore(tmp_path / "store", create=True)
    return Cluster(
        tmp_path, store, coordinator, member,
        FederationConfig.from_body(federation_body), federation_body, round_body,
        ParticipantConfig.from_body(participant_body), participant_body,
    )  # fmt: skip


def container_of(job: Obj) -> Obj:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    found: Obj = container
    return found


def run_job(cluster: Cluster, job: Obj, key: SigningKey) -> str:
    """Run the Job's container as its image would: its command and environment with
    the mounts made local, importing only what its image installs; its output, or a
    failure naming the image and the modules it lacked."""
    container = container_of(job)
    image_name = images.image_of(container["image"])
    image = _image(image_name, cluster.root / f"{image_name}-image")
    env = {e["name"]: cluster.localise(e["value"], key) for e in container["env"] if "value" in e}
    argv = [cluster.localise(a, key) for a in container["command"]]
    done = run_in(image, argv, cluster.root, **env)
    assert done.returncode == 0, f"{job['metadata']['name']}, {_explain(image, done)}"
    return done.stdout


@pytest.mark.torch
@pytest.mark.slow
def test_a_round_runs_through_the_pods_commands_in_their_images(cluster: Cluster) -> None:
    layout = Layout(cluster.federation.name)
    # the coordinator's bootstrap Job: round 0's base, in the trainer image
    bootstrap = build_bootstrap_job(cluster.federation, cluster.federation_body)
    assert images.image_of(container_of(bootstrap)["image"]) == "trainer"
    run_job(cluster, bootstrap, cluster.coordinator)
    key = cluster.coordinator.public_key_text
    base = read_model(cluster.store, layout, layout.base_manifest(0), key)

    # the coordinator's operator publishes the plan (small: a few steps of the preset)
    from tapestry_trainer.specs import InnerConfig

    config = InnerConfig(steps=2, lr=1e-2, batch_size=2, seq_len=32, warmup_steps=1)
    hyperparameters = config.to_dict()
    plan = make_plan(
        layout, 0, base, model=base.document.model, hyperparameters=hyperparameters,
        participants={"alpha": cluster.member.public_key_text}, min_participants=1,
        deadline="2100-01-01T00:00:00Z",
    )  # fmt: skip
    plan_doc = publish_plan(cluster.store, layout, plan, cluster.coordinator)
    _write_data(cluster.root / "data")

    # the participant's training Job, in the trainer image
    training = build_training_job(cluster.participant, 0, cluster.participant_body)
    assert images.image_of(container_of(training)["image"]) == "trainer"
    run_job(cluster, training, cluster.member)
    assert cluster.store.exists(layout.update_manifest(0, "alpha"))

    # the coordinator closes the round; its aggregator Job merges it, in the operator image
    close_round(
        cluster.store, layout, plan_doc, cluster.coordinator, CloseTrigger.ALL_REPORTED,
        datetime.now(UTC),
    )  # fmt: skip
    aggregator = build_aggregator_job(
        cluster.federation, RoundConfig.from_body(cluster.round_body), cluster.round_body
    )
    assert images.image_of(container_of(aggregator)["image"]) == "operator"
    run_job(cluster, aggregator, cluster.coordinator)
    result = read_result(cluster.store, layout, 0, key)
    assert result.document.outcome == Outcome.SUCCEEDED
    assert [a.participant for a in result.document.accepted] == ["alpha"]


def _write_data(folder: Path) -> None:
    """The participant's data PVC: prepared token shards of some real prose."""
    from tapestry_trainer.data import prepare_shards
    from tests.e2e.texts import write_corpora

    texts = write_corpora(folder.parent / "texts", {"alpha": ["json", "argparse", "pathlib"]})
    prepare_shards([texts / "alpha"], folder)


# --- what the chart runs in the operator image ------------------------------------------


def _chart_containers() -> Iterator[tuple[str, Obj]]:
    from tests.tools import run_helm

    rendered = run_helm(
        "template", "tapestry", str(images.ROOT / "charts" / "tapestry"), "--namespace",
        "tapestry", "--set", "role=coordinator", "--set", "minio.enabled=true",
    ).stdout  # fmt: skip
    for document in yaml.safe_load_all(rendered):
        if not isinstance(document, dict):
            continue
        spec = document.get("spec", {})
        template = spec.get("template", spec.get("jobTemplate", {}).get("spec", {}).get("template"))
        for container in (template or {}).get("spec", {}).get("containers", []):
            yield f"{document['kind']}/{document['metadata']['name']}", container


@pytest.mark.tools
def test_the_charts_containers_run_in_the_operator_image(
    operator_image: Image, tmp_path: Path
) -> None:
    ours = [(w, c) for w, c in _chart_containers() if "tapestry-" in c["image"]]
    assert {images.image_of(c["image"]) for _, c in ours} == {"operator"}, ours
    assert len(ours) >= 2, ours  # the operator and the MinIO bucket Job
    for workload, container in ours:
        command = container["command"]
        if command[:2] == ["python", "-m"]:  # the operator: its flags are parsed
            assert command == images.dockerfile("operator").final.exec_form("ENTRYPOINT")
            args = [a for a in container.get("args", []) if not a.startswith("--namespace")]
            argv = [*command, *args, "--help"]
            done = run_in(operator_image, argv, tmp_path)
            assert done.returncode == 0, f"{workload}: {_explain(operator_image, done)}"
        else:
            assert command[:2] == ["python", "-c"], f"{workload}: {command}"
            tree = ast.parse(command[2])
            modules = sorted(
                {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
                | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            )
            code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
            done = run_in(operator_image, ["python", "-c", code, *modules], tmp_path)
            assert done.returncode == 0, (
                f"{workload} imports {modules}: {_explain(operator_image, done)}"
            )
