"""Least-privilege store identities: one per member, one for the coordinator.

The policy documents are plain IAM JSON (version 2012-10-17), so the same documents work
on MinIO and on AWS S3 (and on other servers with IAM-style policies). What each member
may do, key by key (`R` is `arn:aws:s3:::<bucket>/<layout.root>`):

- read (GetObject, which also covers HeadObject) the coordinator's objects: `R bases/*`,
  `R optimizer/*` and each round's `plan.json`, `close.json` and `result.json`;
- read and write (GetObject, PutObject, AbortMultipartUpload, ListMultipartUploadParts)
  its own `R rounds/??????/updates/<member>/*` and `R rounds/??????/receipts/<member>/*`;
- GetBucketLocation, which the SDK asks when no region is configured (AWS).

Nothing else: no listing, no DeleteObject, no other member's prefix. A round is always
six digits (`layout.round_dir`), so the round segment is six `?` wildcards rather than
`*`: `*` also matches `/`, and `rounds/*/updates/alice/*` would match
`rounds/000001/updates/bob/x/updates/alice/y`, inside bob's prefix. With `?????? `
a key matching alice's pattern has `/updates/alice/` at a fixed place, which no key of
bob's (`rounds/NNNNNN/updates/bob/...`) has. The trailing `<member>/` keeps `alice2`
out of `alice`'s prefix.

`MinioIdentities` provisions these on MinIO through its admin API: a MinIO user per
identity with the policy attached, and a MinIO service account (an access key of that
user, which inherits its policy) per issued key, so a new key can overlap the old one
during rotation. docs/store-access.md has the model, the CLI and the AWS recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import MinioAdmin
from minio.credentials.providers import StaticProvider
from minio.crypto import decrypt, encrypt
from minio.error import MinioAdminException
from minio.minioadmin import _COMMAND
from urllib3.exceptions import HTTPError, MaxRetryError, SSLError

from tapestry_protocol import exchange
from tapestry_protocol.layout import MAX_ROUND, Layout, round_dir, validate_name

from .base import AccessDenied, StoreError, StoreUnavailable
from .s3 import S3Credentials

#: Identity name of the coordinator (the name its documents are signed under).
COORDINATOR = exchange.COORDINATOR
VERSION = "2012-10-17"
#: MinIO user and policy names we create start with this, so others' users are left alone.
NAME_PREFIX = "tapestry."
#: One `?` per digit of a round directory (see the module docstring).
ROUND = "?" * len(round_dir(MAX_ROUND))
#: What a writer needs on the keys it may write: PutObject for single and multipart
#: uploads (CreateMultipartUpload, UploadPart, CompleteMultipartUpload are PutObject),
#: AbortMultipartUpload to clean up a failed upload, ListMultipartUploadParts to resume.
WRITE_ACTIONS = ("s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts")

T = TypeVar("T")


def _arn(bucket: str, key_pattern: str = "") -> str:
    return f"arn:aws:s3:::{bucket}/{key_pattern}" if key_pattern else f"arn:aws:s3:::{bucket}"


def coordinator_objects(layout: Layout) -> list[str]:
    """Key patterns of what only the coordinator writes: bases, optimizer state, plans,
    close records and results."""
    rounds = f"{layout.rounds_prefix()}{ROUND}/"
    return [
        f"{layout.root}bases/*",
        f"{layout.root}optimizer/*",
        f"{rounds}plan.json",
        f"{rounds}close.json",
        f"{rounds}result.json",
    ]


def member_objects(layout: Layout, member: str) -> list[str]:
    """Key patterns of what only `member` writes: its updates and receipts."""
    validate_name("participant", member)
    rounds = f"{layout.rounds_prefix()}{ROUND}/"
    return [f"{rounds}updates/{member}/*", f"{rounds}receipts/{member}/*"]


def _check(bucket: str) -> str:
    if not bucket or any(c in bucket for c in "/*?"):
        raise ValueError(f"bucket name {bucket!r} is not valid in a policy")
    return bucket


def member_policy(layout: Layout, bucket: str, member: str) -> dict[str, Any]:
    """What one member may do: read the coordinator's objects, write its own prefixes."""
    if member == COORDINATOR:
        raise ValueError(f"{COORDINATOR!r} is the coordinator's identity, not a member's")
    _check(bucket)
    return {
        "Version": VERSION,
        "Statement": [
            {
                "Sid": "ReadCoordinatorObjects",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [_arn(bucket, k) for k in coordinator_objects(layout)],
            },
            {
                "Sid": "WriteOwnUpdatesAndReceipts",
                "Effect": "Allow",
                "Action": ["s3:GetObject", *WRITE_ACTIONS],
                "Resource": [_arn(bucket, k) for k in member_objects(layout, member)],
            },
            {
                "Sid": "FindBucketRegion",
                "Effect": "Allow",
                "Action": ["s3:GetBucketLocation"],
                "Resource": [_arn(bucket)],
            },
        ],
    }


