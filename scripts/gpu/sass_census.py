#!/usr/bin/env python3
"""A kernel's instructions as compiled (SASS), counted without a GPU: for each function whose
mangled name matches, its main loop (the longest backward branch) by opcode and by segment between
block barriers, and with --base the same counts in another build and their differences.

Static counts: a loop body's instructions once each. They differ from what ncu counts a warp-step
(ncu_source_summary.py) where code sits under branches few warps take or inside inner loops (the
forward state pass: 1,551 static, 1,228 executed a warp-step, twenty-second session), so they
compare builds of one kernel rather than say where its time goes. That session's use: per-row
bulk copies (cp.async.bulk) compile to a 32-lane ELECT/R2UR waterfall per row, 2,299 loop
instructions where cp.async took 1,551 (kernel notes, step 21), seen before any device time.

--lines attributes the loop's instructions to source lines (the build compiles device code with
-lineinfo, which leaves the SASS as it is; the line inlined at too where nvdisasm gives it);
with --executed, ncu's SASS source page (SOURCE=1 scripts/gpu/ncu_kernels.sh, its
ncu_source.csv) weights each instruction by its executions, divided by --per (warps x steps):
instructions a warp-step by source line, what the static count cannot give for branches.

Needs cuobjdump (CUDA's, or PyPI's nvidia-cuda-cuobjdump: --fetch puts it under
~/.cache/hybrid-train/cuda-tools; --lines also nvdisasm, PyPI's nvidia-cuda-nvdisasm). Objects
are the build's, e.g. build/CMakeFiles/hybrid.dir/kernels/delta_state_pass.cu.o (sm_90a):

  python3 scripts/gpu/sass_census.py OBJECT.o 'state_pass_kernelILi48ELb1ELNS2_7QueriesE3ELi96E' [--base OTHER.o]
  python3 scripts/gpu/sass_census.py OBJECT.o KERNEL --lines [--executed ncu_source.csv --launch 0 --per 184320]
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

CACHE = os.path.expanduser("~/.cache/hybrid-train/cuda-tools")
INTEGER = ("IMAD", "IADD3", "LEA", "ISETP", "LOP3", "SHF", "VIADD", "SEL", "MOV", "PRMT", "IABS", "UIADD3", "UIMAD")
WATCHED = ("HMMA", "LDSM", "LDGSTS", "UBLKCP", "ELECT", "STS", "LDS", "STG", "LDG", "BRA", "LDL", "STL")
INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def cuda_tool(tool, fetch):
    """cuobjdump or nvdisasm: $CUOBJDUMP / $NVDISASM, PATH, CUDA's, the cache; with fetch, PyPI's
    wheel (nvidia-cuda-<tool>) unpacked into the cache."""
    for candidate in (os.environ.get(tool.upper()), shutil.which(tool), f"/usr/local/cuda/bin/{tool}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    for root, _, files in os.walk(CACHE):
        if tool in files:
            os.chmod(os.path.join(root, tool), 0o755)
            return os.path.join(root, tool)
    if not fetch:
        sys.exit(f"sass_census: no {tool} (set {tool.upper()}, or run with --fetch to get PyPI's nvidia-cuda-{tool})")
    os.makedirs(CACHE, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-d", CACHE, f"nvidia-cuda-{tool}"], check=True)
    for name in os.listdir(CACHE):
        if name.endswith(".whl") and tool in name:
            zipfile.ZipFile(os.path.join(CACHE, name)).extractall(CACHE)
    return cuda_tool(tool, fetch=False)


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


def functions_with_lines(listing):
    """{mangled name: [(offset, instruction, source line)]} from nvdisasm -g -c: the line is
    "file:line" of the code the instruction came from, "<- file:line" where that was inlined.
    Branch targets (labels there) become addresses, as cuobjdump prints them."""
    out, name, line, labels, pending = {}, None, "?", {}, []
    for text in listing.splitlines():
        m = re.match(r"//-+ \.text\.(\S+) -+", text)
        if m:
            name, line, pending = m.group(1), "?", []  # labels are the file's: one dict for all
            out[name] = []
            continue
        m = re.search(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?', text)
        if m:
            line = f"{os.path.basename(m.group(1))}:{m.group(2)}"
            if m.group(3):
                line += f" <- {os.path.basename(m.group(3))}:{m.group(4)}"
            continue
        m = re.match(r"^(\.L_x_\d+):", text)
        if m:
            pending.append(m.group(1))
            continue
        m = INSTRUCTION.match(text)
        if m and name:
            address = int(m.group(1), 16)
            for label in pending:
                labels[label] = address
            pending = []
            out[name].append([address, m.group(2), line])
    for instructions in out.values():
        for entry in instructions:
            entry[1] = re.sub(r"`\((\.L_x_\d+)\)", lambda m: hex(labels.get(m.group(1), 0)), entry[1])
    return {n: [tuple(e) for e in f] for n, f in out.items()}


def executed_counts(csv_path, launch):
    """[executions] of a launch's instructions in order, from ncu's SASS source page (CSV)."""
    import ncu_source_summary  # beside this file
    for i, (_, rows) in enumerate(ncu_source_summary.launches(csv_path)):
        if i == launch:
            return [ncu_source_summary.number(r, "Instructions Executed") for r in rows]
    sys.exit(f"sass_census: no launch {launch} in {csv_path}")


def by_line(instructions, executed=None, per=1.0):
    """The main loop's instructions by source line: {line: (count, Counter of opcodes)}, counted
    once each, or weighted by executed[i] / per (the function's i-th instruction)."""
    lo, hi = main_loop([(a, t) for a, t, _ in instructions])
    lines = collections.defaultdict(lambda: [0.0, collections.Counter()])
    for i, (address, text, line) in enumerate(instructions):
        if lo <= address <= hi:
            weight = executed[i] / per if executed is not None else 1.0
            lines[line][0] += weight
            lines[line][1][opcode(text)] += weight
    return dict(lines)


def opcode(text):
    """The opcode's first word without predicate or modifiers: '@!P0 IMAD.WIDE R2, ...' -> 'IMAD'."""
    text = re.sub(r"^@!?U?P\w+\s+", "", text)
    return text.split()[0].split(".")[0] if text else ""


def main_loop(instructions):
    """(first, last) address of the longest backward branch's span, or of the whole function. In a
    warp-specialised kernel (setmaxnreg), the computing warps' loop: the longest backward branch
    between their register claim (USETMAXREG.TRY_ALLOC) and the next release (DEALLOC) or the end,
    where a branch of the whole block (BRA.DIV's) spans both warpgroups' code."""
    claim = next((a for a, t in instructions if "USETMAXREG.TRY_ALLOC" in t), None)
    release = next((a for a, t in instructions if claim is not None and a > claim and "USETMAXREG.DEALLOC" in t),
                   None)
    inside = lambda a: claim is None or (claim < a and (release is None or a < release))
    best = None
    for address, text in instructions:
        m = re.search(r"\bBRA(?:\.\S+)? (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < address and inside(address) and inside(int(m.group(1), 16)):
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
    ap.add_argument("--fetch", action="store_true", help="download PyPI's cuobjdump (nvdisasm) if none is found")
    ap.add_argument("--lines", action="store_true", help="the main loop by source line (needs -lineinfo)")
    ap.add_argument("--executed", help="ncu's SASS source page (CSV) to weight the lines by executions")
    ap.add_argument("--launch", type=int, default=0, help="which launch of that CSV (0 = the first)")
    ap.add_argument("--per", type=float, default=1.0, help="divide executions by this (warps x steps)")
    ap.add_argument("--top", type=int, default=30, help="source lines to print")
    args = ap.parse_args()
    tool = cuda_tool("cuobjdump", args.fetch)
    if args.lines:
        print_lines(args, tool)
        return
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


def print_lines(args, tool):
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([tool, "-xelf", "all", os.path.abspath(args.object)], cwd=tmp, check=True, capture_output=True)
        listing = "".join(subprocess.run([cuda_tool("nvdisasm", args.fetch), "-g", "-c", os.path.join(tmp, f)],
                                         capture_output=True, text=True, check=True).stdout
                          for f in sorted(os.listdir(tmp)) if f.endswith(".cubin"))
    found = {n: f for n, f in functions_with_lines(listing).items() if re.search(args.kernel, n)}
    if not found:
        sys.exit(f"sass_census: no function matching {args.kernel!r} in {args.object}")
    executed = executed_counts(args.executed, args.launch) if args.executed else None
    for name, instructions in sorted(found.items()):
        if executed is not None and len(executed) != len(instructions):
            sys.exit(f"sass_census: the CSV's launch has {len(executed)} instructions, {name} {len(instructions)}: "
                     "another build?")
        lines = by_line(instructions, executed, args.per)
        total = sum(n for n, _ in lines.values())
        what = "executed a warp-step" if executed is not None else "in the main loop, counted once"
        print(f"{name}\n  {total:,.1f} instructions {what}; by source line:")
        for line, (n, ops) in sorted(lines.items(), key=lambda kv: -kv[1][0])[: args.top]:
            mix = ", ".join(f"{o} {c:.0f}" for o, c in ops.most_common(4))
            print(f"  {n:8.1f}  {line:60s} {mix}")


if __name__ == "__main__":
    main()
