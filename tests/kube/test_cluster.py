"""Self-tests of the real test cluster: API server features, controllers, node agent."""

from __future__ import annotations

import json
import os
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.kube.client import ApiError, KubeClient, Obj
from tests.kube.cluster import REPO_ROOT
from tests.kube.helpers import Kube
from tests.ports import free_port

pytestmark = pytest.mark.kube


def job(
    name: str,
    code: str,
    *,
    backoff_limit: int = 0,
    restart: str = "Never",
    volumes: dict[str, Obj] | None = None,
    service_account: str | None = None,
) -> Obj:
    """A Job whose one pod runs `python -c code`; `volumes` maps mount path -> volume."""
    container: Obj = {
        "name": "main",
        "image": "python:3.11",  # ignored: the node agent runs commands from the venv
        "command": ["python", "-c", code],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
    }
    pod: Obj = {"restartPolicy": restart, "containers": [container]}
    if volumes:
        pod["volumes"] = [{"name": f"v{i}", **v} for i, v in enumerate(volumes.values())]
        container["volumeMounts"] = [
            {"name": f"v{i}", "mountPath": path} for i, path in enumerate(volumes)
        ]
    if service_account:
        pod["serviceAccountName"] = service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": backoff_limit, "template": {"spec": pod}},
    }


def test_crd_cel_rule_rejects_bad_object(kube: Kube) -> None:
    group = f"{kube.namespace}.tapestry.test"  # CRDs are cluster-wide: keep it per test
    crd: Obj = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["minReplicas", "maxReplicas"],
                                    "properties": {
                                        "minReplicas": {"type": "integer", "minimum": 0},
                                        "maxReplicas": {"type": "integer"},
                                    },
                                    "x-kubernetes-validations": [
                                        {
                                            "rule": "self.minReplicas <= self.maxReplicas",
                                            "message": "minReplicas must not exceed maxReplicas",
                                        }
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    kube.apply(crd)
    try:
        kube.wait_condition(
            "apiextensions.k8s.io/v1", "CustomResourceDefinition", crd["metadata"]["name"],
            "Established",
        )  # fmt: skip
        path = f"/apis/{group}/v1/namespaces/{kube.namespace}/widgets"

        def widget(name: str, lo: int, hi: int) -> Obj:
            spec = {"minReplicas": lo, "maxReplicas": hi}
            return {"apiVersion": f"{group}/v1", "kind": "Widget",
                    "metadata": {"name": name}, "spec": spec}  # fmt: skip

        good = widget("good", 1, 3)
        good["spec"]["unknownField"] = "pruned"
        created = kube.client.create(path, good)
        assert "unknownField" not in created["spec"], "a structural schema prunes unknown fields"
        with pytest.raises(ApiError) as rejected:
            kube.client.create(path, widget("bad", 5, 2))
        assert rejected.value.status == 422
        assert "minReplicas must not exceed maxReplicas" in rejected.value.message
        # kubectl (strict field validation) shows the API server's message too.
        manifest = json.dumps(widget("bad", 5, 2))
        result = kube.kubectl("create", "-f", "-", input=manifest, check=False)
        assert result.returncode != 0
        assert "minReplicas must not exceed maxReplicas" in result.stderr
    finally:
        kube.client.delete(
            f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.{group}"
        )


def test_job_completes(kube: Kube) -> None:
    kube.apply(job("hello", "import os; print('hello from', os.environ['POD_NAME'])"))
    done = kube.wait_job("hello", "Complete")
    assert done["status"]["succeeded"] == 1
    (pod,) = kube.pods("job-name=hello")
    assert pod["status"]["phase"] == "Succeeded"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0
    assert f"hello from {pod['metadata']['name']}" in kube.logs(pod["metadata"]["name"])


def test_job_fails_after_backoff_limit(kube: Kube) -> None:
    kube.apply(job("doomed", "import sys; print('failing'); sys.exit(1)", backoff_limit=1))
    failed = kube.wait_job("doomed", "Failed", timeout=180)
    assert failed["status"]["failed"] == 2  # the first try plus one retry
    cond = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "BackoffLimitExceeded"
    pods = kube.pods("job-name=doomed")
    assert [p["status"]["phase"] for p in pods] == ["Failed", "Failed"]
    for pod in pods:
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 1


def test_termination_message_and_pod_failure_policy(kube: Kube) -> None:
    """The container's termination log reaches its status, as the operator reads it,
    and an exit code named in podFailurePolicy fails the Job without retries."""
    code = "import sys; open('/dev/termination-log', 'w').write('refused: bad plan'); sys.exit(3)"
    manifest = job("refusing", code, backoff_limit=4)
    manifest["spec"]["podFailurePolicy"] = {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [3]}},
        ]
    }
    kube.apply(manifest)
    failed = kube.wait_job("refusing", "Failed", timeout=120)
    cond = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "PodFailurePolicy"
    (pod,) = kube.pods("job-name=refusing")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["message"] == "refused: bad plan"


