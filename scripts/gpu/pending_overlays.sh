#!/usr/bin/env bash
# Overlays for scripts/gpu/ab_bench.sh from the kernel patches that wait in docs/pending (each
# built and checked without a GPU, to be measured in the next session's first A/B): for every
# patch P (or the ones named), .ab-P holds HEAD's version of each file P touches with P applied.
# Prints the overlay folders on one line, in order, for ab_bench.sh's arguments (sides b, c, ...).
# Run here (it reads HEAD with git), not on the GPU machine: the folders are untracked and not
# ignored, so they travel with the working tree there; delete them (rm -rf .ab-*) before committing.
set -euo pipefail
cd "$(dirname "$0")/../.."
patches=("$@")
[ ${#patches[@]} -gt 0 ] || patches=(docs/pending/*.patch)
folders=()
for patch in "${patches[@]}"; do
  [ -f "$patch" ] || { echo "$0: no patch $patch" >&2; exit 2; }
  folder=.ab-$(basename "$patch" .patch)
  rm -rf "$folder" && mkdir -p "$folder"
  git apply --numstat "$patch" | cut -f3 | while read -r file; do
    mkdir -p "$folder/$(dirname "$file")"
    git show "HEAD:$file" >"$folder/$file"
  done
  git apply --directory="$folder" "$patch" || { echo "$0: $patch does not apply to HEAD" >&2; exit 1; }
  folders+=("$folder")
done
echo "${folders[@]}"
