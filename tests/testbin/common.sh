# Sourced by the build-*.sh scripts beside it: what each of them does the same way.
# The sourcing script sets NAME (its log prefix) first.

CACHE="${TAPESTRY_CACHE:-$HOME/.cache/tapestry}"

log() { printf '[%s %s] %s\n' "$NAME" "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$NAME" "$*" >&2; exit 1; }

pin() { # pin <go.mod> <module>: the version <go.mod> requires of <module>
    awk -v m="$2" '($1 == m || ($1 == "require" && $2 == m)) && $0 !~ /=>/ {
        print ($1 == "require" ? $3 : $2); exit }' "$1"
}

use_assets() { # use_assets <VAR> <what>: when $VAR names a directory, use it and exit
    local var="$1" what="$2" dir="${!1:-}" missing
    [[ -n "$dir" ]] || return 0
    if ! missing="$(check_dir "$dir")"; then
        die "$var=$dir lacks: $missing"
    fi
    log "using prebuilt $what from $var"
    echo "$dir"
    exit 0
}

done_if_built() { # done_if_built <dest> <how>: when check_dir passes, print <dest> and exit
    if check_dir "$1" >/dev/null; then
        log "$2: $1"
        echo "$1"
        exit 0
    fi
}

go_env() { # the Go toolchain in $GO, with module and build caches under $CACHE
    GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
    [[ -x "$GO" ]] || die "Go toolchain not found (set GO=/path/to/go or put go on PATH)"
    export GOMODCACHE="${GOMODCACHE:-$CACHE/go/mod}"
    export GOCACHE="${GOCACHE:-$CACHE/go/build}"
    export GOFLAGS="${GOFLAGS:--mod=mod}"
    export GOTOOLCHAIN=local CGO_ENABLED=0
}

build_lock() { # build_lock <name> <dest>: one build at a time; later sessions reuse it
    mkdir -p "$CACHE/testbin"
    exec 9>"$CACHE/testbin/.$1.lock"
    log "waiting for build lock $CACHE/testbin/.$1.lock"
    flock 9
    done_if_built "$2" "built by another process"
}
