#!/usr/bin/env python3
"""scripts/gpu/sass_census.py's reading of cuobjdump -sass output, on a made-up function: the main
loop found by its backward branch, the loop's instructions split at block barriers, opcodes
without predicates or modifiers. (No cuobjdump needed: the parser is fed text.)"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "gpu"))
import sass_census  # noqa: E402

SASS = """
	code for sm_90a
		Function : _Z6kernelv
	.headerflags	@"EF_CUDA_TEXMODE_UNIFIED"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                  /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_TID.X ;                       /* 0x0000000000007919 */
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;            /* 0x0000000000007b1d */
        /*0030*/                   LDSM.16.M88.4 R4, [R2] ;                 /* 0x000000000204783b */
        /*0040*/                   HMMA.16816.F32.BF16 R8, R4, R6, RZ ;     /* 0x000000060408723c */
        /*0050*/               @!P0 IMAD.WIDE.U32 R2, R0, 0x4, R2 ;         /* 0x0000000400028825 */
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;            /* 0x0000000000007b1d */
        /*0070*/               @P1 LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;  /* 0x00000000060379ae */
        /*0080*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;     /* 0x000000060408723c */
        /*0090*/               @P2 BRA 0x30 ;                               /* 0xfffffffc00e02947 */
        /*00a0*/               @P3 BRA 0x80 ;                               /* 0xfffffffc00e02947 */
        /*00b0*/                   EXIT ;                                   /* 0x000000000000794d */
		Function : _Z5otherv
        /*0000*/                   EXIT ;                                   /* 0x000000000000794d */
"""

# nvdisasm -g -c: a section a function, line comments, labels as branch targets.
LISTING = """
//--------------------- .text._Z6kernelv --------------------------
	.section	.text._Z6kernelv,"ax",@progbits
_Z6kernelv:
	//## File "/src/kernels/a.cuh", line 10
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
	//## File "/src/kernels/b.cuh", line 20 inlined at "/src/kernels/a.cuh", line 12
        /*0010*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0020*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
	//## File "/src/kernels/a.cuh", line 13
        /*0030*/               @P0 BRA `(.L_x_0) ;
        /*0040*/                   EXIT ;
"""


# A warp-specialised kernel: the computing warps claim registers, loop, exit; the producer's warps
# release theirs and loop; a block-wide branch (BRA.DIV's) spans both and is the longest.
SPECIALISED = """
		Function : _Z4wsv
        /*0000*/               @P0 BRA 0x60 ;
        /*0010*/                   USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0x98 ;
        /*0020*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0030*/                   LDL R2, [R1] ;
        /*0040*/               @P1 BRA 0x20 ;
        /*0050*/                   EXIT ;
        /*0060*/                   USETMAXREG.DEALLOC.CTAPOOL 0x28 ;
        /*0070*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0080*/               @P2 BRA 0x70 ;
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0x10 ;
"""


def specialised():
    code = sass_census.functions(SPECIALISED)["_Z4wsv"]
    assert sass_census.main_loop(code) == (0x20, 0x40), sass_census.main_loop(code)
    c = sass_census.census(code)
    assert c["total"] == 3 and c["opcodes"]["LDL"] == 1, c  # the spill shows among the watched


def lines():
    fns = sass_census.functions_with_lines(LISTING)
    code = fns["_Z6kernelv"]
    assert [a for a, _, _ in code] == [0x0, 0x10, 0x20, 0x30, 0x40], code
    assert code[3][1] == "@P0 BRA 0x10", code[3]  # the label resolved to its address
    assert code[1][2] == "b.cuh:20 <- a.cuh:12" and code[3][2] == "a.cuh:13", code
    static = sass_census.by_line(code)  # the loop 0x10..0x30: two HMMA and the branch
    assert static == {"b.cuh:20 <- a.cuh:12": [2.0, {"HMMA": 2.0}], "a.cuh:13": [1.0, {"BRA": 1.0}]}, static
    # Weighted by executions (ncu's, per instruction in order) over 4 warp-steps.
    weighted = sass_census.by_line(code, executed=[4, 40, 40, 40, 4], per=4)
    assert weighted["b.cuh:20 <- a.cuh:12"][0] == 20.0 and weighted["a.cuh:13"][0] == 10.0, weighted


def main():
    fns = sass_census.functions(SASS)
    assert sorted(fns) == ["_Z5otherv", "_Z6kernelv"], sorted(fns)
    code = fns["_Z6kernelv"]
    assert len(code) == 12 and code[5] == (0x50, "@!P0 IMAD.WIDE.U32 R2, R0, 0x4, R2"), code[5]
    assert sass_census.opcode(code[5][1]) == "IMAD" and sass_census.opcode(code[7][1]) == "LDGSTS"
    # The longest backward branch (0x90 -> 0x30), not the shorter one (0xa0 -> 0x80).
    assert sass_census.main_loop(code) == (0x30, 0x90)
    c = sass_census.census(code)
    assert c["total"] == 7, c["total"]
    assert c["opcodes"]["HMMA"] == 2 and c["opcodes"]["BAR"] == 1 and c["opcodes"]["BRA"] == 1, c["opcodes"]
    # Split after the loop's one barrier: LDSM, HMMA, IMAD, BAR | LDGSTS, HMMA, BRA.
    assert [sum(s.values()) for s in c["segments"]] == [4, 3], c["segments"]
    assert c["segments"][1]["LDGSTS"] == 1 and c["segments"][0]["IMAD"] == 1
    # A function without a backward branch is taken whole.
    assert sass_census.census(fns["_Z5otherv"])["total"] == 1
    lines()
    specialised()
    print("sass_census parser: ok")


if __name__ == "__main__":
    main()
