"""Ed25519 signatures over a canonical encoding of protocol documents.

A signed document is a JSON object with a `signature` member:

    {"algorithm": "ed25519", "keyId": "<signer>", "value": "<base64>"}

The signed bytes are a domain tag, the document kind, and the canonical JSON of the
document without its `signature` (sorted keys, no whitespace, UTF-8). Documents carry
their own federation, round and participant; readers check those against where they
found the document, so a signature cannot be replayed into another round or name.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tapestry_protocol import rejections
from tapestry_protocol.files import atomic_write
from tapestry_protocol.rejections import Rejected

DOMAIN = b"tapestry-signature-v1\n"
ALGORITHM = "ed25519"
PUBLIC_KEY_PREFIX = "ed25519:"
# Name of the private key inside a Kubernetes Secret or a key directory.
SECRET_KEY_FILE = "signing.key"


def canonical_json(document: dict[str, Any]) -> bytes:
    """The one byte encoding that gets signed and stored."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _signed_bytes(document: dict[str, Any]) -> bytes:
    body = {k: v for k, v in document.items() if k != "signature"}
    return DOMAIN + str(body.get("kind", "")).encode() + b"\n" + canonical_json(body)


class SigningKey:
    """A signer's private key; never printed (repr hides the key material)."""

    def __init__(self, key_id: str, private_key: Ed25519PrivateKey) -> None:
        self.key_id = key_id
        self._key = private_key

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r}, public_key={self.public_key_text!r})"

    @classmethod
    def generate(cls, key_id: str) -> SigningKey:
        return cls(key_id, Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    @property
    def public_key_text(self) -> str:
        return public_key_to_text(self.public_key)

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, document: dict[str, Any]) -> dict[str, Any]:
        """Return a copy of `document` with a signature member added."""
        value = self._key.sign(_signed_bytes(document))
        signed = {k: v for k, v in document.items() if k != "signature"}
        signed["signature"] = {
            "algorithm": ALGORITHM,
            "keyId": self.key_id,
            "value": base64.b64encode(value).decode(),
        }
        return signed

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write `<id>.key` (mode 0600) and `<id>.pub` into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        private = directory / f"{self.key_id}.key"
        public = directory / f"{self.key_id}.pub"
        # The private key is write-once: an existing key is never replaced (FileExistsError).
        atomic_write(private, self.private_pem(), mode=0o600, exclusive=True)
        atomic_write(public, (self.public_key_text + "\n").encode())
        return private, public


def load_signing_key(key_id: str, source: Path | bytes) -> SigningKey:
    """Load a PEM private key from bytes, a file, or a directory (a mounted Secret)."""
    if isinstance(source, Path):
        path = source / SECRET_KEY_FILE if source.is_dir() else source
        try:
            source = path.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read signing key {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(source, password=None)
    except ValueError:
        raise ValueError(f"signing key for {key_id!r} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"signing key for {key_id!r} is not an Ed25519 key")
    return SigningKey(key_id, key)


def public_key_to_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode()


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """Parse `ed25519:<base64 of 32 raw bytes>`, the form used in plans and CRs."""
    text = text.strip()
    if not text.startswith(PUBLIC_KEY_PREFIX):
        raise ValueError(f"public key must start with {PUBLIC_KEY_PREFIX!r}")
    try:
        raw = base64.b64decode(text[len(PUBLIC_KEY_PREFIX) :], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ValueError("public key is not 32 bytes of base64 after 'ed25519:'") from None


def verify(document: dict[str, Any], signer: str, public_key: Ed25519PublicKey | str) -> None:
    """Raise Rejected unless `document` carries a valid signature by `signer`."""
    signature = document.get("signature")
    kind = document.get("kind", "document")
    if not isinstance(signature, dict) or "value" not in signature:
        raise Rejected(rejections.MISSING_SIGNATURE, f"{kind} is not signed")
    if signature.get("algorithm") != ALGORITHM:
        raise Rejected(
            rejections.BAD_SIGNATURE,
            f"{kind} signature algorithm {signature.get('algorithm')!r} is not {ALGORITHM}",
        )
    if signature.get("keyId") != signer:
        raise Rejected(
            rejections.UNKNOWN_SIGNER,
            f"{kind} is signed by {signature.get('keyId')!r}, expected {signer!r}",
        )
    if isinstance(public_key, str):
        public_key = public_key_from_text(public_key)
    try:
        value = base64.b64decode(str(signature["value"]), validate=True)
        public_key.verify(value, _signed_bytes(document))
    except (InvalidSignature, ValueError):
        raise Rejected(
            rejections.BAD_SIGNATURE, f"{kind} signature by {signer!r} does not verify"
        ) from None
