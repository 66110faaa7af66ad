"""Opening a federation's store from a spec and its Secrets, once per credentials."""

from __future__ import annotations

import hashlib
import tempfile
import threading
from pathlib import Path

from tapestry_operator.config import StoreSpec
from tapestry_operator.kube import Kube
from tapestry_protocol.store import ObjectStore, S3Credentials, open_store

_lock = threading.Lock()
_open: dict[str, ObjectStore] = {}
_ca_dir = Path(tempfile.mkdtemp(prefix="tapestry-operator-ca-"))


def store_for(kube: Kube, namespace: str, spec: StoreSpec) -> ObjectStore:
    """The store a spec names, with credentials (and CA) read from its Secrets.

    Stores are cached by endpoint, bucket and credentials, so a rotated Secret opens a
    new connection pool without a restart, and nothing secret is ever written to disk
    (the CA bundle is public; it is written to a file because TLS wants a path)."""
    access = kube.secret_entry(namespace, spec.credentials.name, "accessKey").decode().strip()
    secret = kube.secret_entry(namespace, spec.credentials.name, "secretKey").decode().strip()
    url = spec.url(ca_file=ca_file_for(kube, namespace, spec))
    cache_key = hashlib.sha256(f"{url}\0{access}\0{secret}".encode()).hexdigest()
    with _lock:
        if cache_key not in _open:
            _open[cache_key] = open_store(url, credentials=S3Credentials(access, secret))
        return _open[cache_key]


def ca_file_for(kube: Kube, namespace: str, spec: StoreSpec) -> str | None:
    """The path of the spec's CA bundle, written once (it is public), or None."""
    if spec.ca is None:
        return None
    ca = kube.secret_entry(namespace, spec.ca.name, spec.ca.key)
    ca_path = _ca_dir / f"{hashlib.sha256(ca).hexdigest()[:16]}.pem"
    if not ca_path.exists():
        ca_path.write_bytes(ca)
    return str(ca_path)
