"""Process helpers shared by the cluster launcher and the node agent."""

from __future__ import annotations

import shutil


def die_with_parent() -> list[str]:
    """An argv prefix that SIGKILLs the child when the thread that spawned it dies.

    Without it a crashed test session would leave etcd, the API server or pod
    processes running. setpriv (util-linux) sets PR_SET_PDEATHSIG and execs, so
    no preexec_fn runs in a threaded parent.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
