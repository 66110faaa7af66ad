"""The Helm chart, linted and rendered by the real helm: every role and example renders;
the schema refuses wrong values with helm's own message; the objects follow the
restricted Pod Security Standard, carry the recommended labels, mount no token where no
API call is made, and grant exactly the documented RBAC rules."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

import tapestry_telemetry as telemetry
from tapestry_operator import api, builders, settings
from tapestry_operator.config import ParticipantConfig
from tapestry_protocol import pod
from tests.chart.chart import (
    CHART,
    EXAMPLE_VALUES,
    NAMESPACE,
    RELEASE,
    ROLES,
    RULES,
    Obj,
    chart_copy,
    helm_template,
    of_kind,
    one,
    pod_specs,
    rules_for,
    template,
)
from tests.operator import crd_defaults
from tests.tools import run_helm

pytestmark = pytest.mark.tools

FULLNAME = RELEASE  # the release "tapestry" contains the chart name: no suffix
RECOMMENDED = (
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
)
EVERYTHING = {
    "minio": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
    "telemetry": {"otlpEndpoint": "http://otel-collector:4318"},
}


def _values(role: str, **more: Any) -> dict[str, Any]:
    return {"role": role, "watchNamespaces": ["fed", "de"], **more}


def _container(spec: Obj, name: str) -> Obj:
    return next(c for c in spec["containers"] if c["name"] == name)


def _operator(objects: list[Obj]) -> tuple[Obj, Obj]:
    deployment = one(objects, "Deployment", FULLNAME)
    spec = deployment["spec"]["template"]["spec"]
    return deployment, spec


# --- helm lint and render ----------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_helm_lint_passes_strictly_for_every_role(role: str) -> None:
    done = run_helm("lint", "--strict", str(CHART), "--set", f"role={role}")
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("values_file", EXAMPLE_VALUES, ids=lambda p: p.name)
def test_every_example_values_file_lints_and_renders(values_file: Path) -> None:
    run_helm("lint", "--strict", str(CHART), "--values", str(values_file))
    objects = template(values_files=[values_file], namespace="tapestry")
    deployment, _ = _operator(objects)
    role = yaml.safe_load(values_file.read_text())["role"]
    assert f"--role={role}" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert of_kind(objects, "NetworkPolicy"), "the examples enable the NetworkPolicies"


def test_the_examples_are_a_coordinator_and_two_participating_countries() -> None:
    roles = {p.name: yaml.safe_load(p.read_text())["role"] for p in EXAMPLE_VALUES}
    assert roles.pop("coordinator.yaml") == "coordinator"
    assert sorted(roles.values()) == ["participant", "participant"], roles


def test_the_defaults_render_a_participant_watching_the_release_namespace() -> None:
    objects = template()
    _, spec = _operator(objects)
    args = _container(spec, "operator")["args"]
    assert args[:2] == ["--role=participant", f"--namespace={NAMESPACE}"]
    (role,) = of_kind(objects, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert not of_kind(objects, "NetworkPolicy") and not of_kind(objects, "PersistentVolumeClaim")


# --- the schema --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"role": "member"},
         "- at '/role': value must be one of 'coordinator', 'participant', 'both'"),
        ({"role": "participant", "minio": {"enabled": True}},
         "- at '/minio/enabled': value must be false"),
        ({"rol": "coordinator"}, "- at '': additional properties 'rol' not allowed"),
        ({"watchNamespaces": ["Tapestry_DE"]},
         "- at '/watchNamespaces/0': 'Tapestry_DE' does not match pattern"),
        ({"metrics": {"port": 0}}, "- at '/metrics/port': minimum: got 0, want 1"),
        ({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}},
         "- at '/metrics/enabled': value must be true"),
        ({"networkPolicy": {"store": {"cidrs": ["203.0.113.10"]}}},
         "- at '/networkPolicy/store/cidrs/0': '203.0.113.10' does not match pattern"),
        ({"image": {"pullPolicy": "Sometimes"}},
         "- at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'"),
        ({"dashboards": {"labelValue": 1}},
         "- at '/dashboards/labelValue': got number, want string"),
        ({"telemetry": {"otlpEndpoint": "otel-collector:4318"}},
         "- at '/telemetry/otlpEndpoint': 'otel-collector:4318' does not match pattern"),
        ({"operator": {"logFormat": "yaml"}},
         "- at '/operator/logFormat': value must be one of 'json', 'text'"),
        ({"networkPolicy": {"telemetry": {"ports": [0]}}},
         "- at '/networkPolicy/telemetry/ports/0': minimum: got 0, want 1"),
        ({"networkPolicy": {"telemetry": {"cidrs": ["otel-collector"]}}},
         "- at '/networkPolicy/telemetry/cidrs/0': 'otel-collector' does not match pattern"),
        ({"networkPolicy": {"telemetry": {"port": 4318}}},
         "- at '/networkPolicy/telemetry': additional properties 'port' not allowed"),
        ({"telemetry": {"operatorMetricsExporter": "console"}},
         "- at '/telemetry/operatorMetricsExporter': value must be one of '', 'prometheus', "
         "'otlp', 'otlp,prometheus', 'none'"),
        ({"metrics": {"enabled": False}, "telemetry": {"operatorMetricsExporter": "prometheus"}},
         "- at '/metrics/enabled': value must be true"),
        ({"telemetry": {"operatorMetricsExporter": "otlp"}},
         "- at '/telemetry/otlpEndpoint': minLength: got 0, want 1"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("- at") else None,
)  # fmt: skip
def test_the_schema_refuses_wrong_values_with_a_clear_message(
    values: dict[str, Any], message: str
) -> None:
    done = helm_template(values, check=False)
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr
    assert message in done.stderr, done.stderr


def test_minio_is_accepted_for_the_coordinator_and_both() -> None:
    for role in ("coordinator", "both"):
        objects = template({"role": role, "minio": {"enabled": True}})
        assert of_kind(objects, "PersistentVolumeClaim"), role


# --- the operator's Deployment -----------------------------------------------------


def _assert_restricted(spec: Obj, where: str) -> None:
    """The restricted Pod Security Standard (pod and every container)."""
    assert spec["securityContext"]["runAsNonRoot"] is True, where
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["runAsNonRoot"] is True, where
        assert sc["capabilities"] == {"drop": ["ALL"]}, where
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert not sc.get("privileged"), where
    assert not any("hostPath" in v for v in spec.get("volumes", [])), where
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where


@pytest.mark.parametrize("role", ROLES)
def test_the_operator_deployment(role: str) -> None:
    objects = template(_values(role, operator={"healthPort": 8181}, metrics={"port": 9999}))
    deployment, spec = _operator(objects)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = _container(spec, "operator")
    assert container["command"] == ["python", "-m", "tapestry_operator"]
    assert container["args"] == [
        f"--role={role}", "--namespace=fed", "--namespace=de",
        "--liveness=http://0.0.0.0:8181/healthz", "--log-format=json",
    ]  # fmt: skip
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8181, "metrics": 9999}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    _assert_restricted(spec, "operator")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TAPESTRY_METRICS_PORT"] == "9999"
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env


def test_metrics_off_and_an_otlp_endpoint_reach_the_operator_s_environment() -> None:
    objects = template({"metrics": {"enabled": False},
                        "telemetry": {"otlpEndpoint": "http://otel:4318"}})  # fmt: skip
    _, spec = _operator(objects)
    env = {e["name"]: e.get("value") for e in _container(spec, "operator")["env"]}
    assert env["TAPESTRY_METRICS_PORT"] == "0"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel:4318"
    assert not of_kind(objects, "Service")


@pytest.mark.parametrize(
    ("values", "paths"),
    [
        ({}, {"prometheus"}),  # scraped from /metrics: the chart's default
        ({"metrics": {"enabled": False}}, {"otlp"}),
        ({"telemetry": {"operatorMetricsExporter": "otlp,prometheus"}}, {"otlp", "prometheus"}),
        ({"telemetry": {"operatorMetricsExporter": "none"}}, set()),
    ],
    ids=["default", "metrics-off", "both", "none"],
)
def test_the_operator_s_metrics_take_one_path_and_its_pods_still_push_over_otlp(
    values: dict[str, Any], paths: set[str]
) -> None:
    """With an OTLP endpoint the operator would push its metrics and serve /metrics:
    a Prometheus receiving both counts it twice. The chart picks one path (its
    OTEL_METRICS_EXPORTER, as the operator reads it); the pods it creates do not get
    that choice and push over OTLP."""
    values = {**values, "telemetry": {"otlpEndpoint": "http://otel:4318",
                                      **values.get("telemetry", {})}}  # fmt: skip
    _, spec = _operator(template(values))
    env = {e["name"]: e.get("value", "") for e in _container(spec, "operator")["env"]}
    assert telemetry.metrics_exporters(env) == paths
    assert telemetry.METRICS_EXPORTER_ENV in env
    pods = telemetry.pod_environment(env)
    assert telemetry.METRICS_EXPORTER_ENV not in pods
    assert telemetry.MetricsExporter.OTLP in telemetry.metrics_exporters(pods)
    assert pods["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel:4318"


def test_the_workloads_values_are_the_operator_s_restricted_defaults() -> None:
    """One definition: values.yaml spells out the operator's built-in defaults."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    defaults = settings.Settings()
    assert values["workloads"]["podSecurityContext"] == defaults.pod_security_context
    assert values["workloads"]["securityContext"] == defaults.container_security_context


