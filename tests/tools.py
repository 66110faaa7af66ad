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
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUILD_TOOLS = REPO / "tests" / "testbin" / "build-tools.sh"


class ToolError(RuntimeError):
    """A tool could not be built, or it rejected its input; the message says why."""


_built: dict[str, Path] = {}
_build_lock = threading.Lock()


def tool_path(name: str) -> Path:
    """The binary of one tool ("helm", "kstatus", "prometheus"), built if not cached."""
    with _build_lock:
        if name not in _built:
            _built[name] = _build(name) / name
        return _built[name]


def _build(name: str) -> Path:
    """Runs build-tools.sh for one tool, copying its progress to stderr (a cold build takes
    minutes and should not look like a hang)."""
    proc = subprocess.Popen(
        ["bash", str(BUILD_TOOLS), name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    tail: deque[str] = deque(maxlen=40)
    for line in proc.stderr:
        tail.append(line)
        sys.stderr.write(line)
        sys.stderr.flush()
    out = proc.stdout.read().strip().splitlines()
    if proc.wait() != 0 or not out:
        raise ToolError(
            f"{BUILD_TOOLS} {name} failed (exit {proc.returncode}); it needs Go >= 1.26 and"
            " the Go module proxy (or TAPESTRY_TOOLS_ASSETS=<dir with prebuilt binaries>)."
            " Its last output:\n" + "".join(tail)
        )
    return Path(out[-1])


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
