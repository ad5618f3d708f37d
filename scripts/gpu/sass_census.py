#!/usr/bin/env python3
"""A kernel's instructions as compiled (SASS), counted without a GPU: for each function whose
mangled name matches, its main loop (the longest backward branch) by opcode and by segment between
block barriers, and with --base the same counts in another build and their differences.

Static counts: a loop body's instructions once each, branches not followed. For kernels whose step
loop is straight-line code (the state pass's, a chunk a step) they track what ncu counts a warp-step
(ncu_source_summary.py) closely enough to judge a change before spending device time on it; code
under a branch taken by few warps (the copies' loops) counts in full here. The twenty-second
session's use: per-row bulk copies (cp.async.bulk) compile to a 32-lane ELECT/R2UR waterfall per
row, so 2,299 loop instructions where cp.async took 1,549 (kernel notes, step 21).

Needs cuobjdump (CUDA's, or PyPI's nvidia-cuda-cuobjdump: --fetch puts it under
~/.cache/hybrid-train/cuda-tools). Objects are the build's, e.g.
build/CMakeFiles/hybrid.dir/kernels/delta_state_pass.cu.o (sm_90a by default):

  python3 scripts/gpu/sass_census.py OBJECT.o 'state_pass_kernelILi48ELb1ELNS2_7QueriesE3ELi96E' [--base OTHER.o]
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import zipfile

CACHE = os.path.expanduser("~/.cache/hybrid-train/cuda-tools")
INTEGER = ("IMAD", "IADD3", "LEA", "ISETP", "LOP3", "SHF", "VIADD", "SEL", "MOV", "PRMT", "IABS", "UIADD3", "UIMAD")
WATCHED = ("HMMA", "LDSM", "LDGSTS", "UBLKCP", "ELECT", "STS", "LDS", "STG", "LDG", "BRA")
INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def cuobjdump(fetch):
    """The cuobjdump to use: $CUOBJDUMP, PATH, CUDA's, the cache; with fetch, PyPI's into the cache."""
    for candidate in (os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    for root, _, files in os.walk(CACHE):
        if "cuobjdump" in files:
            return os.path.join(root, "cuobjdump")
    if not fetch:
        sys.exit("sass_census: no cuobjdump (set CUOBJDUMP, or run with --fetch to get PyPI's nvidia-cuda-cuobjdump)")
    os.makedirs(CACHE, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-d", CACHE, "nvidia-cuda-cuobjdump"], check=True)
    for name in os.listdir(CACHE):
        if name.endswith(".whl"):
            zipfile.ZipFile(os.path.join(CACHE, name)).extractall(CACHE)
    return cuobjdump(fetch=False)


def functions(sass):
    """{mangled name: [(address, instruction text)]} from cuobjdump -sass output."""
    out, name = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = INSTRUCTION.match(line)
        if m and name:
            out[name].append((int(m.group(1), 16), m.group(2)))
    return out


def opcode(text):
    """The opcode's first word without predicate or modifiers: '@!P0 IMAD.WIDE R2, ...' -> 'IMAD'."""
    text = re.sub(r"^@!?U?P\w+\s+", "", text)
    return text.split()[0].split(".")[0] if text else ""


def main_loop(instructions):
    """(first, last) address of the longest backward branch's span, or of the whole function."""
    best = None
    for address, text in instructions:
        m = re.search(r"\bBRA(?:\.\S+)? (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < address:
            span = (address - int(m.group(1), 16), int(m.group(1), 16), address)
            best = max(best, span) if best else span
    return (best[1], best[2]) if best else (instructions[0][0], instructions[-1][0])


def census(instructions):
    """The main loop's counts: total, by opcode, and per segment between BAR.SYNC."""
    lo, hi = main_loop(instructions)
    body = [text for address, text in instructions if lo <= address <= hi]
    segments, current = [], []
    for text in body:
        current.append(text)
        if opcode(text) == "BAR":
            segments.append(current)
            current = []
    segments.append(current)
    return {"span": (lo, hi), "total": len(body), "opcodes": collections.Counter(map(opcode, body)),
            "segments": [collections.Counter(map(opcode, s)) for s in segments]}


def segment_line(counts):
    integer = sum(counts[o] for o in INTEGER)
    watched = ", ".join(f"{o} {counts[o]}" for o in WATCHED if counts[o])
    return f"{sum(counts.values()):5d} instructions ({integer} integer; {watched})"


def report(name, c, base=None):
    print(f"{name}\n  main loop {c['span'][0]:#x}..{c['span'][1]:#x}: {c['total']} instructions"
          + (f" (base {base['total']}, {c['total'] - base['total']:+d})" if base else ""))
    top = c["opcodes"].most_common(16)
    print("  by opcode: " + ", ".join(
        f"{o} {n}" + (f" ({n - base['opcodes'][o]:+d})" if base else "") for o, n in top))
    for i, s in enumerate(c["segments"]):
        line = f"  segment {i}: {segment_line(s)}"
        if base and i < len(base["segments"]):
            line += f"  [base {sum(base['segments'][i].values())}]"
        print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("object", help="an object file or executable with device code")
    ap.add_argument("kernel", help="a regular expression the mangled function name must contain a match of")
    ap.add_argument("--base", help="the same kernels in another build, to compare with")
    ap.add_argument("--fetch", action="store_true", help="download PyPI's cuobjdump if none is found")
    args = ap.parse_args()
    tool = cuobjdump(args.fetch)
    dump = lambda path: functions(subprocess.run([tool, "-sass", path], capture_output=True, text=True,
                                                 check=True).stdout)
    found = {n: f for n, f in dump(args.object).items() if re.search(args.kernel, n)}
    if not found:
        sys.exit(f"sass_census: no function matching {args.kernel!r} in {args.object}")
    # Anonymous namespaces carry a hash of the file's path: the same kernel in another build differs there.
    same = lambda name: re.sub(r"_GLOBAL__N__[0-9a-f]+_", "_GLOBAL__N__", name)
    base = {same(n): f for n, f in dump(args.base).items()} if args.base else {}
    for name, instructions in sorted(found.items()):
        report(name, census(instructions), census(base[same(name)]) if same(name) in base else None)


if __name__ == "__main__":
    main()
