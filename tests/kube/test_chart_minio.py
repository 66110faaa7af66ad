"""The chart's MinIO on the test cluster: a coordinator installed with `minio.enabled`
runs the real MinIO server (the test node runs the binary built for the tests, named by
`minio.command`) on a provisioned PersistentVolumeClaim, and the post-install Job creates
the bucket with the generated credentials, which an upgrade keeps."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator

import pytest
import yaml

from tapestry_protocol.store import S3Credentials, open_store
from tests.chart.chart import CHART
from tests.kube.client import ApiError, KubeClient
from tests.kube.cluster import KubeCluster
from tests.ports import free_port
from tests.s3servers import minio_binary
from tests.tools import run_helm

pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.tools, pytest.mark.slow]
MINIO_PODS = "app.kubernetes.io/component=minio"


@pytest.fixture
def namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    client: KubeClient = kube_cluster.client()
    name = f"chart-minio-{uuid.uuid4().hex[:6]}"
    client.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
    }})  # fmt: skip
    yield name
    run_helm("uninstall", "tapestry", "-n", name, "--wait", kubeconfig=kube_cluster.kubeconfig,
             check=False)  # fmt: skip
    try:
        client.delete(f"/api/v1/namespaces/{name}")
    except ApiError as err:
        print(f"could not delete namespace {name}: {err}")


def _credentials(client: KubeClient, namespace: str) -> dict[str, str]:
    secret = client.get(f"/api/v1/namespaces/{namespace}/secrets/tapestry-minio")
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_the_chart_s_minio_serves_the_bucket_with_credentials_kept_across_upgrades(
    kube_cluster: KubeCluster, namespace: str
) -> None:
    client = kube_cluster.client()
    port = free_port()  # the test node runs pods on the host's network
    values = {
        "role": "coordinator",
        "operator": {"healthPort": free_port()},
        "metrics": {"port": free_port()},
        "minio": {"enabled": True, "command": [str(minio_binary())], "port": port,
                  "bucket": "consortium", "persistence": {"size": "1Gi"}},
    }  # fmt: skip
    args = ["--namespace", namespace, "--values", "-", "--wait", "--timeout", "240s"]
    done = run_helm("install", "tapestry", str(CHART), *args, input=yaml.safe_dump(values),
                    kubeconfig=kube_cluster.kubeconfig)  # fmt: skip
    endpoint = f"http://tapestry-minio.{namespace}.svc:{port}"
    assert f"MinIO (the consortium's store) listens on {endpoint}, bucket" in done.stdout
    claim = client.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/tapestry-minio")
    assert claim["status"]["phase"] == "Bound"

    first = _credentials(client, namespace)
    assert set(first) == {"accessKey", "secretKey"} and len(first["secretKey"]) == 40
    url = f"s3://consortium?endpoint=http://127.0.0.1:{port}"
    creds = S3Credentials(first["accessKey"], first["secretKey"])
    store = open_store(url, credentials=creds)  # no create: the bucket Job made it
    store.put("probe/hello", b"federated", if_absent=True)
    assert store.get("probe/hello") == b"federated"
    store.close()

    run_helm("upgrade", "tapestry", str(CHART), "--reuse-values", *args[:2], "--wait",
             "--timeout", "240s", kubeconfig=kube_cluster.kubeconfig)  # fmt: skip
    assert _credentials(client, namespace) == first  # generated once, kept by the upgrade
    pods = f"/api/v1/namespaces/{namespace}/pods"
    (old,) = client.get(pods, labelSelector=MINIO_PODS)["items"]
    client.delete(f"{pods}/{old['metadata']['name']}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # a new MinIO pod, on the same claim
        running = [p for p in client.get(pods, labelSelector=MINIO_PODS)["items"]
                   if p["metadata"]["uid"] != old["metadata"]["uid"]
                   and p.get("status", {}).get("phase") == "Running"]  # fmt: skip
        if running:
            break
        time.sleep(0.5)
    store = open_store(url, credentials=creds)
    assert store.get("probe/hello") == b"federated"  # kept on the volume across the restart
    store.close()