def test_workloads_overrides_reach_the_pods_the_operator_creates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chart's values, through the operator's environment, into a training pod."""
    workloads = {
        "podSecurityContext": {"runAsUser": 1000, "fsGroup": None},
        "securityContext": {"readOnlyRootFilesystem": False},
    }
    objects = template({"workloads": workloads})
    _, spec = _operator(objects)
    env = {e["name"]: e.get("value", "") for e in _container(spec, "operator")["env"]}
    for name in (settings.WORKLOAD_POD_SECURITY_CONTEXT, settings.WORKLOAD_SECURITY_CONTEXT):
        monkeypatch.setenv(name, env[name])
    settings.current.cache_clear()
    try:
        body = crd_defaults.participant(compute={"resources": {}})
        job = builders.build_training_job(ParticipantConfig.from_body(body), 1, body)
    finally:
        settings.current.cache_clear()
    pod_spec = job["spec"]["template"]["spec"]
    expected_pod = {**settings.Settings().pod_security_context, "runAsUser": 1000}
    del expected_pod["fsGroup"]  # null removes a default key
    assert pod_spec["securityContext"] == expected_pod
    container = pod_spec["containers"][0]["securityContext"]
    assert container == {**settings.Settings().container_security_context,
                         "readOnlyRootFilesystem": False}  # fmt: skip


# --- labels and tokens -------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_every_object_carries_the_recommended_labels(role: str) -> None:
    values = _values(role, dashboards={"enabled": True})
    if role != "participant":
        values.update(EVERYTHING)
    for obj in template(values):
        labels = obj["metadata"]["labels"]
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert [k for k in RECOMMENDED if not labels.get(k)] == [], where
        assert labels["app.kubernetes.io/name"] == "tapestry", where
        assert labels["app.kubernetes.io/instance"] == RELEASE, where
        assert labels["app.kubernetes.io/version"] == "0.1.0", where
        assert labels["app.kubernetes.io/managed-by"] == "Helm", where
        assert labels["app.kubernetes.io/component"], where


def test_only_the_operator_pod_gets_a_service_account_token() -> None:
    objects = template(_values("both", **EVERYTHING))
    account = one(objects, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    tokens = {name: spec.get("automountServiceAccountToken") for name, spec in pod_specs(objects)}
    assert tokens.pop(f"Deployment/{FULLNAME}") is True
    assert tokens and set(tokens.values()) == {False}, tokens
    _, spec = _operator(objects)
    assert spec["serviceAccountName"] == account["metadata"]["name"]


def test_every_pod_the_chart_renders_is_restricted() -> None:
    for name, spec in pod_specs(template(_values("both", **EVERYTHING))):
        _assert_restricted(spec, name)
        assert spec.get("enableServiceLinks") is False, name


# --- RBAC --------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_the_roles_grant_exactly_the_documented_rules(role: str) -> None:
    objects = template(_values(role))
    assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")
    roles = of_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["de", "fed"]
    for r in roles:
        assert r["rules"] == rules_for(role), r["metadata"]["namespace"]
    for binding in of_kind(objects, "RoleBinding"):
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": FULLNAME}  # fmt: skip
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]


@pytest.mark.parametrize("role", ROLES)
def test_store_identities_add_the_secret_writes_to_the_coordinator_only(role: str) -> None:
    objects = template({**_values(role), "storeIdentities": {"enabled": True}})
    expected = rules_for(role, "storeIdentities.enabled")
    for r in of_kind(objects, "Role"):
        assert r["rules"] == expected, r["metadata"]["namespace"]
    writes = {v for rule in expected if rule["resources"] == ["secrets"] for v in rule["verbs"]}
    assert writes == ({"get", "create", "update", "delete"} if role != "participant" else {"get"})
    assert [x for x in rules_for(role) if x["resources"] == ["secrets"]] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
    ]  # off by default: the operator only reads Secrets


def test_every_rule_is_one_verb_and_commented_with_why_in_the_template() -> None:
    text = (CHART / "templates" / "rbac.yaml").read_text()
    rules = re.findall(r"((?:  #.*\n)+)  - apiGroups: \[(.*)\]\n    resources: \[(.*)\]\n"
                       r"    verbs: \[(.*)\]", text)  # fmt: skip
    assert len(rules) == len(RULES)
    for comment, group, resources, verbs in rules:
        assert "," not in verbs and len(comment.strip()) > 20, (group, resources, verbs)
    assert {r.name for r in RULES} == {r.name for r in RULES if r.why}  # every rule says why


def test_rbac_create_false_and_an_existing_service_account() -> None:
    objects = template({"rbac": {"create": False},
                        "serviceAccount": {"create": False, "name": "operator"}})  # fmt: skip
    assert not of_kind(objects, "Role") and not of_kind(objects, "ServiceAccount")
    _, spec = _operator(objects)
    assert spec["serviceAccountName"] == "operator"


def test_service_account_annotations() -> None:
    annotations = {"iam.gke.io/gcp-service-account": "tapestry@example.iam"}
    account = one(template({"serviceAccount": {"annotations": annotations}}), "ServiceAccount")
    assert account["metadata"]["annotations"] == annotations


# --- NetworkPolicies ---------------------------------------------------------------


def _selects(policy: Obj, labels: dict[str, str]) -> bool:
    selector = policy["spec"]["podSelector"]
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _pod_labels(job: Obj) -> dict[str, str]:
    labels: dict[str, str] = job["spec"]["template"]["metadata"]["labels"]
    return labels


def test_network_policies_select_the_pods_the_operator_creates() -> None:
    objects = template(_values("both", networkPolicy={"enabled": True}))
    policies = {(p["metadata"]["namespace"], p["metadata"]["name"]): p
                for p in of_kind(objects, "NetworkPolicy")}  # fmt: skip
    trainer = policies[("de", f"{FULLNAME}-trainer")]
    jobs = policies[("de", f"{FULLNAME}-coordinator-jobs")]
    body = crd_defaults.participant(compute={"resources": {}})
    training = builders.build_training_job(ParticipantConfig.from_body(body), 1, body)
    assert _selects(trainer, _pod_labels(training)) and not _selects(jobs, _pod_labels(training))
    for component in (builders.AGGREGATOR, builders.BOOTSTRAP):
        labels = builders.labels(component, "fed")
        assert _selects(jobs, labels) and not _selects(trainer, labels), component
    operator = policies[(NAMESPACE, f"{FULLNAME}-operator")]
    deployment = one(objects, "Deployment", FULLNAME)
    assert _selects(operator, deployment["spec"]["template"]["metadata"]["labels"])
    assert api.APP == "tapestry" and api.MANAGER == "tapestry-operator"  # the chart's selector


def _egress_ports(rule: Obj) -> set[tuple[str, int]]:
    return {(p["protocol"], p["port"]) for p in rule.get("ports", [])}


def test_network_policies_allow_only_the_store_dns_peers_and_the_api_server() -> None:
    values = _values("both", networkPolicy={
        "enabled": True,
        "store": {"cidrs": ["203.0.113.10/32"], "ports": [9000]},
        "apiServer": {"cidrs": ["10.0.0.1/32"], "ports": [6443]},
    })  # fmt: skip
    objects = template(values)
    policies = {p["metadata"]["name"]: p for p in of_kind(objects, "NetworkPolicy")
                if p["metadata"]["namespace"] in ("de", NAMESPACE)}  # fmt: skip
    dns = {("UDP", 53), ("TCP", 53)}
    store = {("TCP", 9000)}
    trainer = policies[f"{FULLNAME}-trainer"]["spec"]
    assert trainer["policyTypes"] == ["Ingress", "Egress"]
    peers, *rest = trainer["egress"]
    assert "ports" not in peers  # torch picks the ports of its peers
    assert peers["to"] == [{"podSelector": trainer["podSelector"]}]
    assert trainer["ingress"] == [{"from": [{"podSelector": trainer["podSelector"]}]}]
    assert [_egress_ports(r) for r in rest] == [dns, store]
    assert rest[1]["to"] == [{"ipBlock": {"cidr": "203.0.113.10/32"}}]
    jobs = policies[f"{FULLNAME}-coordinator-jobs"]["spec"]
    assert "ingress" not in jobs and [_egress_ports(r) for r in jobs["egress"]] == [dns, store]
    operator = policies[f"{FULLNAME}-operator"]["spec"]
    api_server, *rest = operator["egress"]
    assert api_server == {"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}],
                          "ports": [{"protocol": "TCP", "port": 6443}]}  # fmt: skip
    assert [_egress_ports(r) for r in rest] == [dns, store]
    assert operator["ingress"] == [{"ports": [{"protocol": "TCP", "port": 9464}]}]


_EXPORTING = (f"{FULLNAME}-trainer", f"{FULLNAME}-coordinator-jobs", f"{FULLNAME}-operator")


def _to_collector(values: dict[str, Any], port: int) -> dict[str, list[Obj]]:
    """Every NetworkPolicy's egress rules on the collector's `port`, by name."""
    objects = template(_values("both", minio={"enabled": True}, **values))
    return {
        f"{p['metadata']['namespace']}/{p['metadata']['name']}": [
            r for r in p["spec"].get("egress", []) if ("TCP", port) in _egress_ports(r)
        ]
        for p in of_kind(objects, "NetworkPolicy")
    }


def test_network_policies_let_the_exporting_pods_reach_the_otlp_collector() -> None:
    """The operator, training, aggregator and bootstrap pods export to the collector;
    without this rule their OTLP requests would be dropped. MinIO exports nothing."""
    peers = [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
    collector = {"cidrs": ["10.8.0.0/16"], "peers": peers, "ports": [14318]}
    network = {"enabled": True, "telemetry": collector}
    endpoint = {"otlpEndpoint": "http://collector:14318"}
    found = _to_collector({"networkPolicy": network, "telemetry": endpoint}, 14318)
    for where, rules in found.items():
        if where.endswith(_EXPORTING):
            assert rules == [{
                "to": [{"ipBlock": {"cidr": "10.8.0.0/16"}}, *peers],
                "ports": [{"protocol": "TCP", "port": 14318}],
            }], where  # fmt: skip
        else:
            assert rules == [], where
    assert sum(w.endswith(_EXPORTING) for w in found) == 5  # trainer, jobs: de and fed


def test_the_collector_rule_defaults_to_any_destination_on_4318_and_needs_an_endpoint() -> None:
    endpoint = {"otlpEndpoint": "http://c:4318"}
    with_endpoint = _to_collector({"networkPolicy": {"enabled": True}, "telemetry": endpoint}, 4318)
    exporting = [rules for where, rules in with_endpoint.items() if where.endswith(_EXPORTING)]
    assert exporting and all(
        rules == [{"ports": [{"protocol": "TCP", "port": 4318}]}] for rules in exporting
    ), with_endpoint
    without = _to_collector({"networkPolicy": {"enabled": True}}, 4318)
    assert set(without) == set(with_endpoint)
    assert all(rules == [] for rules in without.values()), without


def test_network_policies_let_the_coordinator_s_pods_reach_the_chart_s_minio() -> None:
    network = {"enabled": True, "store": {"cidrs": []}}
    objects = template(_values("coordinator", minio={"enabled": True}, networkPolicy=network))
    minio = one(objects, "Deployment", f"{FULLNAME}-minio")
    minio_labels = minio["spec"]["template"]["metadata"]["labels"]
    for policy in of_kind(objects, "NetworkPolicy"):
        if policy["metadata"]["name"] in (f"{FULLNAME}-minio",):
            assert _selects(policy, minio_labels)
            continue
        egress = policy["spec"]["egress"]
        to_minio = [r for r in egress if _egress_ports(r) == {("TCP", 9000)}]
        assert len(to_minio) == 1, policy["metadata"]["name"]
        (peer,) = to_minio[0]["to"]
        assert peer["namespaceSelector"] == {
            "matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}
        }
        assert peer["podSelector"]["matchLabels"].items() <= minio_labels.items()


# --- MinIO -------------------------------------------------------------------------


def test_minio_is_off_by_default_and_pinned_with_persistence_and_generated_credentials() -> None:
    assert not [o for o in template({"role": "coordinator"}) if "minio" in o["metadata"]["name"]]
    objects = template({"role": "coordinator", "minio": {"enabled": True}})
    deployment = one(objects, "Deployment", f"{FULLNAME}-minio")
    spec = deployment["spec"]["template"]["spec"]
    image = _container(spec, "minio")["image"]
    assert re.fullmatch(r"quay\.io/minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", image)
    pvc = one(objects, "PersistentVolumeClaim")
    assert {"persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}, "name": "data"} in (
        spec["volumes"]
    )
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    secret = one(objects, "Secret")
    assert set(secret["data"]) == {"accessKey", "secretKey"}
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in _container(spec, "minio")["env"]
           if "valueFrom" in e}  # fmt: skip
    assert env == {
        "MINIO_ROOT_USER": {"name": secret["metadata"]["name"], "key": "accessKey"},
        "MINIO_ROOT_PASSWORD": {"name": secret["metadata"]["name"], "key": "secretKey"},
    }
    bucket = one(objects, "Job")
    assert bucket["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    (mount,) = _container(bucket["spec"]["template"]["spec"], "bucket")["volumeMounts"]
    assert mount["mountPath"] == pod.STORE_CREDENTIALS_MOUNT  # as the store reads them


def test_minio_with_an_existing_secret_renders_none_and_no_volume_claim_without_persistence() -> (
    None
):
    objects = template({"role": "both", "minio": {
        "enabled": True, "auth": {"existingSecret": "consortium-store"},
        "persistence": {"enabled": False},
    }})  # fmt: skip
    assert not of_kind(objects, "Secret") and not of_kind(objects, "PersistentVolumeClaim")
    spec = one(objects, "Deployment", f"{FULLNAME}-minio")["spec"]["template"]["spec"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in _container(spec, "minio")["env"]
            if "valueFrom" in e}  # fmt: skip
    assert refs == {"consortium-store"}
    assert {"name": "data", "emptyDir": {}} in spec["volumes"]


# --- metrics and dashboards --------------------------------------------------------


def test_metrics_service_and_monitor_toggles() -> None:
    plain = template()
    assert one(plain, "Service")["spec"]["ports"] == [
        {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert not of_kind(plain, "ServiceMonitor") and not of_kind(plain, "PodMonitor")
    objects = template({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"r": "kps"}},
                                    "podMonitor": {"enabled": True}}})  # fmt: skip
    service = one(objects, "Service")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["r"] == "kps"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    pod_monitor = one(objects, "PodMonitor")
    assert pod_monitor["apiVersion"] == "monitoring.coreos.com/v1"
    deployment, _ = _operator(objects)
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )


@pytest.mark.parametrize(
    ("role", "dashboards"),
    [("coordinator", ["coordinator"]), ("participant", ["participant"]),
     ("both", ["coordinator", "participant"])],
)  # fmt: skip
def test_dashboards_are_config_maps_for_the_grafana_sidecar(
    tmp_path: Path, role: str, dashboards: list[str]
) -> None:
    chart = chart_copy(tmp_path)
    (chart / "dashboards").mkdir(exist_ok=True)
    for name in ("coordinator", "participant"):
        (chart / "dashboards" / f"{name}.json").write_text(json.dumps({"title": name}))
    values = {"role": role, "dashboards": {"enabled": True, "labelKey": "grafana_dashboard",
                                           "labelValue": "tapestry"}}  # fmt: skip
    maps = of_kind(template(values, chart=chart), "ConfigMap")
    assert [m["metadata"]["name"] for m in maps] == [
        f"{FULLNAME}-dashboard-{d}" for d in dashboards
    ]
    for m, name in zip(maps, dashboards, strict=True):
        assert m["metadata"]["labels"]["grafana_dashboard"] == "tapestry"
        assert json.loads(m["data"][f"tapestry-{name}.json"]) == {"title": name}
    assert not of_kind(template({**values, "dashboards": {"enabled": False}}, chart=chart),
                       "ConfigMap")  # fmt: skip


def test_a_missing_dashboard_file_renders_nothing(tmp_path: Path) -> None:
    chart = chart_copy(tmp_path)
    for f in (chart / "dashboards").glob("*.json") if (chart / "dashboards").exists() else ():
        f.unlink()
    objects = template({"role": "both", "dashboards": {"enabled": True}}, chart=chart)
    assert not of_kind(objects, "ConfigMap")


def test_the_packaged_chart_carries_the_health_checks_but_not_their_test_cases(
    tmp_path: Path,
) -> None:
    """`.helmignore` keeps Argo CD's test cases (health_test.yaml, testdata/) in the
    repository; the package holds only what the templates read."""
    run_helm("package", str(CHART), "--destination", str(tmp_path))
    (package,) = tmp_path.glob("*.tgz")
    with tarfile.open(package) as tar:
        names = tar.getnames()
    health = sorted(n for n in names if "/health/" in n)
    assert health and all(n.endswith("/health.lua") for n in health), health
    kinds = {Path(p).stem for p in (CHART.parent.parent / "crds").glob("*.yaml")}
    assert len(health) == len(kinds), (health, kinds)
