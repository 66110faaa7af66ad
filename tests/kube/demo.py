"""`make kube-demo`: Tapestry on Kubernetes without a cluster of your own.

Brings up the test control plane (etcd, kube-apiserver, kube-controller-manager and
the node agent, built from their Go modules) and a MinIO server, installs the CRDs,
starts the operator, applies `examples/single-cluster/` with fresh keys (the same
deployment the end-to-end tests use), and shows `kubectl get federationrounds` until
round 0 has succeeded. Then it prints how to poke at it with kubectl and keeps
everything running until Ctrl-C.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.kube.cluster import KubeCluster, ensure_binaries
from tests.kube.deployment import Setup, deploy
from tests.kube.tapestry_env import EXAMPLE, kubectl
from tests.s3servers import start_minio


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="tapestry-kube-demo-"))
    print(f"working directory {work} (cluster and operator logs are here)", flush=True)
    print("starting the control plane and MinIO...", flush=True)
    cluster = KubeCluster(ensure_binaries(sys.stderr), work / "cluster")
    cluster.start()
    minio = start_minio(work / "minio")
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        setup = Setup(bucket="tapestry", isolated=False, fast=False)
        with deploy(cluster, minio, work, setup) as demo:
            print("operator started; examples/single-cluster/ applied", flush=True)
            phase = ""
            while not stopping and phase not in ("Succeeded", "Failed"):
                table = kubectl(
                    demo.kubeconfig, "-n", demo.coordinator_ns, "get", "federationrounds"
                )
                print(f"\n$ kubectl get federationrounds -n {demo.coordinator_ns}\n{table}", end="")
                rows = table.splitlines()[1:]
                phase = rows[0].split()[3] if rows and len(rows[0].split()) > 3 else ""
                time.sleep(5)
            print(
                f"""
round 0 {phase.lower() or "is still running"}. Poke at it with kubectl:

  export KUBECONFIG={demo.kubeconfig}
  kubectl get tapestry -A                                  # every Tapestry object
  kubectl get federationrounds -n tapestry-coordinator -o wide
  kubectl describe federationround demo-round-0 -n tapestry-coordinator
  kubectl get participants -A; kubectl get jobs,pods -A
  kubectl apply -f {EXAMPLE / "next" / "round-1.yaml"}

The store is MinIO at {minio.endpoint}; the operator log is {work / "operator.log"}.
Ctrl-C stops everything.""",
                flush=True,
            )
            while not stopping:
                time.sleep(0.5)
    finally:
        minio.stop()
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
