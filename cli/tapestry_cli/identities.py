"""`tapestry store identities`: least-privilege store keys for a federation's parties.

The admin credentials given here are used only to provision; each member gets its own
key (written to `--out DIR/<name>/{accessKey,secretKey}`, mode 0600) to hand over out of
band, and the coordinator gets one of its own. Output names identities and access keys,
never a secret key. docs/store-access.md explains the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tapestry_cli.errors import UsageError

if TYPE_CHECKING:
    from tapestry_protocol.layout import Layout
    from tapestry_protocol.store import S3Credentials
    from tapestry_protocol.store.access import Identity, MinioIdentities

STORE_HELP = "the federation's store: s3://bucket/prefix?endpoint=URL (MinIO for all but policy)"
ADMIN_HELP = (
    "directory with accessKey/secretKey files of a MinIO admin "
    "(default: TAPESTRY_S3_ACCESS_KEY/SECRET_KEY or AWS_* from the environment)"
)


def add_parser(store: Any) -> None:
    """Register `identities` under the `tapestry store` group."""
    from tapestry_cli.main import federation_name, participant_name

    group = store.add_parser(
        "identities",
        help="one scoped store key per member and one for the coordinator",
        description=__doc__.splitlines()[0],
    ).add_subparsers(metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser, admin: bool = True) -> None:
        p.add_argument("--store", help=STORE_HELP + " (default: from --federation-manifest)")
        p.add_argument(
            "--federation",
            type=federation_name,
            help="federation name (default: metadata.name of --federation-manifest)",
        )
        p.add_argument(
            "--federation-manifest",
            type=Path,
            help="Federation resource (YAML or JSON): its name, spec.store and spec.members",
        )
        if admin:
            p.add_argument("--admin-credentials-dir", type=Path, help=ADMIN_HELP)

    def who(p: argparse.ArgumentParser) -> None:
        one = p.add_mutually_exclusive_group(required=True)
        one.add_argument("--member", type=participant_name, help="the member")
        one.add_argument("--coordinator", action="store_true", help="the coordinator")

    sync = group.add_parser(
        "sync",
        help="create the identities of the listed members (and the coordinator), remove others",
    )
    common(sync)
    sync.add_argument(
        "--member",
        dest="members",
        action="append",
        type=participant_name,
        default=[],
        help="a member (repeat; default: spec.members of --federation-manifest)",
    )
    sync.add_argument("--out", type=Path, required=True, help="where new keys are written")
    sync.set_defaults(run=_sync)

    rotate = group.add_parser(
        "rotate", help="issue a new key, write it, then revoke the old ones (or --keep-old)"
    )
    common(rotate)
    who(rotate)
    rotate.add_argument("--out", type=Path, required=True, help="where the new key is written")
    rotate.add_argument(
        "--keep-old", action="store_true", help="leave the old keys working for a later revoke"
    )
    rotate.set_defaults(run=_rotate)

    revoke = group.add_parser("revoke", help="revoke one access key of an identity")
    common(revoke)
    who(revoke)
    revoke.add_argument("--access-key", required=True, help="the access key id to revoke")
    revoke.set_defaults(run=_revoke)

    remove = group.add_parser("remove", help="remove an identity: its keys, user and policy")
    common(remove)
    who(remove)
    remove.set_defaults(run=_remove)

    policy = group.add_parser(
        "policy", help="print an identity's IAM policy JSON (for AWS or any IAM-style S3)"
    )
    common(policy, admin=False)
    who(policy)
    policy.set_defaults(run=_policy)


# --- commands --------------------------------------------------------------------------


def _sync(args: argparse.Namespace) -> int:
    from tapestry_protocol.store.access import COORDINATOR

    manifest = _manifest(args)
    members = list(args.members) or _members(manifest, args.federation_manifest)
    if not members:
        raise UsageError("no members: pass --member NAME or a --federation-manifest")
    if COORDINATOR in members:
        raise UsageError(f"{COORDINATOR!r} names the coordinator's identity, not a member")
    ids, layout = _identities(args, manifest)
    wanted = [*sorted(set(members)), COORDINATOR]
    have = set(ids.names(layout))
    rows: list[tuple[str, str, str]] = []
    for name in wanted:
        keys = ids.keys(layout, name) if name in have else []
        if keys:
            rows.append((name, ", ".join(keys), "kept"))
            continue
        identity = ids.provision(layout, name)
        _write(args.out, identity)
        rows.append((name, identity.access_key, f"created, key in {args.out / name}"))
    for name in sorted(have - set(wanted)):
        ids.remove(layout, name)
        rows.append((name, "-", "removed"))
    _table(rows)
    return 0


def _rotate(args: argparse.Namespace) -> int:
    manifest = _manifest(args)
    ids, layout = _identities(args, manifest)
    name = _who(args)
    old = ids.keys(layout, name)
    if not old:
        raise UsageError(f"{name!r} has no identity in federation {layout.federation}; sync first")
    identity = ids.provision(layout, name)
    _write(args.out, identity)  # written before any old key is revoked
    rows = [(name, identity.access_key, f"new, in {args.out / name}")]
    for key in old:
        if args.keep_old:
            rows.append((name, key, "kept (revoke it once the new key is in place)"))
        else:
            ids.revoke(layout, name, key)
            rows.append((name, key, "revoked"))
    _table(rows)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    ids, layout = _identities(args, _manifest(args))
    name = _who(args)
    if args.access_key not in ids.keys(layout, name):
        raise UsageError(f"{args.access_key!r} is not a key of {name!r}: nothing revoked")
    ids.revoke(layout, name, args.access_key)
    _table([(name, args.access_key, "revoked")])
    return 0


def _remove(args: argparse.Namespace) -> int:
    ids, layout = _identities(args, _manifest(args))
    name = _who(args)
    ids.remove(layout, name)
    _table([(name, "-", "removed")])
    return 0


def _policy(args: argparse.Namespace) -> int:
    from tapestry_protocol.store.access import policy_for

    manifest = _manifest(args)
    location = _location(args, manifest)
    layout = _layout(args, manifest, location.prefix)
    document = policy_for(layout, location.bucket, _who(args))
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    return 0


# --- helpers ---------------------------------------------------------------------------


def _who(args: argparse.Namespace) -> str:
    from tapestry_protocol.store.access import COORDINATOR

    name: str = COORDINATOR if args.coordinator else args.member
    return name


def _manifest(args: argparse.Namespace) -> dict[str, Any] | None:
    path: Path | None = args.federation_manifest
    if path is None:
        return None
    import yaml

    try:
        document = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UsageError(f"cannot read --federation-manifest {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--federation-manifest {path} is not YAML or JSON: {e}") from None
    if not isinstance(document, dict) or document.get("kind") != "Federation":
        raise UsageError(f"--federation-manifest {path} is not a Federation resource")
    return document


def _members(manifest: dict[str, Any] | None, path: Path | None) -> list[str]:
    from tapestry_protocol.layout import validate_name

    if manifest is None:
        return []
    entries = (manifest.get("spec") or {}).get("members") or []
    if not isinstance(entries, list):
        raise UsageError(f"{path}: spec.members is not a list")
    names = []
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        try:
            names.append(validate_name("participant", name))  # type: ignore[arg-type]
        except ValueError as e:
            raise UsageError(f"{path}: spec.members: {e}") from None
    return names


def _location(args: argparse.Namespace, manifest: dict[str, Any] | None) -> Any:
    from tapestry_protocol.store import S3Location

    url: str | None = args.store
    if url is None and manifest is not None:
        store = (manifest.get("spec") or {}).get("store") or {}
        if store.get("endpoint") and store.get("bucket"):
            path = f"{store['bucket']}/{str(store.get('prefix') or '').strip('/')}".rstrip("/")
            url = f"s3://{path}?endpoint={store['endpoint']}"
            if store.get("region"):
                url += f"&region={store['region']}"
    if url is None:
        raise UsageError("no store: pass --store s3://bucket/prefix?endpoint=URL")
    try:
        return S3Location.parse(url)
    except ValueError as e:
        raise UsageError(f"--store: {e}") from None


def _layout(args: argparse.Namespace, manifest: dict[str, Any] | None, prefix: str) -> Layout:
    """The federation's keys as the bucket names them: the store URL's prefix included."""
    from tapestry_protocol.layout import Layout

    name = args.federation or ((manifest or {}).get("metadata") or {}).get("name")
    if not name:
        raise UsageError("no federation: pass --federation NAME or a --federation-manifest")
    try:
        return Layout(name, prefix=prefix)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _identities(
    args: argparse.Namespace, manifest: dict[str, Any] | None
) -> tuple[MinioIdentities, Layout]:
    from tapestry_protocol.store.access import MinioIdentities

    location = _location(args, manifest)
    layout = _layout(args, manifest, location.prefix)
    try:
        ids = MinioIdentities(
            location.endpoint,
            _admin_credentials(args.admin_credentials_dir),
            bucket=location.bucket,
            ca_file=location.params.get("ca_file") or None,
            region=location.params.get("region") or None,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    return ids, layout


def _admin_credentials(directory: Path | None) -> S3Credentials:
    from tapestry_protocol.store import S3Credentials, StoreError

    try:
        found = S3Credentials.from_dir(directory) if directory else S3Credentials.from_env()
    except StoreError as e:
        raise UsageError(f"admin credentials: {e}") from None
    if found is None:
        raise UsageError(
            "no admin credentials: pass --admin-credentials-dir DIR (accessKey, secretKey) "
            "or set TAPESTRY_S3_ACCESS_KEY/TAPESTRY_S3_SECRET_KEY"
        )
    return found


def _write(out: Path, identity: Identity) -> None:
    """`out/<name>/{accessKey,secretKey}`, readable by the owner only."""
    from tapestry_protocol.files import atomic_write_text

    directory = out / identity.name
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        atomic_write_text(directory / "accessKey", identity.access_key, mode=0o600)
        atomic_write_text(directory / "secretKey", identity.secret_key, mode=0o600)
    except OSError as e:
        raise UsageError(
            f"cannot write the new key of {identity.name} to {directory}: {e.strerror}; it is "
            f"issued ({identity.access_key}): revoke it, fix --out and run again"
        ) from None


def _table(rows: list[tuple[str, str, str]]) -> None:
    """Names, access keys and what happened; never a secret key."""
    header = ("IDENTITY", "ACCESS KEY", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(2)]
    for name, key, note in [header, *rows]:
        sys.stdout.write(f"{name:<{widths[0]}}  {key:<{widths[1]}}  {note}".rstrip() + "\n")