def test_on_failure_restarts_container_in_place(kube: Kube) -> None:
    code = textwrap.dedent("""
        import os, sys
        if os.path.exists("/scratch/tried"):
            sys.exit(0)
        open("/scratch/tried", "w").close()
        sys.exit(3)
    """)
    scratch: dict[str, Obj] = {"/scratch": {"emptyDir": {}}}
    kube.apply(job("retry", code, restart="OnFailure", backoff_limit=2, volumes=scratch))
    kube.wait_job("retry", "Complete")
    (pod,) = kube.pods("job-name=retry")
    status = pod["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 3


def test_indexed_job_runs_torchrun_across_pods(kube: Kube) -> None:
    port = free_port()
    script = textwrap.dedent("""
        import socket
        import torch
        import torch.distributed as dist
        dist.init_process_group("gloo")
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        print(f"rank={dist.get_rank()} world={dist.get_world_size()} sum={t.item()}"
              f" host={socket.gethostname()}", flush=True)
        dist.destroy_process_group()
    """)
    kube.apply(f"""
apiVersion: v1
kind: Service
metadata: {{name: workers}}
spec:
  clusterIP: None
  selector: {{job-name: ddp}}
  ports: [{{name: c10d, port: {port}}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: ddp-script}}
data:
  train.py: {json.dumps(script)}
---
apiVersion: batch/v1
kind: Job
metadata: {{name: ddp}}
spec:
  completionMode: Indexed
  completions: 2
  parallelism: 2
  backoffLimit: 0
  template:
    spec:
      subdomain: workers
      restartPolicy: Never
      volumes: [{{name: script, configMap: {{name: ddp-script}}}}]
      containers:
      - name: trainer
        image: ignored
        command: [torchrun]
        args:
        - --nnodes=2
        - --nproc-per-node=1
        - --node-rank=$(JOB_COMPLETION_INDEX)
        - --master-addr=ddp-0.workers.$(POD_NAMESPACE).svc.cluster.local
        - --master-port={port}
        - /opt/script/train.py
        env:
        - name: POD_NAMESPACE
          valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}
        volumeMounts: [{{name: script, mountPath: /opt/script, readOnly: true}}]
""")
    kube.wait_job("ddp", "Complete", timeout=300)
    pods = kube.pods("job-name=ddp")
    assert len(pods) == 2
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 2 and all(ip.startswith("127.") for ip in ips)
    for index, pod in enumerate(pods):
        out = kube.logs(pod["metadata"]["name"])
        assert f"rank={index} world=2 sum=3.0 host=ddp-{index}" in out, out


def test_deleting_owner_garbage_collects_children(kube: Kube, tmp_path: Path) -> None:
    parent = kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "parent"}})[
        0
    ]
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "parent",
             "uid": parent["metadata"]["uid"]}  # fmt: skip
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "child", "ownerReferences": [owner]}})  # fmt: skip
    kube.delete("v1", "ConfigMap", "parent")
    kube.wait_gone("v1", "ConfigMap", "child")

    # A Job's pod is garbage-collected with it, and the node agent kills its process.
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    kube.apply(job("sleeper", code))
    kube.wait_for(
        "the sleeper pod to write its pid",
        lambda: pid_file.read_text() if pid_file.exists() else "",
        bool,
    )
    pid = int(pid_file.read_text())
    (pod,) = kube.pods("job-name=sleeper")
    assert pod["status"]["phase"] == "Running"
    kube.delete("batch/v1", "Job", "sleeper")
    kube.wait_for(
        "the sleeper pod to be deleted", lambda: kube.pods("job-name=sleeper"), lambda p: not p
    )

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    kube.wait_for(f"process {pid} to be killed", lambda: pid, gone, timeout=10)


