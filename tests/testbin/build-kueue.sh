#!/usr/bin/env bash
# Build the Kueue controller manager (sigs.k8s.io/kueue/cmd/kueue) that
# tests/kube/kueue.py runs against the test cluster, from the wrapper module
# tests/testbin/kueue/ that pins it. The binary is upstream's, unmodified; its
# CRDs come from the same module (config/components/crd/bases), printed below.
#
# Idempotent: the binary goes to ~/.cache/tapestry/testbin/kueue-<version>-<hash>/,
# where <hash> covers the wrapper module and BUILD_REVISION, so a rebuild
# happens only when the pin (or the recipe) changes. Go's module and build
# caches live under ~/.cache/tapestry/go/ too.
#
# TAPESTRY_KUEUE_ASSETS=<dir> skips the build and uses a prebuilt `kueue`
# binary and a `crds/` directory of Kueue's CRDs from <dir>, after checking
# that they are there.
#
# Progress goes to stderr; the last line on stdout is the directory holding
# `kueue` and `crds/`.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MOD="$HERE/kueue"
MODULE=sigs.k8s.io/kueue
LDFLAGS_BASE="-s -w"
# Bump when the build commands below change in a way that alters the output;
# together with the wrapper module it names the cache directory.
BUILD_REVISION=1

NAME=build-kueue
# shellcheck source=common.sh
source "$HERE/common.sh"

check_dir() { # check_dir <dir>: prints what <dir> lacks
    local dir="$1" missing=()
    [[ -x "$dir/kueue" ]] || missing+=("kueue")
    compgen -G "$dir/crds/*.yaml" >/dev/null || missing+=("crds/*.yaml")
    if ((${#missing[@]})); then
        echo "${missing[*]}"
        return 1
    fi
}

use_assets TAPESTRY_KUEUE_ASSETS Kueue

VERSION="$(pin "$MOD/go.mod" "$MODULE")"
[[ -n "$VERSION" ]] || die "cannot read the $MODULE pin from $MOD/go.mod"

inputs_hash="$( (echo "$BUILD_REVISION"; cat "$MOD"/go.mod "$MOD"/go.sum) \
    | sha256sum | cut -c1-12)"
DEST="$CACHE/testbin/kueue-$VERSION-$inputs_hash"

done_if_built "$DEST" "up to date"

go_env
build_lock kueue "$DEST"

TMP="$(mktemp -d "$CACHE/testbin/.partial.XXXXXX")"
chmod 755 "$TMP"
trap 'rm -rf "$TMP"' EXIT
start=$SECONDS
log "$("$GO" version); building Kueue $VERSION into $DEST"
log "a cold build compiles about 1600 packages (8 CPU-minutes; 17 min on 2 busy cores); later runs reuse it"

# As Kueue's Makefile stamps its version (commit and date from the module proxy).
date="$(cd "$MOD" && "$GO" list -m \
    -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' "$MODULE")"
ldflags="$LDFLAGS_BASE -X $MODULE/pkg/version.GitVersion=$VERSION -X $MODULE/pkg/version.GitCommit="
ldflags+=" -X $MODULE/pkg/version.BuildDate=${date:-1970-01-01T00:00:00Z}"
# -v names each package as it is compiled; count them to show progress.
if ! (cd "$MOD" && "$GO" build -v -trimpath -ldflags "$ldflags" -o "$TMP/kueue" \
        "$MODULE/cmd/kueue") 2>&1 \
    | tee "$TMP/build.log" \
    | awk '/^[A-Za-z0-9._~-]+(\/[^ ]+)?$/ { if (++n % 100 == 0) {
            printf "[build-kueue] compiled %d packages\n", n > "/dev/stderr"
            fflush("/dev/stderr") } }'; then
    tail -n 40 "$TMP/build.log" >&2
    die "go build failed (log tail above)"
fi
[[ -x "$TMP/kueue" ]] || die "build produced no kueue binary"
rm -f "$TMP/build.log"

dir="$(cd "$MOD" && "$GO" list -m -f '{{.Dir}}' "$MODULE")"
mkdir "$TMP/crds"
cp "$dir"/config/components/crd/bases/*.yaml "$TMP/crds/"
chmod 644 "$TMP"/crds/*.yaml  # the module cache is read-only
check_dir "$TMP" >/dev/null || die "build left an incomplete $TMP"

rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
log "built in $((SECONDS - start)) s: $DEST"
echo "$DEST"
