"""A small Kubernetes REST client for the test cluster and its node agent.

Why not the official `kubernetes` package: its typed models make generic
apply/watch of arbitrary kinds (CRDs included) awkward, and the node agent must
not depend on the operator's extras. JSON over http.client is all we need.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"


class ApiError(Exception):
    """A non-2xx answer from the API server, carrying its Status message."""

    def __init__(self, status: int, body: str, method: str, path: str) -> None:
        self.status = status
        self.body = body
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {}
        self.reason: str = parsed.get("reason", "") if isinstance(parsed, dict) else ""
        self.message: str = (
            parsed.get("message", body) if isinstance(parsed, dict) else body
        ) or body
        super().__init__(f"{method} {path}: HTTP {status} {self.reason}: {self.message}")


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the REST API."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name else base


class KubeClient:
    """Authenticates with a client certificate or a bearer token."""

    def __init__(
        self,
        server: str,
        ca_file: str | Path,
        *,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        url = urllib.parse.urlsplit(server)
        if url.scheme != "https" or not url.hostname:
            raise ValueError(f"need an https:// server URL, got {server!r}")
        self.server = server
        self.host = url.hostname
        self.port = url.port or 443
        self.ca_file = str(ca_file)
        self.token = token
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=self.ca_file)
        if cert_file and key_file:
            self._ssl.load_cert_chain(str(cert_file), str(key_file))
        self._resources: dict[tuple[str, str], Resource] = {}
        self._resources_lock = threading.Lock()

    @classmethod
    def from_kubeconfig(cls, path: str | Path) -> KubeClient:
        """Reads the current context of a kubeconfig whose credentials are file paths."""
        config = yaml.safe_load(Path(path).read_text())
        ctx_name = config["current-context"]
        ctx = next(c["context"] for c in config["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == ctx["user"])
        return cls(
            cluster["server"],
            cluster["certificate-authority"],
            cert_file=user.get("client-certificate"),
            key_file=user.get("client-key"),
            token=user.get("token"),
        )

    def with_token(self, token: str) -> KubeClient:
        """The same server, authenticated as whoever `token` belongs to."""
        return KubeClient(self.server, self.ca_file, token=token, timeout=self.timeout)

    # -- raw HTTP ---------------------------------------------------------------

    def _connect(self, timeout: float | None) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            self.host, self.port, context=self._ssl, timeout=timeout or self.timeout
        )

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": JSON, "User-Agent": "tapestry-tests"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    @staticmethod
    def _url(path: str, params: dict[str, Any] | None) -> str:
        if not params:
            return path
        query = {k: str(v).lower() if isinstance(v, bool) else v for k, v in params.items()}
        return f"{path}?{urllib.parse.urlencode(query)}"

    def request_raw(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = JSON,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """Sends one request and returns the body; raises ApiError on non-2xx."""
        payload = None if body is None else json.dumps(body).encode()
        url = self._url(path, params)
        conn = self._connect(timeout)
        try:
            conn.request(method, url, payload, self._headers(content_type if payload else None))
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status >= 300:
            raise ApiError(resp.status, data.decode(errors="replace"), method, url)
        return data

    def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Obj:
        data = self.request_raw(method, path, body, **kwargs)
        result: Obj = json.loads(data) if data else {}
        return result

    def get(self, path: str, **params: Any) -> Obj:
        return self.request("GET", path, params=params)

    def create(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body)

    def patch(self, path: str, body: Obj, content_type: str = MERGE_PATCH) -> Obj:
        return self.request("PATCH", path, body, content_type=content_type)

    def delete(self, path: str, options: Obj | None = None, *, missing_ok: bool = True) -> Obj:
        """DELETE with optional DeleteOptions (gracePeriodSeconds, propagationPolicy, ...)."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", **(options or {})}
        try:
            return self.request("DELETE", path, body)
        except ApiError as err:
            if err.status == 404 and missing_ok:
                return {}
            raise

    def watch(
        self, path: str, resource_version: str, timeout_s: int = 60, **params: Any
    ) -> Iterator[tuple[str, Obj]]:
        """Yields (type, object) watch events until the server closes the stream."""
        params = {
            **params,
            "watch": True,
            "resourceVersion": resource_version,
            "allowWatchBookmarks": True,
            "timeoutSeconds": timeout_s,
        }
        url = self._url(path, params)
        conn = self._connect(timeout_s + 15)
        try:
            conn.request("GET", url, headers=self._headers(None))
            resp = conn.getresponse()
            if resp.status >= 300:
                raise ApiError(resp.status, resp.read().decode(errors="replace"), "GET", url)
            while line := resp.readline():
                event = json.loads(line)
                yield event["type"], event["object"]
        finally:
            conn.close()

    # -- kinds ------------------------------------------------------------------

    def resource(self, api_version: str, kind: str) -> Resource:
        """Maps apiVersion+kind to a REST resource through discovery (cached)."""
        key = (api_version, kind)
        with self._resources_lock:
            if key in self._resources:
                return self._resources[key]
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        try:
            listing = self.get(base)
        except ApiError as err:
            raise LookupError(f"API group version {api_version} is not served: {err}") from err
        found = None
        with self._resources_lock:
            for res in listing.get("resources", []):
                if "/" in res["name"]:
                    continue
                r = Resource(api_version, res["kind"], res["name"], res["namespaced"])
                self._resources[(api_version, res["kind"])] = r
                if res["kind"] == kind:
                    found = r
        if found is None:
            raise LookupError(f"kind {kind} is not served in {api_version}")
        return found

    def path_of(self, obj: Obj, namespace: str | None = None) -> str:
        """The REST path of an object given as a manifest."""
        meta = obj.get("metadata", {})
        res = self.resource(obj["apiVersion"], obj["kind"])
        return res.path(meta.get("namespace") or namespace, meta.get("name"))

    def apply(self, obj: Obj, namespace: str | None = None, manager: str = "tapestry-tests") -> Obj:
        """Server-side apply, like `kubectl apply --server-side --force-conflicts`."""
        return self.request(
            "PATCH",
            self.path_of(obj, namespace),
            obj,
            content_type=APPLY_PATCH,
            params={"fieldManager": manager, "force": True},
        )


