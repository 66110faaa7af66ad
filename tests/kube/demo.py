"""`make kube-demo`: Tapestry on Kubernetes without a cluster of your own.

Brings up the test control plane (etcd, kube-apiserver, kube-controller-manager and
the node agent, built from their Go modules) and a MinIO server, installs the CRDs,
starts the operator, applies `examples/single-cluster/` with fresh keys, and shows
`kubectl get federationrounds` until round 0 has succeeded. Then it prints how to poke
at it with kubectl and keeps everything running until Ctrl-C.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

from tapestry_protocol.store import open_store
from tapestry_trainer.data import prepare_shards
from tests.e2e.texts import write_corpora
from tests.kube.cluster import KubeCluster, ensure_binaries
from tests.kube.tapestry_env import (
    COORDINATOR_SECRET,
    EXAMPLE,
    SIGNING_SECRET,
    Keys,
    OperatorProcess,
    data_volume,
    install_crds,
    kubectl,
    load_yaml,
    render_example,
    signing_secret,
    store_secret,
)
from tests.s3servers import start_minio

MEMBERS = ("de", "es", "it")
CORPORA = {
    "de": ["json", "csv", "argparse", "logging"],
    "es": ["asyncio", "collections", "itertools", "functools"],
    "it": ["pathlib", "dataclasses", "typing", "inspect"],
}


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="tapestry-kube-demo-"))
    print(f"working directory {work} (cluster and operator logs are here)", flush=True)
    print("starting the control plane and MinIO...", flush=True)
    cluster = KubeCluster(ensure_binaries(sys.stderr), work / "cluster")
    cluster.start()
    minio = start_minio(work / "minio")
    operator: OperatorProcess | None = None
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        client, kubeconfig = cluster.client(), cluster.kubeconfig
        open_store(minio.url_for("tapestry"), create=True)
        install_crds(kubeconfig)
        keys = Keys.generate(MEMBERS)
        docs = render_example(load_yaml(sorted(EXAMPLE.glob("*.yaml"))), keys, minio.endpoint)
        for doc in (d for d in docs if d["kind"] == "Namespace"):
            client.apply(doc)
        client.apply(store_secret("tapestry-coordinator", minio))
        client.apply(signing_secret("tapestry-coordinator", COORDINATOR_SECRET, keys.coordinator))
        corpora = write_corpora(work / "corpora", CORPORA)
        for member in MEMBERS:
            ns = f"tapestry-{member}"
            shards = work / "data" / member
            prepare_shards([corpora / member], shards, val_fraction=0.1)
            client.apply(store_secret(ns, minio))
            client.apply(signing_secret(ns, SIGNING_SECRET, keys.members[member]))
            for obj in data_volume(ns, shards):
                client.apply(obj)
        operator = OperatorProcess(kubeconfig, work / "operator.log").start()
        print("operator started; applying examples/single-cluster/", flush=True)
        for doc in (d for d in docs if d["kind"] != "Namespace"):
            client.apply(doc)
        phase = ""
        while not stopping and phase not in ("Succeeded", "Failed"):
            table = kubectl(kubeconfig, "-n", "tapestry-coordinator", "get", "federationrounds")
            print(f"\n$ kubectl get federationrounds -n tapestry-coordinator\n{table}", end="")
            rows = table.splitlines()[1:]
            phase = rows[0].split()[3] if rows and len(rows[0].split()) > 3 else ""
            time.sleep(5)
        print(
            f"""
round 0 {phase.lower() or "is still running"}. Poke at it with kubectl:

  export KUBECONFIG={kubeconfig}
  kubectl get tapestry -A                                  # every Tapestry object
  kubectl get federationrounds -n tapestry-coordinator -o wide
  kubectl describe federationround demo-round-0 -n tapestry-coordinator
  kubectl get participants -A; kubectl get jobs,pods -A
  kubectl apply -f {EXAMPLE / "next" / "round-1.yaml"} -n tapestry-coordinator

The store is MinIO at {minio.endpoint}; the operator log is {work / "operator.log"}.
Ctrl-C stops everything.""",
            flush=True,
        )
        while not stopping:
            time.sleep(0.5)
    finally:
        if operator is not None:
            operator.stop()
        minio.stop()
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
