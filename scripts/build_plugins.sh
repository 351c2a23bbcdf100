#!/usr/bin/env bash
# Rebuild every shipped plugin's .wasm from its source.
#
# The built .wasm files are committed, so nothing here is needed to run flux or its tests;
# run this after changing a plugin's source and commit the result.
#
# Prerequisites (Debian 12 "bookworm"; all from the Debian and npm registries):
#   apt-get install -y --no-install-recommends clang lld rustc libstd-rust-dev-wasm32 nodejs npm
#     clang + lld              C plugins         (clang --target=wasm32, wasm-ld)
#     rustc + libstd-rust-dev-wasm32  Rust plugins (Debian's rustc 1.63 and its wasm32 std;
#                              a rustup toolchain only works if it has the wasm32 target)
#     nodejs + npm             AssemblyScript plugins (the compiler is installed by npm below,
#                              pinned, into $FLUX_BUILD_CACHE, not into the repository)
#
# Usage: scripts/build_plugins.sh [plugin-name ...]     (default: all)
# Environment: CLANG, RUSTC, FLUX_BUILD_CACHE (default ~/.cache/flux-build),
#              ASC_VERSION (default 0.28.20).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLUGINS="$ROOT/plugins"
CLANG="${CLANG:-clang}"
RUSTC="${RUSTC:-/usr/bin/rustc}"
[ -x "$RUSTC" ] || RUSTC="rustc"
CACHE="${FLUX_BUILD_CACHE:-$HOME/.cache/flux-build}"
ASC_VERSION="${ASC_VERSION:-0.28.20}"

need() {
    command -v "$1" >/dev/null 2>&1 || {
        echo "build_plugins: '$1' not found; see the prerequisites at the top of $0" >&2
        exit 1
    }
}

build_frame_decoder() {
    need "$CLANG"
    local dir="$PLUGINS/frame-decoder"
    # -nostdlib: no libc, so the module imports nothing. --strip-all: no names section.
    "$CLANG" --target=wasm32 -O2 -nostdlib -Wall -Wextra \
        -Wl,--no-entry -Wl,--strip-all -Wl,-z,stack-size=32768 \
        -o "$dir/frame_decoder.wasm" "$dir/frame_decoder.c"
}

build_enrich() {
    need "$RUSTC"
    local dir="$PLUGINS/enrich"
    "$RUSTC" --edition 2021 --target wasm32-unknown-unknown --crate-type cdylib \
        -C opt-level=s -C panic=abort -C lto -C strip=symbols \
        -o "$dir/enrich.wasm" "$dir/src/lib.rs"
}

asc() {
    need npm
    local prefix="$CACHE/asc-$ASC_VERSION"
    if [ ! -x "$prefix/node_modules/.bin/asc" ]; then
        mkdir -p "$prefix"
        npm install --prefix "$prefix" --no-audit --no-fund --silent "assemblyscript@$ASC_VERSION"
    fi
    "$prefix/node_modules/.bin/asc" "$@"
}

build_batch_stats() {
    local dir="$PLUGINS/batch-stats"
    # --use abort=...: assertion failures trap instead of importing env.abort from JavaScript.
    (cd "$dir" && asc assembly/index.ts -O3 --runtime incremental \
        --use abort=assembly/index/abortHandler -o batch_stats.wasm)
}

ALL=(frame-decoder enrich batch-stats)
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=("${ALL[@]}")

for name in "${TARGETS[@]}"; do
    case "$name" in
        frame-decoder) build_frame_decoder ;;
        enrich) build_enrich ;;
        batch-stats) build_batch_stats ;;
        *) echo "build_plugins: unknown plugin '$name' (known: ${ALL[*]})" >&2; exit 2 ;;
    esac
    wasm=$(ls "$PLUGINS/$name"/*.wasm)
    printf '%-14s %7d bytes  sha256 %s\n' "$name" "$(stat -c %s "$wasm")" \
        "$(sha256sum "$wasm" | cut -c1-16)"
done
