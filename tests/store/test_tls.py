"""TLS to real MinIO with certificates the test CA issues: a wrong CA, an expired
certificate and a certificate for another host each fail at once, with an error that
says which of the three it is and what to do, and no secret in it.

One MinIO serves every case: it starts with a valid certificate (so that it can be
seen ready), and each test swaps in the certificate it needs (MinIO reloads its
certificates on SIGHUP) and puts the valid one back afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from tapestry_protocol.store import RetryPolicy, StoreError, StoreUnavailable, open_store
from tapestry_protocol.store.tls import EXPIRED, UNTRUSTED, WRONG_HOST, TLSFailure
from tests.certs import CertificateAuthority, CertPair
from tests.s3servers import S3Server, skip_if_s3_disabled, start_minio

pytestmark = pytest.mark.s3
#: Would take at least 10 s if a certificate error were (wrongly) retried.
SLOW_RETRY = RetryPolicy(attempts=3, base_delay=5.0, max_delay=5.0)
HOST = "127.0.0.1"


@dataclass
class TLSMinio:
    server: S3Server
    certs: Path  # MinIO's --certs-dir
    ca: CertificateAuthority
    valid: CertPair

    @property
    def port(self) -> int:
        return int(self.server.endpoint.rsplit(":", 1)[1])

    def url(self, host: str = HOST, ca_file: Path | None = None) -> str:
        query = f"endpoint=https://{host}:{self.port}"
        return f"s3://secure/p?{query}" + (f"&ca_file={ca_file}" if ca_file else "")

    @contextmanager
    def serving(self, pair: CertPair) -> Iterator[None]:
        """MinIO presents `pair` inside the block, the valid certificate after it."""
        self._serve(pair)
        try:
            yield
        finally:
            self._serve(self.valid)

    def _serve(self, pair: CertPair) -> None:
        for source, name in ((pair.cert, "public.crt"), (pair.key, "private.key")):
            shutil.copyfile(source, self.certs / f".{name}.new")
            os.replace(self.certs / f".{name}.new", self.certs / name)
        assert self.server.proc is not None
        self.server.proc.send_signal(signal.SIGHUP)
        want = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pem = ssl.get_server_certificate((HOST, self.port), timeout=5)
            if x509.load_pem_x509_certificate(pem.encode()) == want:
                return
            time.sleep(0.2)
        raise AssertionError(f"MinIO did not start presenting {pair.cert}")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSMinio]:
    skip_if_s3_disabled()
    root = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority(root / "authority")
    valid = ca.issue("valid", HOST, ips=(HOST,), dns=("localhost",), server=True)
    certs = root / "certs"
    (certs / "CAs").mkdir(parents=True)
    shutil.copyfile(ca.pair.cert, certs / "CAs" / "ca.crt")
    shutil.copyfile(valid.cert, certs / "public.crt")
    shutil.copyfile(valid.key, certs / "private.key")
    server = start_minio(root / "minio", certs_dir=certs)
    try:
        with server.open("secure", "p") as store:
            store.put("k", b"over tls", if_absent=True)
        yield TLSMinio(server, certs, ca, valid)
    finally:
        server.stop()


def _refused(tls: TLSMinio, url: str) -> TLSFailure:
    """The error a read through `url` ends with: at once, final, and without secrets."""
    store = open_store(url, credentials=tls.server.credentials, retry=SLOW_RETRY)
    started = time.monotonic()
    with pytest.raises(StoreError) as excinfo:
        store.get("k")
    assert time.monotonic() - started < 5, "a certificate error must not be retried"
    error = excinfo.value
    assert isinstance(error, TLSFailure), f"{type(error).__name__}: {error}"
    assert not isinstance(error, StoreUnavailable)
    assert error.key == "k"
    text = str(error)
    assert tls.server.secret_key not in text and tls.server.access_key not in text
    assert "\n" not in text
    return error


def test_the_valid_certificate_works(tls: TLSMinio) -> None:
    store = open_store(tls.url(ca_file=tls.ca.pair.cert), credentials=tls.server.credentials)
    assert store.get("k") == b"over tls"


def test_a_certificate_from_another_ca(tls: TLSMinio, tmp_path: Path) -> None:
    other = CertificateAuthority(tmp_path / "other", "another-ca")
    error = _refused(tls, tls.url(ca_file=other.pair.cert))
    assert error.problem == UNTRUSTED
    assert (
        f"the server's certificate (issued by tapestry-test-ca) is not signed by the CA in "
        f"ca_file={other.pair.cert}" in str(error)
    )
    assert "set ca_file to the PEM file of the CA that issued the server's certificate" in str(
        error
    )


def test_no_ca_file_names_the_bundle_in_use(tls: TLSMinio, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    error = _refused(tls, tls.url())
    assert error.problem == UNTRUSTED
    assert "not signed by the CA in the certifi CA bundle (no ca_file is set)" in str(error)


def test_an_expired_certificate(tls: TLSMinio, tmp_path: Path) -> None:
    expired = tls.ca.issue("expired", HOST, ips=(HOST,), server=True, expired=True)
    until = x509.load_pem_x509_certificate(expired.cert.read_bytes()).not_valid_after_utc
    with tls.serving(expired):
        error = _refused(tls, tls.url(ca_file=tls.ca.pair.cert))
    assert error.problem == EXPIRED
    assert (
        f"the server's certificate for {HOST} expired on "
        f"{until:%Y-%m-%d %H:%M:%S} UTC; renew the server's certificate" in str(error)
    )


def test_a_certificate_for_another_host_name(tls: TLSMinio) -> None:
    elsewhere = tls.ca.issue(
        "elsewhere", "storage.example.org", dns=("storage.example.org", "s3.example.org"),
        server=True,
    )  # fmt: skip
    with tls.serving(elsewhere):
        error = _refused(tls, tls.url(ca_file=tls.ca.pair.cert))
    assert error.problem == WRONG_HOST
    assert (
        f"the server's certificate is for storage.example.org, s3.example.org, not {HOST}; "
        f"use an endpoint with one of those names, or reissue the certificate with {HOST} "
        "in its subjectAltName" in str(error)
    )


def test_a_certificate_for_an_address_reached_by_name(tls: TLSMinio) -> None:
    """The valid certificate is for 127.0.0.1 and localhost; one for the address only
    refuses `localhost` (a DNS name, where the case above was an IP address)."""
    address_only = tls.ca.issue("address", HOST, ips=(HOST,), server=True)
    with tls.serving(address_only):
        error = _refused(tls, tls.url(host="localhost", ca_file=tls.ca.pair.cert))
    assert error.problem == WRONG_HOST
    assert f"the server's certificate is for {HOST}, not localhost" in str(error)