def test_pod_sees_env_volumes_and_dns(kube: Kube) -> None:
    kube.apply("""
apiVersion: v1
kind: Secret
metadata: {name: creds}
stringData: {password: s3cret}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {greeting: hello, mode: fast}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
""")
    check = textwrap.dedent("""
        import os, socket
        e = os.environ
        assert e["PASSWORD"] == "s3cret", e
        assert e["GREETING"] == "hello" and e["CFG_mode"] == "fast", e
        assert e["POD_NAME"] == "probe" and e["POD_NS"] == e["EXPECTED_NS"], e
        assert e["APP"] == "probe-app" and e["NOTE"] == "hi", e
        assert e["POD_IP"].startswith("127.") and e["POD_IP"] != "127.0.0.1", e
        assert e["DERIVED"] == "probe@" + e["POD_IP"], e
        assert socket.gethostname() == "probe"
        assert socket.gethostbyname("probe") == e["POD_IP"]
        assert open("/etc/tapestry/secret/password").read() == "s3cret"
        assert open("/etc/tapestry/config/greeting").read() == "hello"
        assert 'app="probe-app"' in open("/etc/podinfo/labels").read()
        try:
            open("/etc/tapestry/secret/new", "w")
            raise SystemExit("read-only secret volume was writable")
        except OSError:
            pass
        token = "/var/run/secrets/kubernetes.io/serviceaccount/token"
        assert open(token).read().count(".") == 2, "service account token is not a JWT"
        open("/scratch/x", "w").write("scratch")
        open("/data/out.txt", "w").write("persisted")
        print("all checks passed")
    """)
    kube.apply(f"""
apiVersion: v1
kind: Pod
metadata:
  name: probe
  labels: {{app: probe-app}}
  annotations: {{note: hi}}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: ignored
    command: [python, -c, {json.dumps(check)}]
    env:
    - {{name: EXPECTED_NS, value: {kube.namespace}}}
    - {{name: PASSWORD, valueFrom: {{secretKeyRef: {{name: creds, key: password}}}}}}
    - {{name: GREETING, valueFrom: {{configMapKeyRef: {{name: settings, key: greeting}}}}}}
    - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
    - {{name: POD_NS, valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}}}
    - {{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
    - {{name: APP, valueFrom: {{fieldRef: {{fieldPath: "metadata.labels['app']"}}}}}}
    - {{name: NOTE, valueFrom: {{fieldRef: {{fieldPath: "metadata.annotations['note']"}}}}}}
    - {{name: DERIVED, value: "$(POD_NAME)@$(POD_IP)"}}
    envFrom:
    - {{prefix: CFG_, configMapRef: {{name: settings}}}}
    volumeMounts:
    - {{name: secret, mountPath: /etc/tapestry/secret, readOnly: true}}
    - {{name: config, mountPath: /etc/tapestry/config}}
    - {{name: podinfo, mountPath: /etc/podinfo}}
    - {{name: scratch, mountPath: /scratch}}
    - {{name: data, mountPath: /data}}
  volumes:
  - {{name: secret, secret: {{secretName: creds}}}}
  - {{name: config, configMap: {{name: settings}}}}
  - name: podinfo
    downwardAPI:
      items: [{{path: labels, fieldRef: {{fieldPath: metadata.labels}}}}]
  - {{name: scratch, emptyDir: {{}}}}
  - {{name: data, persistentVolumeClaim: {{claimName: data}}}}
""")
    kube.wait_for(
        "pod/probe to succeed",
        lambda: kube.get("v1", "Pod", "probe"),
        lambda p: p["status"].get("phase") == "Succeeded",
        fail=lambda p: p["status"].get("phase") == "Failed",
    )
    assert "all checks passed" in kube.logs("probe")
    assert not Path("/scratch/x").exists(), "emptyDir leaked outside the pod's mount namespace"
    kube.wait_for(
        "pvc/data to be Bound",
        lambda: kube.get("v1", "PersistentVolumeClaim", "data"),
        lambda pvc: pvc["status"].get("phase") == "Bound",
    )
    data = {"/data": {"persistentVolumeClaim": {"claimName": "data"}}}
    kube.apply(job("reader", "print(open('/data/out.txt').read())", volumes=data))
    kube.wait_job("reader", "Complete")
    (pod,) = kube.pods("job-name=reader")
    assert "persisted" in kube.logs(pod["metadata"]["name"])


