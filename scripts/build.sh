#!/usr/bin/env bash
# Configure and build hybrid-train into build/ (set-up first; fast when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(scripts/setup.sh)
BUILD=${HYBRID_BUILD_DIR:-build}
export CCACHE_DIR=${CCACHE_DIR:-${HYBRID_CACHE:-$HOME/.cache/hybrid-train}/ccache}
# Paths relative to the checkout in the cache key, so every clone on this machine shares hits.
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD} CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-1}
if [ ! -f "$BUILD/build.ninja" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DPython3_EXECUTABLE="$VENV/bin/python" "$@" >&2
fi
# HYBRID_TARGETS limits the build (the main job needs only hybrid-train), default: everything.
cmake --build "$BUILD" -j "$(nproc)" ${HYBRID_TARGETS:+--target $HYBRID_TARGETS} >&2
echo "$BUILD"