def coordinator_policy(layout: Layout, bucket: str) -> dict[str, Any]:
    """What the coordinator may do: read and list its federation, write its own objects."""
    _check(bucket)
    return {
        "Version": VERSION,
        "Statement": [
            {
                "Sid": "ListFederation",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [_arn(bucket)],
                "Condition": {"StringLike": {"s3:prefix": [f"{layout.root}*"]}},
            },
            {
                "Sid": "ReadFederation",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [_arn(bucket, f"{layout.root}*")],
            },
            {
                "Sid": "WriteCoordinatorObjects",
                "Effect": "Allow",
                "Action": list(WRITE_ACTIONS),
                "Resource": [_arn(bucket, k) for k in coordinator_objects(layout)],
            },
            {
                "Sid": "FindBucketRegion",
                "Effect": "Allow",
                "Action": ["s3:GetBucketLocation"],
                "Resource": [_arn(bucket)],
            },
        ],
    }


def policy_for(layout: Layout, bucket: str, name: str) -> dict[str, Any]:
    """The coordinator's policy for COORDINATOR, else the member's."""
    if name == COORDINATOR:
        return coordinator_policy(layout, bucket)
    return member_policy(layout, bucket, name)


# --- provisioning on MinIO -------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """One issued access key of an identity. The secret never shows in repr/str."""

    name: str
    access_key: str
    secret_key: str = field(repr=False)

    def credentials(self) -> S3Credentials:
        return S3Credentials(self.access_key, self.secret_key)

    def __str__(self) -> str:
        return f"{self.name} ({self.access_key})"


def scope(layout: Layout, bucket: str) -> str:
    """`tapestry.<hash>.<federation>.`: the start of every MinIO user and policy name of
    this federation in this bucket (and layout prefix). '.' is not in DNS labels, so
    federation `a` with member `b-c` and federation `a-b` with member `c` never meet,
    and the hash keeps two buckets' (or prefixes') federations of the same name apart."""
    digest = hashlib.sha256(f"{bucket}/{layout.root}".encode()).hexdigest()[:8]
    return f"{NAME_PREFIX}{digest}.{layout.federation}."


def user_name(layout: Layout, bucket: str, name: str) -> str:
    """The MinIO user (and policy) name of an identity."""
    if name != COORDINATOR:
        validate_name("participant", name)
    return scope(layout, bucket) + name


