#!/usr/bin/env bash
# The embedded corpus: the Linux kernel's Documentation (reStructuredText and plain text) from
# Debian's linux-doc package at a pinned version, tokenized with a 4096-token byte-level BPE
# trained on it, into data/corpus/, with a multiple-choice task made from its validation split
# (tasks/continuation.jsonl: a passage's true next 16 tokens among three from elsewhere, which
# the configs score at every evaluation). Idempotent: does nothing when they are there.
#
#   scripts/prepare_corpus.sh                 # ~8M tokens, the quickstart's corpus
#   scripts/prepare_corpus.sh linux-source    # 100M+ tokens: the kernel's source tree (C, docs)
#                                             # for scaling runs, into data/linux-source/
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(scripts/setup.sh)
CACHE=${HYBRID_CACHE:-$HOME/.cache/hybrid-train}
KIND=${1:-linux-doc}
PIN=6.1.192-3   # Debian 12's linux-doc-6.1 at the time of writing; the newest one is used if it is gone

fetch_deb() {  # fetch_deb PACKAGE -> path of the .deb in the cache
  local pkg=$1 dir=$CACHE/debs
  mkdir -p "$dir"
  local have; have=$(ls "$dir"/${pkg}_*.deb 2>/dev/null | head -n1 || true)
  if [ -z "$have" ]; then
    (cd "$dir" && { apt-get download "$pkg=$PIN" >&2 2>/dev/null || { echo "corpus: $pkg=$PIN is gone, taking the current version" >&2;
      apt-get update -qq >&2; apt-get download "$pkg" >&2; }; })
    have=$(ls "$dir"/${pkg}_*.deb | head -n1)
  fi
  echo "$have"
}

continuation_task() {  # continuation_task CORPUS: CORPUS/tasks/continuation.jsonl, unless it is there
  [ -f "$1/tasks/continuation.jsonl" ] || "$VENV/bin/python" scripts/prepare_task.py --from-tokens "$1" \
      --tokenizer "$1/tokenizer.json" --output "$1/tasks/continuation.jsonl" >&2
}

case "$KIND" in
  linux-doc)
    OUT=data/corpus
    [ -f "$OUT/metadata.json" ] && { continuation_task "$OUT"; echo "corpus: $OUT is ready" >&2; exit 0; }
    deb=$(fetch_deb linux-doc-6.1)
    src=$CACHE/linux-doc-text
    if [ ! -d "$src" ]; then
      rm -rf "$src.tmp" && mkdir -p "$src.tmp"
      dpkg-deb -x "$deb" "$src.tmp"
      mv "$src.tmp" "$src"
    fi
    docs=$(ls -d "$src"/usr/share/doc/linux-doc-*/Documentation)
    "$VENV/bin/python" scripts/prepare_data.py "$docs/**/*.rst.gz" "$docs/**/*.txt.gz" \
        --output "$OUT" --tokenizer bpe:4096 --valid-fraction 0.02
    echo "$(basename "$deb")" > "$OUT/SOURCE"
    continuation_task "$OUT"
    ;;
  linux-source)
    OUT=data/linux-source
    [ -f "$OUT/metadata.json" ] && { continuation_task "$OUT"; echo "corpus: $OUT is ready" >&2; exit 0; }
    PIN=6.1.192-3
    deb=$(fetch_deb linux-source-6.1)
    src=$CACHE/linux-source-text
    if [ ! -d "$src" ]; then
      rm -rf "$src.tmp" && mkdir -p "$src.tmp"
      dpkg-deb -x "$deb" "$src.tmp"
      tar -xf "$src.tmp"/usr/src/linux-source-*.tar.xz -C "$src.tmp"
      mv "$src.tmp" "$src"
    fi
    tree=$(ls -d "$src"/linux-source-*/)
    "$VENV/bin/python" scripts/prepare_data.py "$tree/**/*.c" "$tree/**/*.h" "$tree/Documentation/**/*.rst" \
        --output "$OUT" --tokenizer bpe:32768 --valid-fraction 0.005
    echo "$(basename "$deb")" > "$OUT/SOURCE"
    continuation_task "$OUT"
    ;;
  *) echo "error: unknown corpus '$KIND' (linux-doc, linux-source)" >&2; exit 2 ;;
esac
