# Sourced by ab_bench.sh (SANITIZE=1) and bench_kernels.sh: the GPU tests on small shapes that
# compute-sanitizer's memcheck and racecheck run, as one gtest filter. The delta rule's kernels
# (the op on small shapes, the wide value tiles and the one-an-SM tiles, whose state passes have a
# producer warpgroup; the passes with the state in registers; wy_backward, the finish kernel, T's
# split), the chunk layout (o's gradient with add), RoPE, the norms and the conv (the column
# slices they read in place). Racecheck of all
# of them took about 510 s for one tree (twenty-fifth session): SANITIZE_FILTER narrows an A/B's.
SANITIZER_TESTS='DeltaRuleCuda.Small*:DeltaRuleCuda.WideValueTiles:DeltaRuleCuda.OneBlockAnSM'
SANITIZER_TESTS+=':DeltaRuleCuda.RegistersPassMatchesTheWarpPass'
SANITIZER_TESTS+=':DeltaRuleChunkTermsCuda.WyBackward*:DeltaRuleChunkTermsCuda.Finish*:DeltaRuleChunkTermsCuda.SplitT'
SANITIZER_TESTS+=':ChunkLayoutCuda.*:RopeCuda.*:RMSNormCuda.Small*:RMSNormCuda.ColumnSlice*:GatedRMSNormCuda.Small*:GatedRMSNormCuda/GatedRMSNormGateSlices.*'
SANITIZER_TESTS+=':CausalConvCuda.Small*:CausalConvCuda.ColumnSlice*:AddRMSNormCuda.*:AddNormedCuda.*'
