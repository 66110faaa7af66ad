#!/usr/bin/env bash
# Build the pinned MinIO server from its Go module, once, into a cache outside the repo.
#
# MinIO community is source-only (no official binaries), so tests build it. The binary is
# cached under ~/.cache/tapestry/testbin/minio-<version>/minio; a second run is a no-op.
# TAPESTRY_MINIO_BIN=/path/to/minio skips the build and uses that binary instead.
# The last line of stdout is always the binary path; progress goes to stderr.
set -euo pipefail

# Last commit of github.com/minio/minio (archived, 2026-02-12). The module proxy serves no
# version for the RELEASE.2025-10-15T17-29-55Z commit (9e49d5e7a648), so pin master HEAD,
# which is that release plus its final maintenance commits.
MINIO_MODULE_VERSION="${TAPESTRY_MINIO_VERSION:-v0.0.0-20260212201848-7aac2a2c5b7c}"

log() { printf 'build-minio: %s\n' "$*" >&2; }
die() { printf 'build-minio: ERROR: %s\n' "$*" >&2; exit 1; }

if [[ -n "${TAPESTRY_MINIO_BIN:-}" ]]; then
    [[ -x "$TAPESTRY_MINIO_BIN" ]] || die "TAPESTRY_MINIO_BIN=$TAPESTRY_MINIO_BIN is not an executable file"
    log "using prebuilt TAPESTRY_MINIO_BIN"
    echo "$TAPESTRY_MINIO_BIN"
    exit 0
fi

CACHE="${TAPESTRY_CACHE:-$HOME/.cache/tapestry}"
BIN_DIR="$CACHE/testbin/minio-$MINIO_MODULE_VERSION"
BIN="$BIN_DIR/minio"
if [[ -x "$BIN" ]]; then
    log "cached: $BIN"
    echo "$BIN"
    exit 0
fi

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
[[ -x "$GO" ]] || die "no Go toolchain found (install Go >= 1.24 or set GO=/path/to/go)"

export GOMODCACHE="${GOMODCACHE:-$CACHE/go/mod}"
export GOCACHE="${GOCACHE:-$CACHE/go/build}"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false

# Build into a private temp dir, then rename into place, so a concurrent or interrupted
# build never leaves a half-written binary at $BIN.
mkdir -p "$BIN_DIR"
TMP="$(mktemp -d "$BIN_DIR/.build.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

log "building github.com/minio/minio@$MINIO_MODULE_VERSION with $("$GO" version)"
log "GOMODCACHE=$GOMODCACHE GOCACHE=$GOCACHE"
log "a cold build downloads ~300 modules and compiles ~1100 packages: several minutes"
start=$(date +%s)
# -v names each package as it is compiled; count them to show progress.
if ! GOBIN="$TMP" "$GO" install -v -trimpath -tags kqueue -ldflags "-s -w" \
        "github.com/minio/minio@$MINIO_MODULE_VERSION" 2>&1 \
    | tee "$TMP/build.log" \
    | awk -v start="$start" '
        function say(msg) { printf "build-minio: %s (%ds)\n", msg, systime() - start > "/dev/stderr"; fflush("/dev/stderr") }
        /^go: downloading / { if (++d % 50 == 1) say("downloading modules: " d " so far"); next }
        /^[a-z0-9.-]+(\/[^ ]+)?$/ { if (++n % 100 == 0) say("compiled " n " packages") }
        END { say("compiled " n+0 " packages, downloaded " d+0 " modules") }'; then
    tail -n 40 "$TMP/build.log" >&2
    die "go install github.com/minio/minio@$MINIO_MODULE_VERSION failed (log tail above)"
fi
"$TMP/minio" --version >/dev/null || die "the built binary does not run"
mv -f "$TMP/minio" "$BIN"
log "done: $BIN"
echo "$BIN"
