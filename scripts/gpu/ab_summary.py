"""The A/B rounds of scripts/gpu/ab_bench.sh (its ab.md) as one table: each side's mean over the
rounds of the op's fwd+bwd (and fwd without grad) at each shape and of the layer ratios, so that
the sides read side by side. usage: ab_summary.py AB_MD"""
import collections, re, sys

op = collections.defaultdict(list)      # (side, shape, what) -> values
ratio = collections.defaultdict(list)   # (side, mixer|block) -> values
for line in open(sys.argv[1]):
    m = re.match(r"(\w)\d+ op: (B\d+ T\d+ H\d+ K\d+ V\d+): fwd ([\d.]+) ms.*?(?:; ([\d.]+) ms without grad)?\), "
                 r"fwd\+bwd ([\d.]+) ms", line)
    if m:
        side, shape = m.group(1), m.group(2)
        op[side, shape, "fwd"].append(float(m.group(3)))
        if m.group(4):
            op[side, shape, "no grad"].append(float(m.group(4)))
        op[side, shape, "fwd+bwd"].append(float(m.group(5)))
        q = re.search(r"queued: fwd ([\d.]+), fwd\+bwd ([\d.]+) ms", line)
        if q:
            op[side, shape, "fwd+bwd queued"].append(float(q.group(2)))
        continue
    m = re.match(r"(\w)\d+ layers: (queued .*)?GDN / attention .*mixer ([\d.]+), block ([\d.]+)", line)
    if m:
        queued = " queued" if m.group(2) else ""
        ratio[m.group(1), "mixer" + queued].append(float(m.group(3)))
        ratio[m.group(1), "block" + queued].append(float(m.group(4)))

mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
sides = sorted({k[0] for k in op} | {k[0] for k in ratio})
shapes = sorted({k[1] for k in op}, key=lambda s: [int(x) for x in re.findall(r"\d+", s)])
columns = [(shape, what) for shape in shapes for what in ("fwd+bwd", "fwd+bwd queued", "fwd", "no grad")
           if any(op[s, shape, what] for s in sides)]
ratios = [k for k in ("mixer", "block", "mixer queued", "block queued") if any(ratio[s, k] for s in sides)] or ["mixer", "block"]
print("| side | " + " | ".join(f"{shape} {what} ms" for shape, what in columns) + " | " +
      " | ".join(f"{k} ratio" for k in ratios) + " |")
print("|---" * (len(columns) + len(ratios) + 1) + "|")
for s in sides:
    cells = [f"{mean(op[s, shape, what]):.3f}" for shape, what in columns]
    cells += [f"{mean(ratio[s, k]):.3f}" for k in ratios]
    print(f"| {s} | " + " | ".join(cells) + " |")