class Informer:
    """Keeps a list+watch cache of one collection and reports every change.

    on_event(type, obj) runs on the informer thread for ADDED, MODIFIED and
    DELETED; after a relist, objects that vanished meanwhile are reported DELETED.
    """

    def __init__(
        self,
        client: KubeClient,
        path: str,
        on_event: Callable[[str, Obj], None],
        stop: threading.Event,
    ) -> None:
        self.client = client
        self.path = path
        self.on_event = on_event
        self.stop = stop
        self.synced = threading.Event()
        self._cache: dict[str, Obj] = {}
        self._lock = threading.Lock()

    def items(self) -> list[Obj]:
        with self._lock:
            return list(self._cache.values())

    def _apply(self, kind: str, obj: Obj) -> None:
        uid = obj["metadata"]["uid"]
        with self._lock:
            if kind == "DELETED":
                self._cache.pop(uid, None)
            else:
                self._cache[uid] = obj
        self.on_event(kind, obj)

    def _relist(self) -> str:
        listing = self.client.get(self.path)
        fresh = {o["metadata"]["uid"]: o for o in listing["items"]}
        with self._lock:
            gone = [o for uid, o in self._cache.items() if uid not in fresh]
        for obj in gone:
            self._apply("DELETED", obj)
        for obj in fresh.values():
            self._apply("MODIFIED", obj)
        self.synced.set()
        rv: str = listing["metadata"]["resourceVersion"]
        return rv

    def run(self) -> None:
        rv = ""
        while not self.stop.is_set():
            try:
                if not rv:
                    rv = self._relist()
                for kind, obj in self.client.watch(self.path, rv):
                    if kind == "ERROR":
                        rv = ""  # typically 410 Gone: relist
                        break
                    rv = obj["metadata"]["resourceVersion"]
                    if kind != "BOOKMARK":
                        self._apply(kind, obj)
                    if self.stop.is_set():
                        return
            except (OSError, ApiError, http.client.HTTPException, ValueError):
                rv = ""
                self.stop.wait(0.5)


def now_rfc3339() -> str:
    """Kubernetes' metav1.Time format."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
