"""`python -m tapestry_trainer.launch`: the training pod's command.

It runs torchrun over `tapestry_trainer.participant` and turns the outcome into the pod
contract's exit code. torchrun reports any failed worker as exit status 1, so the
participant's rank 0 writes why it stopped to a verdict file, and this launcher exits
with that code (a permanent refusal is not retried) and writes the message to the
container's termination log, where the operator reads it.

One node: `torchrun --standalone` (no rendezvous port to collide on). Several nodes:
torchrun reads the Kubeflow-style `PET_NNODES`, `PET_NPROC_PER_NODE`, `PET_NODE_RANK`
(the Job completion index), `PET_MASTER_ADDR` and `PET_MASTER_PORT` variables.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from tapestry_protocol import pod
from tapestry_protocol.pod import ExitCode


def torchrun_command(environ: dict[str, str], extra: Sequence[str]) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run"]
    if int(environ.get("PET_NNODES", "1")) <= 1:
        command += ["--standalone", f"--nproc-per-node={environ.get('PET_NPROC_PER_NODE', '1')}"]
    return [*command, "-m", "tapestry_trainer.participant", *extra]


def child_environment(environ: dict[str, str]) -> dict[str, str]:
    """One node needs no rendezvous variables; torchrun would try to use them."""
    if int(environ.get("PET_NNODES", "1")) <= 1:
        return {k: v for k, v in environ.items() if not k.startswith("PET_")}
    return dict(environ)


def read_verdict(path: Path, returncode: int) -> tuple[int, str]:
    """The exit code and message rank 0 left, or a crash when it left none."""
    try:
        verdict = json.loads(path.read_text())
        code = int(verdict["exitCode"])
        message = str(verdict["message"])
        if code in {int(c) for c in ExitCode} and code != 0:
            return code, message
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return int(ExitCode.CRASH), f"training exited with status {returncode}"


def main(argv: Sequence[str] | None = None) -> int:
    environ = dict(os.environ)
    workdir = Path(environ.get(pod.WORKDIR, "/tmp/tapestry"))
    verdict = Path(environ.get(pod.VERDICT) or workdir / "verdict.json")
    environ[pod.VERDICT] = str(verdict)
    verdict.unlink(missing_ok=True)
    child = subprocess.Popen(
        torchrun_command(environ, list(argv if argv is not None else sys.argv[1:])),
        env=child_environment(environ),
    )

    def forward(signum: int, _: FrameType | None) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    returncode = child.wait()
    if returncode == 0:
        return 0
    code, message = read_verdict(verdict, returncode)
    print(f"tapestry launch: {message}", file=sys.stderr, flush=True)
    if Path(pod.TERMINATION_LOG).exists():  # only inside a pod: never create it
        with contextlib.suppress(OSError):
            Path(pod.TERMINATION_LOG).write_text(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