def test_service_account_gets_only_what_its_role_grants(kube: Kube) -> None:
    kube.apply("""
apiVersion: v1
kind: ServiceAccount
metadata: {name: reader}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: configmap-reader}
rules:
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reader}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: configmap-reader}
subjects:
- {kind: ServiceAccount, name: reader}
""")
    ns = kube.namespace
    as_reader: KubeClient = kube.as_token(kube.token("reader"))
    review = as_reader.create(
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:reader"
    as_reader.get(f"/api/v1/namespaces/{ns}/configmaps")
    forbidden: list[Callable[[], Obj]] = [
        lambda: as_reader.get(f"/api/v1/namespaces/{ns}/secrets"),
        lambda: as_reader.get("/api/v1/namespaces/default/configmaps"),
        lambda: as_reader.create(
            f"/api/v1/namespaces/{ns}/configmaps",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "nope"}},
        ),
    ]
    for attempt in forbidden:
        with pytest.raises(ApiError) as denied:
            attempt()
        assert denied.value.status == 403, denied.value

    # The same identity from inside a pod: the projected token the agent mounts.
    code = textwrap.dedent("""
        import json, os, ssl, urllib.error, urllib.request
        sa = "/var/run/secrets/kubernetes.io/serviceaccount"
        ctx = ssl.create_default_context(cafile=f"{sa}/ca.crt")
        base = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
        ns = open(f"{sa}/namespace").read()
        auth = {"Authorization": "Bearer " + open(f"{sa}/token").read()}
        def status(path):
            req = urllib.request.Request(base + path, headers=auth)
            try:
                return urllib.request.urlopen(req, context=ctx).status
            except urllib.error.HTTPError as err:
                return err.code
        print(json.dumps({"configmaps": status(f"/api/v1/namespaces/{ns}/configmaps"),
                          "secrets": status(f"/api/v1/namespaces/{ns}/secrets")}))
    """)
    kube.apply(job("whoami", code, service_account="reader"))
    kube.wait_job("whoami", "Complete")
    (pod,) = kube.pods("job-name=whoami")
    out = kube.logs(pod["metadata"]["name"]).strip().splitlines()[-1]
    assert json.loads(out) == {"configmaps": 200, "secrets": 403}


def test_kubectl_get_apply_logs(kube: Kube) -> None:
    version = json.loads(kube.kubectl("version", "-o", "json").stdout)
    server = version["serverVersion"]["gitVersion"]
    if not os.environ.get("TAPESTRY_KUBE_ASSETS"):
        gomod = (REPO_ROOT / "tests/testbin/kube/go.mod").read_text()
        pinned = re.search(r"k8s\.io/kubernetes (v\S+)", gomod)
        assert pinned and server == pinned.group(1), version
    kube.kubectl(
        "apply", "-f", "-", input=json.dumps(job("greeter", "print('greetings via kubectl')"))
    )
    kube.kubectl("wait", "--for=condition=complete", "job/greeter", "--timeout=90s", timeout=100)
    jobs = json.loads(kube.kubectl("get", "jobs", "-o", "json").stdout)
    assert [j["metadata"]["name"] for j in jobs["items"]] == ["greeter"]
    assert "greetings via kubectl" in kube.kubectl("logs", "job/greeter").stdout
    nodes = kube.kubectl("get", "nodes", "-o", "wide").stdout
    assert "Ready" in nodes, nodes
