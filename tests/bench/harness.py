"""Running a benchmark script's `--quick` mode as CI does: a smoke test of the harness,
never a timing assertion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HEADER = {"benchmark", "quick", "date", "commit", "command", "machine"}


def run_quick(script: str, out: Path, *args: str, timeout: float = 600) -> dict[str, Any]:
    """Run `bench/<script> --quick --out OUT ARGS...` and return its JSON result, failing
    with the script's output tail if it exits non-zero or leaves no result."""
    command = [sys.executable, str(ROOT / "bench" / script), "--quick", "--out", str(out), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.read_text())
    assert set(report) >= HEADER, sorted(report)
    assert report["quick"] is True
    return report
