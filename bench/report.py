"""What every benchmark result records besides its figures: when, where, from which
commit and command, so a number in docs/benchmarks.md can be traced and re-run."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The short commit the benchmark ran at (`unknown` outside a git checkout)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=ROOT)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def machine() -> dict[str, Any]:
    """CPU count, memory, platform and the load when the run started (the development
    machine is shared, so the load says how much to trust a single figure)."""
    pages = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpus": os.cpu_count(),
        "memoryGiB": round(pages / 2**30),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load": round(os.getloadavg()[0], 2),
    }


def proc_status_kib(key: str, pid: int | str = "self") -> int:
    """A `/proc/<pid>/status` figure in KiB (VmHWM, VmRSS), 0 when absent. Peak RSS is
    read as VmHWM, not ru_maxrss: Linux carries that over from the parent through fork
    and exec, so a child would report its parent's peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0


def proc_cpu_s(pid: int | str = "self") -> float:
    """A process's CPU seconds so far, user + system, from `/proc/<pid>/stat`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def header(benchmark: str, quick: bool, script: str) -> dict[str, Any]:
    """The fields every result starts with."""
    return {
        "benchmark": benchmark,
        "quick": quick,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit(),
        "command": " ".join(["python", f"bench/{script}", *sys.argv[1:]]),
        "machine": machine(),
    }


def write(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", flush=True)
