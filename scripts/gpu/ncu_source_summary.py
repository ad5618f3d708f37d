#!/usr/bin/env python3
"""Where a kernel's instructions and stalls go, from Nsight Compute's SASS source page.

Reads the CSV that `SOURCE=1 scripts/gpu/ncu_kernels.sh` writes (`ncu --page source --print-source
sass --csv`: one block of rows per profiled launch) and prints, for each launch or the one chosen
with --launch: the executed instructions by opcode and by segment (the code between two barriers,
so a state pass's stages line up with its __syncthreads), with the share of the warp-stall samples
each takes and their main reasons, then the instructions with the most samples.

Counts are per warp and per step when --warps and --steps are given (the state pass at the OLMo
shape: 180 blocks x 8 warps, 128 chunk steps), else totals.

  python3 scripts/gpu/ncu_source_summary.py ncu_source.csv --launch 0 --warps 1440 --steps 128
"""
import argparse
import collections
import csv
import re


def blocks(path):
    """Yields (kernel name, rows as dicts) for each block of rows in the CSV."""
    name, header, rows = None, None, []
    with open(path, newline="") as f:
        for r in csv.reader(f):
            if not r:
                continue
            if r[0] == "Kernel Name":
                if name is not None:
                    yield name, rows
                name, header, rows = r[1], None, []
            elif r[0] == "Address":
                header = r
            elif header is not None:
                rows.append(dict(zip(header, r)))
    if name is not None:
        yield name, rows


def launches(path):
    """Yields (kernel name, rows) for each launch: ncu 2025's export writes every launch's block
    twice in a row (seventeenth session: 8 blocks for 4 launches), so a block equal to the one
    before it is passed over."""
    previous = None
    for block in blocks(path):
        if block != previous:
            yield block
        previous = block


def number(row, column):
    value = row.get(column, "0")
    return float(value) if value not in ("", "-") else 0.0


def opcode(source):
    m = re.match(r"\s*(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", source)
    return m.group(1) if m else source.strip()


def summarize(name, rows, per, top):
    stall_columns = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
    executed = sum(number(r, "Instructions Executed") for r in rows)
    samples = sum(number(r, "Warp Stall Sampling (All Samples)") for r in rows) or 1.0
    print(f"{name}\n  {executed / per:,.1f} instructions{' a warp-step' if per != 1 else ''}, "
          f"{samples:,.0f} stall samples")

    by_op, op_samples = collections.Counter(), collections.Counter()
    for r in rows:
        op = opcode(r["Source"])
        by_op[op] += number(r, "Instructions Executed")
        op_samples[op] += number(r, "Warp Stall Sampling (All Samples)")
    print("  by opcode: " + ", ".join(f"{op} {n / per:.1f} ({op_samples[op] / samples:.0%} of samples)"
                                      for op, n in by_op.most_common(12)))

    # Segments: a new one starts after each barrier.
    segments, current = [], []
    for r in rows:
        current.append(r)
        if "BAR.SYNC" in r["Source"]:
            segments.append(current)
            current = []
    segments.append(current)
    print("  segment (addresses)            instructions  HMMA   LDGSTS  samples  main stall reasons")
    for seg in segments:
        n = sum(number(r, "Instructions Executed") for r in seg)
        if n == 0:
            continue
        hmma = sum(number(r, "Instructions Executed") for r in seg if opcode(r["Source"]) == "HMMA")
        copies = sum(number(r, "Instructions Executed") for r in seg if opcode(r["Source"]) == "LDGSTS")
        s = sum(number(r, "Warp Stall Sampling (All Samples)") for r in seg)
        reasons = collections.Counter({c[6:]: sum(number(r, c) for r in seg) for c in stall_columns})
        main = ", ".join(f"{k} {v / samples:.0%}" for k, v in reasons.most_common(3) if v)
        print(f"  {seg[0]['Address'][-5:]}..{seg[-1]['Address'][-5:]}  {n / per:20.1f} {hmma / per:6.1f} "
              f"{copies / per:7.1f}  {s / samples:6.1%}  {main}")

    print(f"  the {top} instructions with the most samples:")
    for r in sorted(rows, key=lambda r: -number(r, "Warp Stall Sampling (All Samples)"))[:top]:
        print(f"    {r['Address'][-5:]}  {number(r, 'Warp Stall Sampling (All Samples)') / samples:5.1%}  "
              f"{r['Source'].strip()[:80]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--launch", type=int, help="only this launch (0 = the first in the file)")
    parser.add_argument("--warps", type=int, default=1, help="warps in the grid, to count per warp")
    parser.add_argument("--steps", type=int, default=1, help="loop steps a warp makes, to count per step")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    for i, (name, rows) in enumerate(launches(args.csv)):
        if args.launch is None or args.launch == i:
            summarize(f"launch {i}: {name}", rows, args.warps * args.steps, args.top)


if __name__ == "__main__":
    main()
