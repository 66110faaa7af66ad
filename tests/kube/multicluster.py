"""Several separate test control planes, one per party, and the checks that no party
holds another party's credentials.

Each party (the coordinator, each member) gets its own `KubeCluster` (etcd, API server,
controller-manager, node agent) and its own operator process, started with a clean
environment that names only its own cluster's kubeconfig. What a party may learn about
another is its public signing key; the scan here looks for anything else: CA
certificates, client certificates and keys, kubeconfigs, ServiceAccount tokens, API
server addresses and private signing keys, in every object of every cluster and in the
store, and in each operator's environment, command line, open files and connections.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store import ObjectStore
from tests.kube.client import ApiError, KubeClient, Obj
from tests.kube.cluster import REPO_ROOT, ClusterError, KubeCluster
from tests.kube.proc import die_with_parent
from tests.kube.tapestry_env import OperatorProcess
from tests.ports import free_port

MULTI_EXAMPLE = REPO_ROOT / "examples" / "multi-cluster"
COORDINATOR_EXAMPLE = MULTI_EXAMPLE / "coordinator"
PARTICIPANT_EXAMPLE = MULTI_EXAMPLE / "participant"


# -- clusters ---------------------------------------------------------------------------


class ClusterSet:
    """Control planes started side by side, each from a thread that lives until `stop`.

    The components die with the thread that spawned them (PR_SET_PDEATHSIG), so each
    cluster gets its own long-lived thread: starting them in parallel saves most of the
    start-up time, and a killed test session still leaves no servers behind."""

    def __init__(self, bin_dir: Path, names: Iterable[str]) -> None:
        self.clusters: dict[str, KubeCluster] = {}
        self._errors: dict[str, BaseException] = {}
        self._started: dict[str, threading.Event] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        for name in names:
            work_dir = Path(tempfile.mkdtemp(prefix=f"tapestry-kube-{name}-"))
            self.clusters[name] = KubeCluster(bin_dir, work_dir)
            self._started[name] = threading.Event()

    def _run(self, name: str) -> None:
        cluster = self.clusters[name]
        try:
            cluster.start()  # stops what it started when it fails
        except BaseException as err:
            self._errors[name] = err
            self._started[name].set()
            return
        self._started[name].set()
        self._stop.wait()
        cluster.stop()

    def start(self, timeout: float = 240.0) -> ClusterSet:
        """Start every cluster; raise ClusterError (after stopping all) if one fails."""
        for name in self.clusters:
            thread = threading.Thread(target=self._run, args=(name,), name=f"cluster-{name}")
            thread.start()
            self._threads.append(thread)
        for name, started in self._started.items():
            if not started.wait(timeout):
                self._errors.setdefault(name, ClusterError(f"not up after {timeout:.0f}s"))
        if self._errors:
            self.stop()
            detail = "; ".join(f"{n}: {e}" for n, e in self._errors.items())
            raise ClusterError(f"could not start every party's cluster: {detail}")
        return self

    def stop(self) -> None:
        """Stop every cluster (idempotent) and remove the work dirs unless asked to keep."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        for cluster in self.clusters.values():
            cluster.stop()  # for a start that timed out in its thread; a no-op otherwise
            if os.environ.get("TAPESTRY_KUBE_KEEP") != "1":
                cluster.remove()


# -- the operator with nothing but its own kubeconfig -------------------------------------


@dataclass
class IsolatedOperator(OperatorProcess):
    """The operator started from a clean environment: KUBECONFIG names its own cluster,
    HOME and the working directory are an empty folder of its own (no ~/.kube/config),
    and no KUBERNETES_SERVICE_* variables from the test host leak in (the client would
    prefer an in-cluster config). It dies with the test session."""

    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tapestry-op-")))

    def start(self) -> IsolatedOperator:
        self.home.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "tapestry_operator", "--role", self.role]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        args += ["--liveness", f"http://127.0.0.1:{free_port()}/healthz", "--metrics-port", "0"]
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "TMPDIR": str(self.home),
            "LANG": "C.UTF-8",
            "KUBECONFIG": str(self.kubeconfig),
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*die_with_parent(), *args], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=env, cwd=self.home, start_new_session=True,
            )  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None and self.proc.poll() is None, "the operator is not running"
        return self.proc.pid


# -- manifests: what each party applies, with only public keys from the others ------------


def load_docs(folder: Path) -> list[Obj]:
    return [
        doc for p in sorted(folder.glob("*.yaml")) for doc in yaml.safe_load_all(p.read_text())
        if doc
    ]  # fmt: skip


def _copy(doc: Obj) -> Obj:
    copied: Obj = yaml.safe_load(yaml.safe_dump(doc))
    return copied


