"""Real Go-built tools for tests: the helm CLI, kstatus, the Prometheus server.

`tests/testbin/build-tools.sh` builds each from a wrapper module under
`tests/testbin/tools/` that pins it, caches the binaries under
`~/.cache/tapestry/testbin/tools-*/`, and honours `TAPESTRY_TOOLS_ASSETS=<dir>` (use
prebuilt binaries). The first call here builds what it needs (minutes, once; `make
testbin` does it ahead of time); later calls find the cache in well under a second.

Mark every test that uses anything here `@pytest.mark.tools`, so `make test-fast` (which
runs no Go build) leaves it out.

- `helm_binary()`, `run_helm(*args, kubeconfig=...)`: helm with private config, cache and
  data directories, so a test never reads or writes the user's helm setup or cluster.
- `kstatus(objects)`: sigs.k8s.io/cli-utils' `status.Compute` on each object, as Flux and
  kpt judge health ("Current", "InProgress", "Failed", "Terminating", "NotFound",
  "Unknown").
- `Prometheus(scrape_targets, scrape_interval="1s")`: the real Prometheus server (no web
  UI, file and HTTP service discovery only) on a free 127.0.0.1 port with a throwaway
  TSDB and the OTLP receiver on; a context manager:

      with Prometheus(["127.0.0.1:9464"]) as prom:
          exporter = OTLPMetricExporter(endpoint=prom.otlp_metrics_endpoint)
          ...
          series = prom.wait_for_series('tapestry_rounds_total{job="coordinator"}')
          value = float(series[0]["value"][1])

  Scraped targets get `job="scrape"` unless `add_targets(..., job=...)` says otherwise.

How OTLP metrics are stored (Prometheus's default `UnderscoreEscapingWithSuffixes`
translation; tests/test_tools.py shows each case):

- name: dots and other invalid characters become `_`; the unit is appended as a word
  (`By` -> `_bytes`, `s` -> `_seconds`, `ms` -> `_milliseconds`; `1` -> `_ratio` on a
  gauge and nothing on a counter; annotations such as `{retry}` -> nothing) unless the
  name already ends with it; counters (monotonic sums) then get `_total`, up-down
  counters do not. A counter `tapestry.upload.size` in `By` is
  `tapestry_upload_size_bytes_total`; a histogram `tapestry.round.duration` in `s` is
  `tapestry_round_duration_seconds_bucket` (with `le`), `..._sum` and `..._count`.
- attributes: labels with `.` -> `_` (`tapestry.phase` -> `tapestry_phase`).
- resource: `service.name` (prefixed `service.namespace/` when set) is `job`,
  `service.instance.id` is `instance`; every other resource attribute goes to the
  `target_info` series of that job/instance, not onto each series.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time as _time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.kube.proc import die_with_parent
from tests.ports import free_port
from tests.testbin.build import run_build

REPO = Path(__file__).resolve().parent.parent


class ToolError(RuntimeError):
    """A tool could not be built, or it rejected its input; the message says why."""


_built: dict[str, Path] = {}
_build_lock = threading.Lock()


TOOLS = ("helm", "kstatus", "prometheus")


def tool_path(name: str) -> Path:
    """The binary of one tool ("helm", "kstatus", "prometheus"), built if not cached."""
    if name not in _built:
        ensure_tools(name)
    return _built[name]


def ensure_tools(*names: str) -> Path:
    """Builds (or finds) the named tools, all of them by default, in one run of the
    script; returns their directory. A session hook can call this before the first test,
    so that a cold build (minutes) does not count against a test's timeout."""
    wanted = names or TOOLS
    with _build_lock:
        directory = _build(*wanted)
        for name in wanted:
            _built[name] = directory / name
        return directory


def _build(*names: str) -> Path:
    """Runs build-tools.sh, copying its progress to stderr (a cold build takes minutes
    and should not look like a hang)."""
    return run_build(
        "build-tools.sh",
        *names,
        progress=sys.stderr,
        error=ToolError,
        hint="It needs Go >= 1.26.7 and the Go module proxy"
        " (or TAPESTRY_TOOLS_ASSETS=<dir with prebuilt binaries>).",
    )


