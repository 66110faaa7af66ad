#!/usr/bin/env bash
# Build the real Kubernetes control plane used by tests/kube: etcd,
# kube-apiserver and kube-controller-manager, from their published Go modules.
#
# Idempotent: binaries go to ~/.cache/tapestry/testbin/<version>/, where
# <version> names the pinned releases plus a hash of the wrapper modules and
# BUILD_REVISION, so a rebuild happens only when a pin (or the recipe)
# changes. Go's module and build caches live under ~/.cache/tapestry/go/ too.
#
# TAPESTRY_KUBE_ASSETS=<dir> (like KUBEBUILDER_ASSETS) skips the build and uses
# prebuilt binaries from <dir> after checking that they are there.
#
# Progress goes to stderr; the last line on stdout is the binaries' directory.
set -euo pipefail

BINARIES=(etcd kube-apiserver kube-controller-manager)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ETCD_MOD="$HERE/etcd"
KUBE_MOD="$HERE/kube"
LDFLAGS_BASE="-s -w"
# Bump when the build commands below change in a way that alters the binaries;
# together with the wrapper modules it names the cache directory.
BUILD_REVISION=1

NAME=build-kube
# shellcheck source=common.sh
source "$HERE/common.sh"

check_dir() {
    local dir="$1" missing=()
    for bin in "${BINARIES[@]}"; do
        [[ -x "$dir/$bin" ]] || missing+=("$bin")
    done
    if ((${#missing[@]})); then
        echo "${missing[*]}"
        return 1
    fi
}

use_assets TAPESTRY_KUBE_ASSETS "Kubernetes binaries"

KUBE_VERSION="$(pin "$KUBE_MOD/go.mod" k8s.io/kubernetes)"
ETCD_VERSION="$(pin "$ETCD_MOD/go.mod" go.etcd.io/etcd/server/v3)"
[[ -n "$KUBE_VERSION" && -n "$ETCD_VERSION" ]] || die "cannot read pinned versions from go.mod"

inputs_hash="$( (echo "$BUILD_REVISION"; cat "$ETCD_MOD"/go.mod "$ETCD_MOD"/go.sum \
    "$ETCD_MOD"/*.go "$KUBE_MOD"/go.mod "$KUBE_MOD"/go.sum) | sha256sum | cut -c1-12)"
DEST="$CACHE/testbin/kube-$KUBE_VERSION-etcd-$ETCD_VERSION-$inputs_hash"

done_if_built "$DEST" "up to date"

go_env
build_lock build "$DEST"

TMP="$(mktemp -d "$CACHE/testbin/.partial.XXXXXX")"
chmod 755 "$TMP"
trap 'rm -rf "$TMP"' EXIT
start=$SECONDS
log "$("$GO" version); building kube $KUBE_VERSION + etcd $ETCD_VERSION into $DEST"
log "cold builds take 20-35 min on 2 cores; later runs reuse the result"

log "etcd $ETCD_VERSION: downloading modules"
(cd "$ETCD_MOD" && "$GO" mod download) || die "etcd: go mod download failed"
log "etcd $ETCD_VERSION: compiling"
(cd "$ETCD_MOD" && "$GO" build -trimpath -ldflags "$LDFLAGS_BASE" -o "$TMP/etcd" .) \
    || die "etcd: go build failed"
log "etcd done after $((SECONDS - start)) s"

log "kubernetes $KUBE_VERSION: downloading modules"
(cd "$KUBE_MOD" && "$GO" mod download) || die "kubernetes: go mod download failed"
build_date="$(cd "$KUBE_MOD" && "$GO" list -m \
    -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes)"
major="${KUBE_VERSION#v}"; major="${major%%.*}"
minor="${KUBE_VERSION#v*.}"; minor="${minor%%.*}"
ldflags="$LDFLAGS_BASE"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major"
    ldflags+=" -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=archive"
    ldflags+=" -X $pkg.gitCommit= -X $pkg.buildDate=${build_date:-1970-01-01T00:00:00Z}"
done
log "kubernetes $KUBE_VERSION: compiling kube-apiserver and kube-controller-manager"
(cd "$KUBE_MOD" && "$GO" build -trimpath -ldflags "$ldflags" -o "$TMP/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager) \
    || die "kubernetes: go build failed"

for bin in "${BINARIES[@]}"; do
    [[ -x "$TMP/$bin" ]] || die "build produced no $bin"
done
"$TMP/kube-apiserver" --version >&2 || die "kube-apiserver does not run"
rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
log "built in $((SECONDS - start)) s: $DEST"
echo "$DEST"
