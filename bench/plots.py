#!/usr/bin/env python3
"""bench/plots.py — pictures of recorded results, written beside the files they draw.

One command draws every figure the README shows from the records in bench/results/:

  python3 bench/plots.py                      # the records named in DEFAULTS below
  python3 bench/plots.py --kernels K.csv --trace T.csv --replay DIR --out DIR   # other records

Figures (PNG):
  kernels_pct_ceiling.png   % of the stream-read ceiling per kernel case (fp16): the best
                            configuration of each route, the scheduler's planned one and
                            FlashInfer's two paths (from `pkv-bench kernels --csv`)
  trace_vs_flashinfer.png   the planned route (adaptive) / FlashInfer's better path per workload,
                            attention and wall (from `pkv-bench trace --csv`, mean over seeds)
  replay_tbt_tokens.png     time between tokens (CDF) and decode tokens per second of a replay
                            with arrivals (from `pkv-replay --timeline_csv`)
  replay_kv_reserved.png    KV reserved and used over time, paged worker against the static
                            reservation baseline (two `--timeline_csv` files)
Needs matplotlib (Debian: python3-matplotlib). Errors name the file and the missing column.
"""
import argparse
import csv
import os
import sys
from collections import defaultdict

# The records the README's figures come from (relative to the repository root).
DEFAULTS = {
    "kernels": "bench/results/h200-kernels-0cb078b/kernels/kernels_g4.csv",
    "trace": "bench/results/h200-kernels-0cb078b/serving/trace.csv",
    "replay": "bench/results/h200-e2e-timeline-dc3a2da/e2e",
}


class PlotError(Exception):
    pass


def read_csv(path, required):
    """Rows of a CSV (lines starting with '#' skipped) as dicts; PlotError names a missing column."""
    if not os.path.exists(path):
        raise PlotError(f"{path}: no such file")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    if not rows:
        raise PlotError(f"{path}: no rows")
    missing = [c for c in required if c not in rows[0]]
    if missing:
        raise PlotError(f"{path}: missing column(s) {', '.join(missing)}")
    return rows


def pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise PlotError("matplotlib is not installed (Debian: apt install python3-matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


KERNEL_FAMILIES = [  # (family in the CSV, legend)
    ("per_request", "per-request"),
    ("sequence_split", "sequence-split"),
    ("workqueue_fused", "work queue"),
    ("planned", "planned (what the engine runs)"),
    ("fi_decode", "FlashInfer decode"),
    ("fi_prefill", "FlashInfer prefill (tensor cores)"),
]


def plot_kernels(path, out, dtype="fp16"):
    rows = read_csv(path, ["dtype", "case", "family", "pct_stream"])
    best = defaultdict(dict)  # case -> family -> best % of the ceiling
    cases = []
    for r in rows:
        if r["dtype"] != dtype:
            continue
        if r["case"] not in best:
            cases.append(r["case"])
        pct = float(r["pct_stream"])
        fam = r["family"]
        if pct > best[r["case"]].get(fam, -1.0):
            best[r["case"]][fam] = pct
    if not cases:
        raise PlotError(f"{path}: no {dtype} rows")
    families = [(f, label) for f, label in KERNEL_FAMILIES if any(f in best[c] for c in cases)]
    groups = [("batch x context grid", [c for c in cases if "_" not in c]),
              ("mixed-length steps of the mission's workloads", [c for c in cases if "_" in c])]
    groups = [(t, cs) for t, cs in groups if cs]
    plt = pyplot()
    fig, axes = plt.subplots(len(groups), 1, figsize=(18, 4.2 * len(groups)), squeeze=False)
    width = 0.8 / len(families)
    for ax, (title, cs) in zip(axes[:, 0], groups):
        for i, (fam, label) in enumerate(families):
            xs = [j + (i - (len(families) - 1) / 2) * width for j in range(len(cs))]
            ax.bar(xs, [best[c].get(fam, 0.0) for c in cs], width, label=label)
        ax.set_xticks(range(len(cs)))
        ax.set_xticklabels(cs, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("% of the stream-read ceiling")
        ax.set_ylim(0, 105)
        ax.set_xlim(-0.6, len(cs) - 0.4)
        ax.set_title(f"{title} ({dtype}): best configuration of each route, the planned one, FlashInfer", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_trace(path, out):
    rows = read_csv(path, ["workload", "batch", "arm", "tok_per_s_attend", "tok_per_s_wall"])
    sums = defaultdict(lambda: [0.0, 0.0, 0])  # (workload B, arm) -> attend, wall, n
    order = []
    for r in rows:
        key = f"{r['workload']} B{r['batch']}"
        if key not in order:
            order.append(key)
        s = sums[(key, r["arm"])]
        s[0] += float(r["tok_per_s_attend"])
        s[1] += float(r["tok_per_s_wall"])
        s[2] += 1
    ratios = []  # workload, attention ratio, wall ratio, FlashInfer path
    for key in order:
        if (key, "adaptive") not in sums:
            continue
        a = sums[(key, "adaptive")]
        fi = [(sums[(key, p)][0] / sums[(key, p)][2], sums[(key, p)][1] / sums[(key, p)][2], p)
              for p in ("fi_decode", "fi_prefill") if (key, p) in sums]
        if not fi:
            continue
        fa, fw, name = max(fi)  # FlashInfer's better path by attention tokens/s
        ratios.append((key, a[0] / a[2] / fa, a[1] / a[2] / fw, name))
    if not ratios:
        raise PlotError(f"{path}: no workload with both the adaptive arm and a FlashInfer arm")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = range(len(ratios))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in ratios], 0.4, label="attention time")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in ratios], 0.4, label="wall time (host work included)")
    for x, r in zip(xs, ratios):
        ax.text(x - 0.2, r[1] + 0.01, f"{r[1]:.2f}", ha="center", fontsize=8)
        ax.text(x + 0.2, r[2] + 0.01, f"{r[2]:.2f}", ha="center", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r[0]}\nvs {r[3]}" for r in ratios], fontsize=8)
    ax.set_ylabel("planned route / FlashInfer (tokens/s)")
    ax.set_ylim(0, max(1.3, max(max(r[1], r[2]) for r in ratios) + 0.1))
    ax.set_title("Through the engine: planned route / FlashInfer", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def read_timeline(path):
    rows = read_csv(path, ["kind", "t_s", "value", "value2"])
    series = defaultdict(list)
    for r in rows:
        series[r["kind"]].append(r)
    return series


def plot_replay(path, out, title):
    series = read_timeline(path)
    if not series["tbt"] or not series["tokens"]:
        raise PlotError(f"{path}: no 'tbt' or 'tokens' rows (a replay with measured decode steps?)")
    tbt = sorted(float(r["value"]) for r in series["tbt"])
    per_second = defaultdict(int)
    for r in series["tokens"]:
        per_second[int(float(r["t_s"]))] += int(r["value"])
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    n = len(tbt)
    a1.plot(tbt, [(i + 1) / n for i in range(n)])
    for q in (0.5, 0.99):
        v = tbt[min(n - 1, int(q * n))]
        a1.axvline(v, color="gray", linewidth=0.6, linestyle="--")
        a1.text(v, 0.05 + 0.4 * (q == 0.5), f" p{int(q * 100)} {v:.1f} ms", fontsize=8)
    a1.set_xlabel("time between tokens of a row, ms")
    a1.set_ylabel("fraction of tokens")
    a1.set_title("time between tokens (CDF)")
    secs = range(min(per_second), max(per_second) + 1)
    a2.bar(list(secs), [per_second.get(s, 0) for s in secs], 1.0)
    a2.set_xlabel("seconds since the replay started")
    a2.set_ylabel("decode tokens in that second")
    a2.set_title("decode tokens per second")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_kv(paged_path, static_path, out):
    curves = []
    for label, path in (("paged", paged_path), ("static reservation", static_path)):
        kv = read_timeline(path)["kv"]
        if not kv:
            raise PlotError(f"{path}: no 'kv' rows (was --pool_sample_ms 0?)")
        curves.append((label, [float(r["t_s"]) for r in kv], [float(r["value"]) / 2**30 for r in kv],
                       [float(r["value2"]) / 2**30 for r in kv]))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for (label, t, reserved, used), color in zip(curves, ("tab:blue", "tab:red")):
        ax.plot(t, reserved, color=color, label=f"{label}: reserved")
        ax.plot(t, used, color=color, linestyle=":", label=f"{label}: used")
    ax.set_xlabel("seconds since the replay started")
    ax.set_ylabel("KV, GiB")
    ax.set_title("KV reserved vs used over a trace replay: paged pool against static max-context slots")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default=DEFAULTS["kernels"], help="pkv-bench kernels CSV ('' skips)")
    p.add_argument("--trace", default=DEFAULTS["trace"], help="pkv-bench trace CSV ('' skips)")
    p.add_argument("--replay", default=DEFAULTS["replay"],
                   help="folder of an e2e run with azure_conv.timeline.csv and azure_conv_static.timeline.csv ('' skips)")
    p.add_argument("--out", default="", help="write every figure here (default: beside the file it draws)")
    a = p.parse_args(argv)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    written = []
    try:
        if a.kernels:
            written.append(plot_kernels(a.kernels, os.path.join(a.out or os.path.dirname(a.kernels), "kernels_pct_ceiling.png")))
        if a.trace:
            written.append(plot_trace(a.trace, os.path.join(a.out or os.path.dirname(a.trace), "trace_vs_flashinfer.png")))
        if a.replay:
            paged = os.path.join(a.replay, "azure_conv.timeline.csv")
            static = os.path.join(a.replay, "azure_conv_static.timeline.csv")
            out = a.out or a.replay
            written.append(plot_replay(paged, os.path.join(out, "replay_tbt_tokens.png"),
                                       "Azure conversation slice with its arrival times, paged worker"))
            written.append(plot_kv(paged, static, os.path.join(out, "replay_kv_reserved.png")))
    except PlotError as e:
        print(f"plots: {e}", file=sys.stderr)
        return 1
    for w in written:
        print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