class MinioIdentities:
    """Creates, rotates and removes a federation's identities on one MinIO server.

    The admin credentials are used only here, to provision; they never reach a pod.
    Every call blocks on the admin API; callers in an event loop run them in threads.
    """

    def __init__(
        self,
        endpoint: str,
        admin: S3Credentials,
        *,
        bucket: str,
        ca_file: str | None = None,
        region: str | None = None,
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"MinIO endpoint must look like http(s)://host:port, not {endpoint!r}")
        if ca_file is not None and not Path(ca_file).is_file():
            raise ValueError(f"ca_file {ca_file} does not exist")
        _check(bucket)
        self.endpoint = f"{parts.scheme}://{parts.netloc}"
        self.bucket = bucket
        self._secret = admin.secret_key
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10.0, read=60.0),
            cert_reqs="CERT_REQUIRED",
            ca_certs=str(ca_file or os.environ.get("SSL_CERT_FILE") or certifi.where()),
            retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[502, 503, 504]),
        )
        self._admin = MinioAdmin(
            endpoint=parts.netloc,
            credentials=StaticProvider(admin.access_key, admin.secret_key, admin.session_token),
            region=region or "",
            secure=parts.scheme == "https",
            http_client=http,
        )

    def __repr__(self) -> str:
        return f"MinioIdentities({self.endpoint!r}, bucket={self.bucket!r})"

    # -- the identity -----------------------------------------------------------------

    def provision(self, layout: Layout, name: str) -> Identity:
        """Create or update the identity's user and policy, and issue a NEW access key."""
        user = user_name(layout, self.bucket, name)
        document = policy_for(layout, self.bucket, name)
        what = f"identity {name!r} of federation {layout.federation}"
        self._do(
            f"write the policy of {what}", lambda: self._admin.policy_add(user, policy=document)
        )
        if not self._user_exists(user, what):
            # The user's own secret is never used (keys are service accounts) and is dropped.
            secret = secrets.token_urlsafe(30)
            self._do(f"create the user of {what}", lambda: self._admin.user_add(user, secret))
        self._attach(user, what)
        return Identity(name, *self._new_key(user, layout, name, what))

    def keys(self, layout: Layout, name: str) -> list[str]:
        """The identity's access keys (none if it does not exist)."""
        user = user_name(layout, self.bucket, name)
        what = f"identity {name!r} of federation {layout.federation}"
        if not self._user_exists(user, what):
            return []
        text = self._do(f"list the keys of {what}", lambda: self._admin.list_service_account(user))
        accounts = json.loads(text or "{}").get("accounts") or []
        found = [a if isinstance(a, str) else a.get("accessKey", "") for a in accounts]
        return sorted(k for k in found if k)

    def revoke(self, layout: Layout, name: str, access_key: str) -> None:
        """Delete one access key of the identity; a key it does not have is left alone."""
        if access_key not in self.keys(layout, name):
            return
        what = f"key {access_key} of identity {name!r} of federation {layout.federation}"
        self._do(
            f"revoke {what}",
            lambda: self._admin.delete_service_account(access_key),
            missing_ok=True,
        )

    def remove(self, layout: Layout, name: str) -> None:
        """Delete the identity's keys, user and policy (nothing to do if already gone)."""
        user = user_name(layout, self.bucket, name)
        what = f"identity {name!r} of federation {layout.federation}"
        for key in self.keys(layout, name):
            self._do(
                f"revoke key {key} of {what}",
                lambda key=key: self._admin.delete_service_account(key),  # type: ignore[misc]
                missing_ok=True,
            )
        self._do(f"remove the user of {what}", lambda: self._admin.user_remove(user), True)
        self._do(f"remove the policy of {what}", lambda: self._admin.policy_remove(user), True)

    def names(self, layout: Layout) -> list[str]:
        """Identities this federation has on this server (members and the coordinator)."""
        head = scope(layout, self.bucket)
        text = self._do(f"list the users of federation {layout.federation}", self._admin.user_list)
        users = json.loads(text or "{}")
        return sorted(
            u[len(head) :] for u in users if u.startswith(head) and _name_ok(u[len(head) :])
        )

    # -- helpers ----------------------------------------------------------------------

    def _user_exists(self, user: str, what: str) -> bool:
        try:
            self._admin.user_info(user)
        except MinioAdminException as exc:
            if _admin_code(exc) == "XMinioAdminNoSuchUser":
                return False
            raise self._error(f"look up the user of {what}", exc) from None
        except (HTTPError, OSError) as exc:
            raise self._error(f"look up the user of {what}", exc) from None
        return True

    def _attach(self, user: str, what: str) -> None:
        try:
            self._admin.attach_policy([user], user=user)
        except MinioAdminException as exc:
            if _admin_code(exc) != "XMinioAdminPolicyChangeAlreadyApplied":
                raise self._error(f"attach the policy of {what}", exc) from None
        except (HTTPError, OSError) as exc:
            raise self._error(f"attach the policy of {what}", exc) from None

    def _new_key(self, user: str, layout: Layout, name: str, what: str) -> tuple[str, str]:
        """A service account of `user` (the Python SDK's call cannot name the target user,
        so this sends the admin API's request itself). It inherits the user's policy."""
        body = json.dumps(
            {
                "status": "enabled",
                "targetUser": user,
                "description": f"tapestry federation {layout.federation}: {name}",
            }
        ).encode()

        def op() -> str:
            response = self._admin._url_open(
                method="PUT",
                command=_COMMAND.SERVICE_ACCOUNT_ADD,
                body=encrypt(body, self._secret),
                preload_content=False,
            )
            return decrypt(response, self._secret).decode()

        reply = json.loads(self._do(f"issue a key for {what}", op))
        creds = reply.get("credentials") or {}
        access, secret = creds.get("accessKey"), creds.get("secretKey")
        if not access or not secret:
            raise StoreError(f"MinIO at {self.endpoint} issued no key for {what}")
        return access, secret

    def _do(self, what: str, op: Callable[[], T], missing_ok: bool = False) -> T | Any:
        try:
            return op()
        except MinioAdminException as exc:
            if missing_ok and _admin_code(exc) in _MISSING:
                return ""
            raise self._error(what, exc) from None
        except (HTTPError, OSError) as exc:
            raise self._error(what, exc) from None

    def _error(self, what: str, exc: BaseException) -> StoreError:
        """A one-line StoreError naming the endpoint and MinIO's code, never a secret."""
        if isinstance(exc, MaxRetryError) and exc.reason is not None:
            exc = exc.reason
        where = f"MinIO admin API at {self.endpoint}"
        if isinstance(exc, MinioAdminException):
            code, message = _admin_code(exc), _admin_message(exc)
            detail = f"{code}: {message}" if message else code
            if exc._code in ("401", "403") or code in _ADMIN_DENIED:
                return AccessDenied(
                    f"{where} refused to {what} ({detail}); the admin credentials need "
                    "MinIO admin rights (users, policies, service accounts)"
                )
            if exc._code.startswith("5"):
                return StoreUnavailable(f"{where} could not {what} ({detail})")
            return StoreError(f"{where} could not {what} ({detail})")
        if isinstance(exc, SSLError):
            return StoreError(f"TLS with {where} failed to {what}: {exc}")
        return StoreUnavailable(f"{where} is unreachable to {what}: {type(exc).__name__}: {exc}")


_MISSING = {
    "XMinioAdminNoSuchUser",
    "XMinioAdminNoSuchPolicy",
    "XMinioAdminNoSuchServiceAccount",
    "XMinioAdminServiceAccountNotFound",
}
_ADMIN_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def _name_ok(name: str) -> bool:
    try:
        validate_name("participant", name)
    except ValueError:
        return False
    return True


def _admin_body(exc: MinioAdminException) -> dict[str, Any]:
    try:
        body = json.loads(exc._body)
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _admin_code(exc: MinioAdminException) -> str:
    return str(_admin_body(exc).get("Code") or exc._code)


def _admin_message(exc: MinioAdminException) -> str:
    return str(_admin_body(exc).get("Message") or "")[:300]
