"""Runs one of the build scripts beside this file and returns the directory it built.

Every script (build-kube.sh, build-tools.sh, build-kueue.sh, build-minio.sh) is
idempotent, honours its TAPESTRY_*_ASSETS override, writes progress to stderr and prints
the directory as its last stdout line. A cold build takes minutes, so its progress is
copied through as it comes instead of looking like a hang.
"""

from __future__ import annotations

import subprocess
from collections import deque
from pathlib import Path
from typing import TextIO

HERE = Path(__file__).resolve().parent


def run_build(
    script: str,
    *args: str,
    progress: TextIO | None = None,
    error: type[Exception] = RuntimeError,
    hint: str = "",
) -> Path:
    """Runs `tests/testbin/<script> <args>`; raises `error` with `hint` and the script's
    last 40 lines of progress when it fails."""
    path = HERE / script
    proc = subprocess.Popen(
        ["bash", str(path), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None and proc.stdout is not None
    tail: deque[str] = deque(maxlen=40)
    for line in proc.stderr:
        tail.append(line)
        if progress is not None:
            progress.write(line)
            progress.flush()
    out = proc.stdout.read().strip().splitlines()
    if proc.wait() != 0 or not out:
        command = " ".join([script, *args])
        raise error(
            f"{command} failed (exit {proc.returncode}); {hint}"
            f"{' ' if hint else ''}Its last output:\n" + "".join(tail)
        )
    return Path(out[-1])
