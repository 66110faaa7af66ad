"""The operator's few Kubernetes API calls, with timeouts, idempotent creates and the
Job and pod facts the lifecycle needs. Blocking: call it from a worker thread."""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tapestry_lifecycle.states import JobState
from tapestry_operator import api

log = logging.getLogger(__name__)
TIMEOUT = (5.0, 30.0)  # connect, read: a hung API server must not hang a reconcile
Obj = dict[str, Any]


class SecretMissing(Exception):
    """A Secret the spec names does not exist or lacks the entry."""


@dataclass(frozen=True)
class JobStatus:
    state: JobState
    message: str = ""


class Kube:
    """Typed access to the resources the operator reads and writes."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        if api_client is None:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
            api_client = client.ApiClient()
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    # -- custom resources ---------------------------------------------------------

    def get_custom(self, namespace: str, plural: str, name: str) -> Obj | None:
        try:
            obj = self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, plural, name, _request_timeout=TIMEOUT
            )
            return cast(Obj, obj)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list_custom(self, namespace: str, plural: str) -> list[Obj]:
        listed = self.custom.list_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, plural, _request_timeout=TIMEOUT
        )
        return cast(list[Obj], cast(Obj, listed).get("items", []))

    def patch_status(self, namespace: str, plural: str, name: str, status: Obj) -> None:
        """A merge patch of the status subresource: it never touches spec and needs no
        resourceVersion, so it cannot conflict."""
        try:
            self.custom.patch_namespaced_custom_object_status(
                api.GROUP, api.VERSION, namespace, plural, name, {"status": status},
                _request_timeout=TIMEOUT,
            )  # fmt: skip
        except ApiException as e:
            if e.status != 404:  # deleted meanwhile: nothing to report on
                raise

    # -- secrets --------------------------------------------------------------------

    def secret_entry(self, namespace: str, name: str, key: str) -> bytes:
        try:
            secret = self.core.read_namespaced_secret(name, namespace, _request_timeout=TIMEOUT)
        except ApiException as e:
            if e.status == 404:
                raise SecretMissing(f"Secret {namespace}/{name} does not exist") from None
            raise
        data = secret.data or {}
        if key not in data:
            raise SecretMissing(f"Secret {namespace}/{name} has no entry {key!r}")
        return base64.b64decode(data[key])

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """A Secret's entries, decoded; None if it does not exist."""
        try:
            secret = self.core.read_namespaced_secret(name, namespace, _request_timeout=TIMEOUT)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    def replace_secret(self, obj: Obj) -> None:
        """Replace a Secret the operator made (store identities: a rotated key)."""
        meta = obj["metadata"]
        self.core.replace_namespaced_secret(
            meta["name"], meta["namespace"], cast(Any, obj), _request_timeout=TIMEOUT
        )

    def delete_secret(self, namespace: str, name: str) -> None:
        """Delete a Secret the operator made; gone already is done."""
        try:
            self.core.delete_namespaced_secret(name, namespace, _request_timeout=TIMEOUT)
        except ApiException as e:
            if e.status != 404:
                raise

    # -- children -------------------------------------------------------------------

    def create(self, obj: Obj) -> bool:
        """Create a child; False if it already exists (409 means done: names are
        deterministic, so the existing object is the one we would have made)."""
        namespace = obj["metadata"]["namespace"]
        try:
            if obj["kind"] == "Job":
                self.batch.create_namespaced_job(
                    namespace, cast(Any, obj), _request_timeout=TIMEOUT
                )
            elif obj["kind"] == "Service":
                self.core.create_namespaced_service(
                    namespace, cast(Any, obj), _request_timeout=TIMEOUT
                )
            elif obj["kind"] == "Secret":
                self.core.create_namespaced_secret(
                    namespace, cast(Any, obj), _request_timeout=TIMEOUT
                )
            elif obj["kind"] == "FederationRound":
                self.custom.create_namespaced_custom_object(
                    api.GROUP, api.VERSION, namespace, api.ROUNDS, obj, _request_timeout=TIMEOUT
                )
            else:
                raise ValueError(f"the operator does not create {obj['kind']} objects")
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True

    def job_status(self, namespace: str, name: str) -> JobStatus:
        """Absent, running, succeeded or failed for good (with the pods' reason)."""
        try:
            job = self.batch.read_namespaced_job(name, namespace, _request_timeout=TIMEOUT)
        except ApiException as e:
            if e.status == 404:
                return JobStatus(JobState.ABSENT)
            raise
        for condition in (job.status.conditions if job.status else None) or []:
            if condition.status != "True":
                continue
            if condition.type == "Complete":
                return JobStatus(JobState.SUCCEEDED)
            if condition.type == "Failed":
                reason = self._pod_failure(namespace, name)
                detail = condition.message or condition.reason or "failed"
                return JobStatus(JobState.FAILED, reason or detail)
        return JobStatus(JobState.RUNNING)

    def _pod_failure(self, namespace: str, job: str) -> str:
        """The newest failed container's termination message or exit code."""
        pods = self.core.list_namespaced_pod(
            namespace, label_selector=f"batch.kubernetes.io/job-name={job}",
            _request_timeout=TIMEOUT,
        ).items  # fmt: skip
        failures: list[tuple[str, str]] = []
        for p in pods:
            for cs in (p.status.container_statuses or []) if p.status else []:
                term = cs.state.terminated if cs.state else None
                if term is None or term.exit_code == 0:
                    continue
                text = (term.message or "").strip() or f"exit code {term.exit_code}"
                name = p.metadata.name if p.metadata else "?"
                failures.append((str(term.finished_at or ""), f"{name}: {text}"))
        return sorted(failures)[-1][1][:1024] if failures else ""

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete a round's Job and its rendezvous Service (history limit)."""
        try:
            self.batch.delete_namespaced_job(
                name, namespace, propagation_policy="Background", _request_timeout=TIMEOUT
            )
            self.core.delete_namespaced_service(name, namespace, _request_timeout=TIMEOUT)
        except ApiException as e:
            if e.status != 404:
                raise

    def jobs(self, namespace: str, selector: str) -> list[Any]:
        items: list[Any] = self.batch.list_namespaced_job(
            namespace, label_selector=selector, _request_timeout=TIMEOUT
        ).items
        return items
