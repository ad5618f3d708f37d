#!/usr/bin/env bash
# Headers the H200 image lacks (nlohmann/json, zlib, gloo), copied from this machine's Debian
# packages into .deps/include (git-ignored), to be carried to the GPU machine with the device
# tool's `carry: [".deps"]`. The scripts there pass -DCMAKE_PREFIX_PATH=$PWD/.deps.
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/setup.sh >/dev/null
mkdir -p .deps/include
cp -r /usr/include/nlohmann /usr/include/gloo /usr/include/zlib.h /usr/include/zconf.h .deps/include/
du -sh .deps
