#!/usr/bin/env bash
# Build the Go tools the tests run: the helm CLI, a kstatus command around
# sigs.k8s.io/cli-utils/pkg/kstatus/status, and the Prometheus server, each from
# a wrapper module under tests/testbin/tools/<tool>/ that pins it.
#
# Usage: build-tools.sh [TOOL...]   (default: every tool; TOOL is helm, kstatus
# or prometheus). Only the named tools are built, so a test that needs helm does
# not wait for Prometheus.
#
# Idempotent: binaries go to ~/.cache/tapestry/testbin/tools-<pins>-<hash>/,
# where <pins> names the pinned versions and <hash> covers the wrapper modules
# and BUILD_REVISION, so a rebuild happens only when a pin (or the recipe)
# changes. Go's module and build caches live under ~/.cache/tapestry/go/ too.
#
# TAPESTRY_TOOLS_ASSETS=<dir> skips the build and uses prebuilt binaries from
# <dir> after checking that the requested ones are there.
#
# Progress goes to stderr; the last line on stdout is the binaries' directory.
set -euo pipefail

ALL_TOOLS=(helm kstatus prometheus)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS_DIR="$HERE/tools"
LDFLAGS_BASE="-s -w"
# Bump when the build commands below change in a way that alters the binaries;
# together with the wrapper modules it names the cache directory.
BUILD_REVISION=1

NAME=build-tools
# shellcheck source=common.sh
source "$HERE/common.sh"

# Per tool: the module whose version names it, and the package to build.
declare -A PIN_MODULE=(
    [helm]=helm.sh/helm/v3
    [kstatus]=sigs.k8s.io/cli-utils
    [prometheus]=github.com/prometheus/prometheus
)
declare -A PACKAGE=(
    [helm]=helm.sh/helm/v3/cmd/helm
    [kstatus]=.
    [prometheus]=github.com/prometheus/prometheus/cmd/prometheus
)
# remove_all_sd leaves Prometheus only its file and HTTP service discovery (the
# cloud SDKs are most of its build); without builtinassets it serves no web UI,
# which the tests do not need (they use the HTTP API).
declare -A TAGS=(
    [prometheus]=remove_all_sd
)

if (($#)); then
    WANTED=("$@")
else
    WANTED=("${ALL_TOOLS[@]}")
fi
for tool in "${WANTED[@]}"; do
    [[ -n "${PACKAGE[$tool]:-}" ]] || die "unknown tool '$tool' (known: ${ALL_TOOLS[*]})"
done

check_dir() { # check_dir <dir>: prints the wanted tools missing from <dir>
    local dir="$1" missing=()
    for tool in "${WANTED[@]}"; do
        [[ -x "$dir/$tool" ]] || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        echo "${missing[*]}"
        return 1
    fi
}

use_assets TAPESTRY_TOOLS_ASSETS "test tools"

declare -A VERSION=()
name=""
for tool in "${ALL_TOOLS[@]}"; do
    VERSION[$tool]="$(pin "$TOOLS_DIR/$tool/go.mod" "${PIN_MODULE[$tool]}")"
    [[ -n "${VERSION[$tool]}" ]] || die "cannot read the $tool pin from $TOOLS_DIR/$tool/go.mod"
    name+="$tool-${VERSION[$tool]}-"
done

inputs_hash="$( (echo "$BUILD_REVISION"
    for tool in "${ALL_TOOLS[@]}"; do
        cat "$TOOLS_DIR/$tool"/go.mod "$TOOLS_DIR/$tool"/go.sum
        cat "$TOOLS_DIR/$tool"/*.go 2>/dev/null || true
    done) | sha256sum | cut -c1-12)"
DEST="$CACHE/testbin/tools-$name$inputs_hash"

done_if_built "$DEST" "up to date"

go_env
build_lock tools "$DEST"
mkdir -p "$DEST"

TMP="$(mktemp -d "$CACHE/testbin/.partial.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
log "$("$GO" version); building into $DEST"

ldflags_for() { # ldflags_for <tool>: the linker flags that stamp its version
    local tool="$1" ldflags="$LDFLAGS_BASE"
    case "$tool" in
    helm)
        # As helm's Makefile: version, tree state, and the Kubernetes version it
        # assumes for lint and `.Capabilities` (client-go v0.X.Y means 1.X).
        local client_go major minor
        client_go="$(cd "$TOOLS_DIR/helm" && "$GO" list -m -f '{{.Version}}' k8s.io/client-go)"
        minor="${client_go#v0.}"; minor="${minor%%.*}"
        major=1
        ldflags+=" -X helm.sh/helm/v3/internal/version.version=${VERSION[helm]}"
        ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
        for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
            ldflags+=" -X $pkg.k8sVersionMajor=$major -X $pkg.k8sVersionMinor=$minor"
        done
        ;;
    prometheus)
        # As its .promu.yml. Module v0.3XX.Y is release 3.XX.Y; its VERSION file says which.
        local dir release date
        dir="$(cd "$TOOLS_DIR/prometheus" && "$GO" list -m -f '{{.Dir}}' \
            github.com/prometheus/prometheus)"
        release="$(cat "$dir/VERSION")"
        date="$(cd "$TOOLS_DIR/prometheus" && "$GO" list -m \
            -f '{{if .Time}}{{.Time.UTC.Format "20060102-15:04:05"}}{{end}}' \
            github.com/prometheus/prometheus)"
        for var in Version=$release Branch=HEAD BuildUser=tapestry-testbin \
            BuildDate=${date:-19700101-00:00:00} Revision=; do
            ldflags+=" -X github.com/prometheus/common/version.$var"
        done
        ;;
    esac
    echo "$ldflags"
}

build_tool() { # build_tool <tool>: compile it into $DEST, atomically
    local tool="$1" mod="$TOOLS_DIR/$1" start=$SECONDS
    # No `go mod download`: go build fetches only the modules these packages use
    # (for Prometheus not the cloud SDKs that its discovery plugins need).
    log "$tool ${VERSION[$tool]}: compiling ${PACKAGE[$tool]} (downloading what it needs)"
    # -v names each package as it is compiled; count them to show progress.
    if ! (cd "$mod" && "$GO" build -v -trimpath -tags "${TAGS[$tool]:-}" \
            -ldflags "$(ldflags_for "$tool")" \
            -o "$TMP/$tool" "${PACKAGE[$tool]}") 2>&1 \
        | tee "$TMP/$tool.log" \
        | awk -v tool="$tool" '
            /^[A-Za-z0-9._~-]+(\/[^ ]+)?$/ { if (++n % 100 == 0) {
                printf "[build-tools] %s: compiled %d packages\n", tool, n > "/dev/stderr"
                fflush("/dev/stderr") } }'; then
        tail -n 40 "$TMP/$tool.log" >&2
        die "$tool: go build failed (log tail above)"
    fi
    [[ -x "$TMP/$tool" ]] || die "build produced no $tool"
    mv -f "$TMP/$tool" "$DEST/$tool"
    log "$tool done in $((SECONDS - start)) s"
}

for tool in "${WANTED[@]}"; do
    [[ -x "$DEST/$tool" ]] || build_tool "$tool"
done

actual="$("$DEST/helm" version --template '{{.Version}}' 2>/dev/null || true)"
if [[ -x "$DEST/helm" && "$actual" != "${VERSION[helm]}" ]]; then
    die "helm reports version '$actual', expected ${VERSION[helm]}"
fi
echo "$DEST"
