#!/usr/bin/env bash
# On the GPU machine: build, run the GPU tests of the GDN layer's kernels (delta rule, chunk layout, short
# conv, the norms with and without the residual adds, SwiGLU, RoPE, the model under autocast; also
# under compute-sanitizer memcheck and racecheck on small shapes), then time our kernels and
# flash-linear-attention's on identical inputs in the same run. FLA comes from wheels carried in .whl (README, "GPU machine").
# SKIP_SANITIZERS=1 leaves out the sanitizer runs (when the kernels did not change); SKIP_FLA=1
# leaves out FLA (its Triton kernels take about six minutes to compile and tune: a carried
# .triton-cache folder, the compiled kernels of an earlier call, saves most of that; this call's go
# to /tmp/detached_extra/triton-cache.part0, part1, ... (xz, 15 MiB pieces, the tool's file limit
# being 16), which run_detached.sh returns beside its results: README, "GPU machine"); SKIP_LAYERS=1
# the layer comparison and the recompute timing (when an A/B in the same session measured them).
# Results in $OUT: test_delta.log, sanitizer_*.log, delta_rule_bench.json, recompute_bench.json,
# fla_delta_rule.json, profile.md (GPU time a fwd+bwd at the OLMo shape, by part and by kernel;
# profile_shape2.md and profile_shape3.md the same at the two K = 128 shapes; fla_profile*.md FLA's),
# bench_layers.md and layers_bench.json (a GDN layer against an attention layer,
# hybrid-bench-layers), profile_layers.md (the same for the GDN mixer at 7b width), and
# profile_gdn_block.md, profile_attention_block.md (each whole block, with its idle time).
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
HYBRID_TARGETS="test_ops hybrid-bench-delta-rule hybrid-bench-layers" scripts/gpu/build.sh || exit 1
stage() { echo "[$SECONDS s] $1"; }  # where the device time goes, for planning the next call
stage "tests"

build-gpu/tests/test_ops --gtest_filter='DeltaRule*:Shapes/*:ChunkLayout*:CausalConv*:GatedRMSNorm*:RMSNorm*:AddRMSNorm*:AddNormed*:ModelCuda*:SwiGLU*:Rope*' >"$OUT/test_delta.log" 2>&1
grep -E "^\[ +(errors|FAILED|PASSED) " "$OUT/test_delta.log"; grep -E "Failure|Expected|Which is" "$OUT/test_delta.log" | head -20
stage "sanitizers"
source scripts/gpu/sanitizer_tests.sh
[ -n "${SKIP_SANITIZERS:-}" ] && echo "sanitizers skipped (SKIP_SANITIZERS)"
for tool in $([ -z "${SKIP_SANITIZERS:-}" ] && echo memcheck racecheck); do
  run_sanitizer $tool build-gpu/tests/test_ops "" "$OUT/sanitizer_$tool.log"
done

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site
fi
export TRITON_CACHE_DIR=/tmp/triton-cache
mkdir -p "$TRITON_CACHE_DIR"
if [ -f .triton-cache/triton-cache.part0 ]; then
  cat .triton-cache/triton-cache.part* | xz -d | tar -x -C "$TRITON_CACHE_DIR" &&
    echo "Triton cache: $(ls "$TRITON_CACHE_DIR" | wc -l) kernels carried"
fi
stage "benchmark: ours, then FLA"
mkdir -p /tmp/delta_dump
build-gpu/hybrid-bench-delta-rule --json "$OUT/delta_rule_bench.json" --dump /tmp/delta_dump --profile /tmp/delta_trace.json 2>&1 |
  tee "$OUT/bench_ours.log"
python3 scripts/gpu/trace_summary.py /tmp/delta_trace.json 30 3 >"$OUT/profile.md"
for shape in 2 3; do
  python3 scripts/gpu/trace_summary.py /tmp/delta_trace_$shape.json 30 3 >"$OUT/profile_shape$shape.md"
done
# The price of recomputing the forward's intermediates in the backward (keep_intermediates off).
[ -z "${SKIP_LAYERS:-}" ] && build-gpu/hybrid-bench-delta-rule --recompute --no-accuracy --shapes 1 --json "$OUT/recompute_bench.json" 2>&1 |
  grep -v "^bf16" | sed 's/^/recompute: /' | tee -a "$OUT/bench_ours.log"
[ -n "${SKIP_FLA:-}" ] && echo "FLA skipped (SKIP_FLA)" ||
  python3 scripts/gpu/fla_delta_rule.py /tmp/delta_dump "$OUT/delta_rule_bench.json" "$OUT/fla_delta_rule.json" \
    --profile /tmp 2>&1 | grep -v Warning | tee "$OUT/bench_table.md"
# FLA's GPU time by kernel at each shape, beside profile.md and profile_shape<n>.md (ours).
for i in 0 1 2; do
  [ -f /tmp/fla_trace_$i.json ] || continue
  suffix=$([ $i -eq 0 ] || echo _shape$((i + 1)))
  python3 scripts/gpu/trace_summary.py /tmp/fla_trace_$i.json 30 3 >"$OUT/fla_profile$suffix.md"
done
# The compiled kernels for the next call to carry (README, GPU work), where they fit a returned file.
# At most four pieces: the carry's 64 MiB hold them beside .deps and .whl (data/corpus is not needed here).
# Not with SKIP_FLA: an empty cache returned would replace a good one where it is copied back.
mkdir -p /tmp/detached_extra
if [ -n "${SKIP_FLA:-}" ]; then
  echo "Triton cache not returned (SKIP_FLA)"
else
  tar -cf - -C "$TRITON_CACHE_DIR" . | xz -T0 -6 >/tmp/triton-cache.txz &&
    [ "$(stat -c %s /tmp/triton-cache.txz)" -le $((60 << 20)) ] &&
    split -b 15M -d -a 1 /tmp/triton-cache.txz /tmp/detached_extra/triton-cache.part &&
    echo "Triton cache returned: $(du -h /tmp/triton-cache.txz | cut -f1) in $(ls /tmp/detached_extra/triton-cache.part* | wc -l) pieces" ||
    echo "Triton cache not returned (not packed, or over four 15 MiB pieces: $(du -h /tmp/triton-cache.txz | cut -f1))"
fi
[ -n "${SKIP_LAYERS:-}" ] && { stage "done (layers skipped: SKIP_LAYERS)"; exit 0; }
stage "layers: GDN against attention at 7b.yaml's width, 8K tokens"
build-gpu/hybrid-bench-layers --json "$OUT/layers_bench.json" --profile /tmp/layers_trace.json \
  --profile-blocks /tmp/layers 2>&1 | tee "$OUT/bench_layers.md"
python3 scripts/gpu/trace_summary.py /tmp/layers_trace.json 30 3 >"$OUT/profile_layers.md"
for block in gdn attention; do
  python3 scripts/gpu/trace_summary.py /tmp/layers_${block}_block.json 30 3 >"$OUT/profile_${block}_block.md"
done
stage "done"