def render_coordinator(
    docs: Iterable[Obj],
    member_keys: Mapping[str, str],
    *,
    endpoint: str,
    bucket: str,
    round_defaults: Mapping[str, Any] | None = None,
) -> list[Obj]:
    """The coordinator's manifests with the members' public key texts (all the
    coordinator learns about them), the store's endpoint and bucket."""
    out = []
    for doc in map(_copy, docs):
        spec = doc.get("spec", {})
        if doc["kind"] == "Federation":
            names = [m["name"] for m in spec["members"]]
            assert sorted(names) == sorted(member_keys), (names, sorted(member_keys))
            for member in spec["members"]:
                member["publicKey"] = member_keys[member["name"]]
            spec["roundDefaults"].update(round_defaults or {})
            spec["store"].update(endpoint=endpoint, bucket=bucket)
        out.append(doc)
    return out


def render_participant(
    docs: Iterable[Obj],
    member: str,
    coordinator_key: str,
    *,
    endpoint: str,
    bucket: str,
    poll_interval: str | None = None,
) -> list[Obj]:
    """One member's manifests: its name, the coordinator's public key text (all it
    learns about the coordinator), the store's endpoint and bucket."""
    out = []
    for doc in map(_copy, docs):
        if doc["kind"] == "Participant":
            spec = doc["spec"]
            doc["metadata"]["name"] = member
            spec["coordinatorPublicKey"] = coordinator_key
            spec["store"].update(endpoint=endpoint, bucket=bucket)
            if poll_interval:
                spec["pollInterval"] = poll_interval
        out.append(doc)
    return out


# -- what a party must not find of another's --------------------------------------------


def compact(data: bytes) -> bytes:
    """Without whitespace, so a PEM body matches however it is wrapped."""
    return b"".join(data.split())


def _pem_bodies(data: bytes) -> list[bytes]:
    blocks = re.findall(rb"-----BEGIN [A-Z0-9 ]+-----(.*?)-----END [A-Z0-9 ]+-----", data, re.S)
    return [compact(b) for b in blocks]


@dataclass(frozen=True)
class Secret:
    """One credential of one party, in every form it could be copied in."""

    owner: str
    what: str
    forms: tuple[bytes, ...]

    @classmethod
    def of_file(cls, owner: str, what: str, path: Path) -> Secret:
        data = path.read_bytes()
        # as is; as a kubeconfig's *-data field; each PEM block's base64 body
        forms = [compact(data), base64.b64encode(data), *_pem_bodies(data)]
        return cls(owner, what, tuple(f for f in forms if len(f) >= 16))

    @classmethod
    def of_signing_key(cls, owner: str, key: SigningKey) -> Secret:
        pem = key.private_pem()
        raw = serialization.load_pem_private_key(pem, None).private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )  # fmt: skip
        forms = [*_pem_bodies(pem), base64.b64encode(pem), base64.b64encode(raw),
                 raw.hex().encode(), raw]  # fmt: skip
        return cls(owner, f"private signing key of {key.key_id}", tuple(map(compact, forms)))

    @classmethod
    def of_text(cls, owner: str, what: str, text: str) -> Secret:
        return cls(owner, what, (compact(text.encode()),))

    def found_in(self, haystack: Haystack) -> bool:
        return any(form in haystack.compact for form in self.forms)


@dataclass(frozen=True)
class ClusterIdentity:
    """What identifies and authenticates one party's cluster: its CA (and every
    certificate and key it issued, the API server's, the admin's, the controllers'), the
    ServiceAccount token signing key, the kubeconfigs, the API server's address and the
    folder all of it lives in."""

    owner: str
    ca: x509.Certificate
    sa_public_key: ec.EllipticCurvePublicKey
    secrets: tuple[Secret, ...]

    @classmethod
    def of(cls, owner: str, cluster: KubeCluster) -> ClusterIdentity:
        pki = cluster.control_plane.pki.dir
        found = [
            Secret.of_file(owner, f"{p.name} of {owner}'s control plane", p)
            for p in sorted(pki.iterdir()) if p.is_file()
        ]  # fmt: skip
        found += [
            Secret.of_file(owner, f"{p.name} of {owner}'s cluster", p)
            for p in sorted(cluster.work_dir.glob("*.kubeconfig"))
        ]
        found.append(Secret.of_text(owner, f"{owner}'s API server address", cluster.server))
        found.append(Secret.of_text(owner, f"{owner}'s cluster folder", str(cluster.work_dir)))
        ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
        sa_public = serialization.load_pem_public_key((pki / "sa.pub").read_bytes())
        assert isinstance(sa_public, ec.EllipticCurvePublicKey)
        names = {p.name for p in pki.iterdir()}
        assert {"ca.crt", "ca.key", "admin.crt", "admin.key", "sa.key"} <= names, names
        return cls(owner, ca, sa_public, tuple(found))

    @property
    def ca_secret(self) -> Secret:
        return next(s for s in self.secrets if s.what.startswith("ca.crt "))

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether this party's CA signed `cert` (the CAs share a subject name, so the
        signature decides)."""
        try:
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def signed_token(self, token: str) -> bool:
        """Whether this party's ServiceAccount key signed the JWT `token`."""
        try:
            header, payload, signature = token.split(".")
            raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        except (ValueError, binascii.Error):
            return False
        if len(raw) != 64:  # ES256: r || s, 32 bytes each
            return False
        r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        try:
            self.sa_public_key.verify(
                encode_dss_signature(r, s), f"{header}.{payload}".encode(),
                ec.ECDSA(hashes.SHA256()),
            )  # fmt: skip
        except InvalidSignature:
            return False
        return True