# -- helm ------------------------------------------------------------------------------


class HelmError(subprocess.CalledProcessError):
    """helm exited non-zero; unlike CalledProcessError, str() includes helm's output
    (`helm lint` reports its findings on stdout, other errors go to stderr)."""

    def __str__(self) -> str:
        output = "\n".join(part.strip() for part in (self.stdout, self.stderr) if part)
        return f"{super().__str__()}\n{output[-4000:]}".rstrip()


def helm_binary() -> str:
    """The pinned helm CLI (v3, `helm version` reports the pin)."""
    return str(tool_path("helm"))


_helm_home: Path | None = None


def _helm_env(kubeconfig: Path | None) -> dict[str, str]:
    """helm's environment: private XDG-style dirs, and no cluster unless one is given
    (an empty kubeconfig, so the user's ~/.kube/config is never used)."""
    global _helm_home
    if _helm_home is None:
        _helm_home = Path(tempfile.mkdtemp(prefix="tapestry-helm-"))
        atexit.register(shutil.rmtree, _helm_home, True)
        (_helm_home / "empty-kubeconfig").write_text("")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("HELM_") and key != "KUBECONFIG"
    }
    env.update(
        HELM_CACHE_HOME=str(_helm_home / "cache"),
        HELM_CONFIG_HOME=str(_helm_home / "config"),
        HELM_DATA_HOME=str(_helm_home / "data"),
        KUBECONFIG=str(kubeconfig or _helm_home / "empty-kubeconfig"),
    )
    return env


