"""Round 0's base: the initial weights of a model spec, signed by the coordinator.

`python -m tapestry_trainer.bootstrap` runs as a Job in the coordinator's cluster (the
operator has no torch to initialise a model); the local runner calls
`publish_initial_base` directly. Publishing twice is harmless: the weights are a
function of the spec and its seed, and an existing base is kept.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tapestry_protocol.documents import ModelManifest
from tapestry_protocol.exchange import COORDINATOR, Verified, publish_model, read_model
from tapestry_protocol.layout import Layout
from tapestry_protocol.pod import ExitCode
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.shards import DEFAULT_SHARD_BYTES, plan_shards
from tapestry_protocol.signing import SigningKey, load_signing_key
from tapestry_protocol.store import ObjectStore, StoreError, open_store
from tapestry_trainer.specs import PRESETS, ModelSpec


def publish_initial_base(
    store: ObjectStore, layout: Layout, spec: ModelSpec, signer: SigningKey
) -> Verified[ModelManifest]:
    """Publish `bases/0` for `spec` unless it exists; return it verified."""
    key = layout.base_manifest(0)
    if not store.exists(key):
        from tapestry_trainer.baseline import initial_arrays  # torch, only when needed

        arrays = initial_arrays(spec)
        groups = plan_shards([(n, a.nbytes) for n, a in arrays.items()], DEFAULT_SHARD_BYTES)
        publish_model(store, layout, 0, arrays, groups, signer, model=spec.to_dict())
    return read_model(store, layout, key, signer.public_key_text)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tapestry_trainer.bootstrap", description=__doc__)
    p.add_argument("--store", required=True)
    p.add_argument("--federation", required=True)
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--key", type=Path, required=True, help="coordinator signing key file or dir")
    args = p.parse_args(argv)
    try:
        signer = load_signing_key(COORDINATOR, args.key)
        layout = Layout(args.federation)
        spec = ModelSpec.preset(args.preset, seed=args.seed)
    except ValueError as e:
        print(f"tapestry bootstrap: {e}", file=sys.stderr)
        return int(ExitCode.USAGE)
    try:
        base = publish_initial_base(open_store(args.store), layout, spec, signer)
    except Rejected as e:
        print(f"tapestry bootstrap: an existing base is refused: {e}", file=sys.stderr)
        return int(ExitCode.REFUSED)
    except StoreError as e:
        print(f"tapestry bootstrap: {e}", file=sys.stderr)
        return int(ExitCode.CRASH)
    print(f"round 0 base {base.key} sha256 {base.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
