"""Say which TLS check failed when the store's certificate is refused, and what to do.

OpenSSL's own sentence ("certificate verify failed: unable to get local issuer
certificate") leaves the user to guess among three different mistakes: a CA that did
not sign the server's certificate, a certificate that has expired, and a certificate for
another host name. `tls_failure` tells them apart from the verification code and, to
name dates and host names, reads the certificate the server presents (one extra
handshake that checks nothing and sends nothing). None of these is transient, so the
error is final and never retried.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from urllib.parse import urlsplit

import certifi
from cryptography import x509
from cryptography.x509.oid import NameOID

from .base import StoreError

# OpenSSL X509_V_ERR_* codes, grouped by what the user has to fix.
_UNTRUSTED = frozenset({2, 18, 19, 20, 21})  # no trusted CA signed the chain
_EXPIRED, _NOT_YET_VALID = 10, 9
_NAME_MISMATCH = frozenset({62, 64})  # hostname / IP address mismatch

UNTRUSTED, EXPIRED, NOT_YET_VALID, WRONG_HOST, HANDSHAKE = (
    "untrusted-ca", "expired", "not-yet-valid", "wrong-host", "handshake",
)  # fmt: skip

#: How long the extra handshake that reads the server's certificate may take.
PEEK_TIMEOUT = 5.0


class TLSFailure(StoreError):
    """The store's TLS certificate was refused; `problem` says which check failed (one
    of the constants above) and the message what to do. Never transient."""

    def __init__(self, message: str, problem: str, key: str | None = None) -> None:
        super().__init__(message, key)
        self.problem = problem


def trust_source(ca_certs: str | None) -> str:
    """Where the CAs a client trusts come from, as the user configured it."""
    if ca_certs is None or ca_certs == certifi.where():
        return "the certifi CA bundle (no ca_file is set)"
    if ca_certs == os.environ.get("SSL_CERT_FILE"):
        return f"SSL_CERT_FILE={ca_certs}"
    return f"ca_file={ca_certs}"


def tls_failure(
    error: BaseException, endpoint: str, ca_certs: str | None, where: str, key: str | None
) -> TLSFailure:
    """The TLSFailure for an SSL error talking to `endpoint` (https://host[:port])."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    verify = _verification_error(error)
    code = getattr(verify, "verify_code", None) if verify is not None else None
    if verify is not None and code is None and _is_name_mismatch(verify):
        code = 62
    if verify is None or code is None:
        reason = getattr(error, "reason", None) or str(error)
        return TLSFailure(
            f"TLS failed for {where}: {reason} (is the endpoint an HTTPS "
            "server, and the URL's scheme right?)",
            HANDSHAKE,
            key,
        )
    cert = _peek(host, parts.port or 443)
    said = getattr(verify, "verify_message", "") or str(verify)
    if code in _UNTRUSTED:
        issued = f" (issued by {_cn(cert.issuer)})" if cert is not None else ""
        return TLSFailure(
            f"TLS failed for {where}: the server's certificate{issued} is not "
            f"signed by the CA in {trust_source(ca_certs)} ({said}); set ca_file to the PEM "
            "file of the CA that issued the server's certificate",
            UNTRUSTED,
            key,
        )
    if code == _EXPIRED:
        when = f" on {_date(cert.not_valid_after_utc)}" if cert is not None else ""
        return TLSFailure(
            f"TLS failed for {where}: the server's certificate"
            f"{_for(cert)} expired{when}; renew the server's certificate (or, if it is "
            "still valid, check this machine's clock)",
            EXPIRED,
            key,
        )
    if code == _NOT_YET_VALID:
        when = f" until {_date(cert.not_valid_before_utc)}" if cert is not None else ""
        return TLSFailure(
            f"TLS failed for {where}: the server's certificate"
            f"{_for(cert)} is not valid{when}; check the clocks of this machine and the server",
            NOT_YET_VALID,
            key,
        )
    if code in _NAME_MISMATCH:
        names = ", ".join(_names(cert)) if cert is not None else "another name"
        return TLSFailure(
            f"TLS failed for {where}: the server's certificate is for "
            f"{names}, not {host}; use an endpoint with one of those names, or reissue the "
            f"certificate with {host} in its subjectAltName",
            WRONG_HOST,
            key,
        )
    return TLSFailure(
        f"TLS failed for {where}: the server's certificate is refused "
        f"({said}, OpenSSL code {code})",
        HANDSHAKE,
        key,
    )


def _verification_error(error: BaseException) -> BaseException | None:
    """The certificate verification error inside urllib3's wrappers, if any."""
    seen: set[int] = set()
    stack: list[BaseException] = [error]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError) or _is_name_mismatch(e):
            return e
        stack += [a for a in e.args if isinstance(a, BaseException)]
        stack += [c for c in (e.__cause__, e.__context__) if c is not None]
    return None


def _is_name_mismatch(error: BaseException) -> bool:
    """urllib3's own host name check (used when OpenSSL's is not) raises this."""
    return type(error).__name__ == "CertificateError" and "match" in str(error)


def _peek(host: str, port: int) -> x509.Certificate | None:
    """The certificate the server presents, read without verifying anything."""
    try:
        pem = ssl.get_server_certificate((host, port), timeout=PEEK_TIMEOUT)
        return x509.load_pem_x509_certificate(pem.encode())
    except (OSError, ValueError):
        return None


def _cn(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else name.rfc4514_string() or "an unnamed issuer"


def _names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses the certificate is for (its common name if none)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [_cn(cert.subject)]
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    return names or [_cn(cert.subject)]


def _for(cert: x509.Certificate | None) -> str:
    return "" if cert is None else f" for {', '.join(_names(cert))}"


def _date(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