def run_helm(
    *args: str,
    kubeconfig: Path | None = None,
    check: bool = True,
    input: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """`helm *args`, output captured as text; raises HelmError (with stderr) on a non-zero
    exit when `check`. Without `kubeconfig` helm sees no cluster at all."""
    argv = [helm_binary(), *args]
    result = subprocess.run(
        argv,
        env=_helm_env(kubeconfig),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise HelmError(result.returncode, argv, result.stdout, result.stderr)
    return result


# -- kstatus ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KStatus:
    """kstatus's verdict on one object: its status string and human-readable message."""

    status: str
    message: str


def kstatus(objects: list[dict[str, Any]]) -> list[KStatus]:
    """`status.Compute` of sigs.k8s.io/cli-utils on each object (as the API server returns
    them), in order. Raises ToolError when kstatus rejects an object."""
    binary = tool_path("kstatus")
    result = subprocess.run(
        [str(binary)], input=json.dumps(objects), capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise ToolError(f"kstatus failed (exit {result.returncode}): {result.stderr.strip()}")
    return [KStatus(item["status"], item["message"]) for item in json.loads(result.stdout)]


# -- Prometheus ------------------------------------------------------------------------


class PrometheusError(RuntimeError):
    """Prometheus refused a query (the message is its own) or did not start or answer."""


class Prometheus:
    """The real Prometheus server, for scrape and OTLP tests; see the module docstring.

    Targets are read through file service discovery, so `add_targets` takes effect
    without a restart. Out-of-order samples are accepted for 10 minutes, so an OTLP
    push of an older point is stored rather than dropped.
    """

    START_TIMEOUT = 60.0

    def __init__(
        self,
        scrape_targets: Iterable[str] = (),
        scrape_interval: str = "1s",
        *,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.scrape_interval = scrape_interval
        self.extra_args = list(extra_args)
        self.workdir = Path(tempfile.mkdtemp(prefix="tapestry-prometheus-"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._groups: list[dict[str, Any]] = []
        if scrape_targets:
            self.add_targets(scrape_targets)
        else:
            self._write_targets()

    # The addresses -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The server's base URL, e.g. http://127.0.0.1:40123."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def otlp_endpoint(self) -> str:
        """The OTLP/HTTP base (`OTEL_EXPORTER_OTLP_ENDPOINT`): exporters append
        /v1/metrics. Prometheus takes metrics only; a trace exporter pointed here gets 404."""
        return f"{self.url}/api/v1/otlp"

    @property
    def otlp_metrics_endpoint(self) -> str:
        """The full URL for an OTLP/HTTP metric exporter's `endpoint=`
        (`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`)."""
        return f"{self.otlp_endpoint}/v1/metrics"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    # Targets ---------------------------------------------------------------------------

    def add_targets(
        self, targets: Iterable[str], job: str = "scrape", labels: dict[str, str] | None = None
    ) -> None:
        """Scrape `targets` ("host:port", or a URL for another scheme or path than
        http and /metrics) as `job`, with extra target `labels`; picked up within a
        second or two, no restart."""
        for target in targets:
            group_labels = {"job": job, **(labels or {})}
            if "://" in target:
                parsed = urllib.parse.urlsplit(target)
                address = parsed.netloc
                group_labels["__scheme__"] = parsed.scheme
                group_labels["__metrics_path__"] = parsed.path or "/metrics"
            else:
                address = target
            self._groups.append({"targets": [address], "labels": group_labels})
        self._write_targets()

    def _write_targets(self) -> None:
        """Replace the file-SD file atomically: Prometheus must never read half of it."""
        path = self.workdir / "targets.json"
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(self._groups, indent=1))
        partial.replace(path)

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their health and last error (/api/v1/targets)."""
        data = self._api("/api/v1/targets", {"state": "active"})
        return list(data["activeTargets"])

    # Lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def start(self) -> None:
        """Start the server and wait until it is ready; a lost port race is retried."""
        binary = tool_path("prometheus")
        config = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "storage": {"tsdb": {"out_of_order_time_window": "10m"}},
            "scrape_configs": [
                {
                    "job_name": "scrape",
                    "file_sd_configs": [
                        {"files": [str(self.workdir / "targets.json")], "refresh_interval": "1s"}
                    ],
                }
            ],
        }
        (self.workdir / "prometheus.yml").write_text(json.dumps(config, indent=1))
        for _attempt in range(3):
            self.port = free_port()
            argv = [
                str(binary),
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-otlp-receiver",
                "--log.level=info",
                *self.extra_args,
            ]
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [*die_with_parent(), *argv],
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_ready():
                return
            if "address already in use" not in self.log_tail():
                break
        raise PrometheusError(
            f"Prometheus did not start (exit status {self.proc and self.proc.poll()});"
            f" log tail:\n{self.log_tail()}"
        )

    def _wait_ready(self) -> bool:
        deadline = _time.monotonic() + self.START_TIMEOUT
        assert self.proc is not None
        while _time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            _time.sleep(0.1)
        self.stop()
        return False

    def stop(self) -> None:
        """Terminate the server (SIGKILL after 10 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # Queries ---------------------------------------------------------------------------

    def _api(self, path: str, params: dict[str, str]) -> Any:
        """GET an API path; returns `data`, raises PrometheusError with Prometheus's
        own `errorType: error` when it refuses."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.load(response)
        except urllib.error.HTTPError as err:
            try:
                body = json.load(err)
            except ValueError:
                raise PrometheusError(f"GET {path}: HTTP {err.code} {err.reason}") from err
        except urllib.error.URLError as err:
            raise PrometheusError(
                f"GET {path}: {err.reason}; log tail:\n{self.log_tail()}"
            ) from err
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, time: float | None = None) -> list[dict[str, Any]]:
        """An instant query: the result's series, each {"metric": {...}, "value": [ts, "v"]}
        (a scalar or string result comes back as one series with no labels)."""
        params = {"query": expr}
        if time is not None:
            params["time"] = f"{time:.3f}"
        data = self._api("/api/v1/query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """A range query: each series as {"metric": {...}, "values": [[ts, "v"], ...]}."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": str(step)}
        return list(self._api("/api/v1/query_range", params)["result"])

    def wait_for_series(self, expr: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Poll `query(expr)` until it returns a series; on timeout raise with the scrape
        targets' health and the server's log tail."""
        deadline = _time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if _time.monotonic() > deadline:
                targets = [
                    {k: t.get(k) for k in ("scrapeUrl", "health", "lastError")}
                    for t in self.targets()
                ]
                raise PrometheusError(
                    f"no series for {expr!r} within {timeout:.0f}s; targets: {targets};"
                    f" log tail:\n{self.log_tail(10)}"
                )
            _time.sleep(0.2)
