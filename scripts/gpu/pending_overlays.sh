#!/usr/bin/env bash
# Overlays for scripts/gpu/ab_bench.sh from the kernel patches that wait in docs/pending (each
# built and checked without a GPU, to be measured in the next session's first A/B): for every
# patch P (or the ones named), .ab-P holds HEAD's version of each file P touches with P applied;
# an argument P1+P2 (patches that apply on top of each other) makes .ab-P1+P2 with both, in order.
# Prints the overlay folders on one line, in order, for ab_bench.sh's arguments (sides b, c, ...).
# Run here (it reads HEAD with git), not on the GPU machine: the folders are untracked and not
# ignored, so they travel with the working tree there; delete them (rm -rf .ab-*) before committing.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -n "$(git ls-files '.ab-*')" ]; then
  echo "$0: overlay folders are committed ($(git ls-files '.ab-*' | cut -d/ -f1 | sort -u | tr '\n' ' ')): git rm them" >&2
  exit 1
fi
patches=("$@")
[ ${#patches[@]} -gt 0 ] || patches=(docs/pending/*.patch)
folders=()
for spec in "${patches[@]}"; do
  IFS=+ read -r -a parts <<<"$spec"
  folder=.ab-$(for part in "${parts[@]}"; do basename "$part" .patch; done | paste -sd+)
  rm -rf "$folder" && mkdir -p "$folder"
  for patch in "${parts[@]}"; do
    [ -f "$patch" ] || { echo "$0: no patch $patch" >&2; exit 2; }
    git apply --numstat "$patch" | cut -f3 | while read -r file; do
      [ -f "$folder/$file" ] && continue  # an earlier patch's result: apply on top of it
      mkdir -p "$folder/$(dirname "$file")"
      # (a file the patch adds is not in HEAD: the patch creates it)
      if git cat-file -e "HEAD:$file" 2>/dev/null; then git show "HEAD:$file" >"$folder/$file"; fi
    done
    git apply --directory="$folder" "$patch" || { echo "$0: $patch does not apply to HEAD (after ${parts[0]})" >&2; exit 1; }
  done
  folders+=("$folder")
done
echo "${folders[@]}"