# -- haystacks: every object of a cluster, every object of the store ----------------------

_BASE64 = re.compile(r"^[A-Za-z0-9+/\r\n]+={0,2}$")
_JWT = re.compile(rb"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)


@dataclass
class Haystack:
    """Where one thing was found: a description and all its bytes, with every string
    that looks like base64 also decoded (Secret data, *-data kubeconfig fields)."""

    where: str
    raw: bytes
    compact: bytes = b""

    def __post_init__(self) -> None:
        self.compact = compact(self.raw)

    @classmethod
    def of_object(cls, where: str, obj: Any) -> Haystack:
        parts: list[bytes] = []
        _strings(obj, parts)
        return cls(where, b"\n".join(parts))

    def tokens(self) -> list[str]:
        return [t.decode() for t in _JWT.findall(self.raw)]

    def certificates(self) -> list[x509.Certificate]:
        certs = []
        for pem in _CERT.findall(self.raw):
            try:
                certs.append(x509.load_pem_x509_certificate(pem))
            except ValueError:
                continue
        return certs


def _strings(value: Any, out: list[bytes]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.append(str(k).encode())
            _strings(v, out)
    elif isinstance(value, list):
        for v in value:
            _strings(v, out)
    elif isinstance(value, str):
        out.append(value.encode())
        if len(value) >= 16 and _BASE64.match(value):
            with contextlib.suppress(binascii.Error, ValueError):
                out.append(base64.b64decode(value, validate=False))
    elif value is not None:
        out.append(str(value).encode())


def listable_resources(client: KubeClient) -> list[str]:
    """The list path of every resource the API server serves (core and every group's
    preferred version), subresources aside: the whole content of a cluster."""
    paths = []
    groups: list[str] = ["/api/v1"]
    for group in client.get("/apis").get("groups", []):
        groups.append(f"/apis/{group['preferredVersion']['groupVersion']}")
    for base in groups:
        for res in client.get(base).get("resources", []):
            if "/" not in res["name"] and "list" in res.get("verbs", []):
                paths.append(f"{base}/{res['name']}")
    return paths


def cluster_objects(client: KubeClient) -> Iterator[Haystack]:
    """Every object of every kind in every namespace, one haystack each."""
    for path in listable_resources(client):
        try:
            listed = client.get(path)
        except ApiError as err:
            if err.status in (404, 405):  # served in discovery, not listable after all
                continue
            raise
        for item in listed.get("items", []):
            meta = item.get("metadata", {})
            where = f"{path} {meta.get('namespace', '')}/{meta.get('name', '')}".replace(" /", " ")
            yield Haystack.of_object(where, item)


def store_objects(store: ObjectStore, prefix: str = "federations/") -> Iterator[Haystack]:
    for info in store.list(prefix):
        yield Haystack(f"store object {info.key}", store.get(info.key))


# -- a process's view: environment, command line, files, connections -------------------


@dataclass(frozen=True)
class ProcessView:
    pid: int
    environ: dict[str, str]
    cmdline: list[str]
    cwd: str
    open_files: list[str]
    remote_endpoints: set[tuple[str, int]]

    @classmethod
    def of(cls, pid: int) -> ProcessView:
        proc = Path(f"/proc/{pid}")
        environ = dict(
            e.split("=", 1) for e in proc.joinpath("environ").read_bytes().decode().split("\0")
            if "=" in e
        )  # fmt: skip
        cmdline = [a for a in proc.joinpath("cmdline").read_bytes().decode().split("\0") if a]
        files, sockets = [], set()
        for fd in proc.joinpath("fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            if m:
                sockets.add(m.group(1))
            else:
                files.append(target)
        return cls(
            pid, environ, cmdline, os.readlink(proc / "cwd"), files,
            _established(proc, sockets),
        )  # fmt: skip


def _established(proc: Path, inodes: set[str]) -> set[tuple[str, int]]:
    """The remote (address, port) of each established TCP connection among `inodes`."""
    out = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = proc.joinpath("net", table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "01" or cols[9] not in inodes:  # 01: ESTABLISHED
                continue
            address, port = cols[2].split(":")
            out.add((_address(address), int(port, 16)))
    return out


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ".".join(str(b) for b in reversed(raw))
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
    joined = b"".join(words)
    if joined[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped
        return ".".join(str(b) for b in joined[12:])
    return ":".join(joined[i : i + 2].hex() for i in range(0, 16, 2))
