"""
PNGs from one or more runs' metrics.jsonl: reward.png, accuracy.png, health.png.
Several runs are overlaid on the same axes (one colour per run) for comparison.

    python plot.py out/run1                      # writes into out/run1/
    python plot.py out/run1 out/run2 --out cmp   # overlay two runs into cmp/
    python plot.py out/run1 --window 20          # smoother moving average
"""
import argparse
import json
import math
import os

import matplotlib
matplotlib.use("Agg")  # no display: we only ever write files, often from a training loop
import matplotlib.pyplot as plt
from matplotlib.ticker import PercentFormatter

HEALTH_KEYS = ["reward_std", "zero_adv_frac", "completion_len", "grad_norm", "kl", "clip_frac"]


def read_metrics(run_dir):
    """All parseable JSON objects of run_dir/metrics.jsonl; a crash can leave a half-written last line."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:  # a truncated line can still parse, e.g. as a number
                rows.append(row)
    return rows


def moving_average(values, window):
    """Trailing mean over the last `window` values; the first points average what exists so far."""
    window, out, total = max(1, window), [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def series(rows, split, key):
    """(steps, values) of `key` over the rows of one split, skipping rows that lack it."""
    # NaN/inf (a diverged step) would poison every later point of a moving average: drop them
    pts = [(r["step"], r[key]) for r in rows if r.get("split") == split
           and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pts], [v for _, v in pts]


def finish(ax, title, ylabel, drew):
    """Shared labelling; an empty axes says so instead of looking broken."""
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drew:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="gray")


def save(fig, path):
    """Write atomically so a reader (browser, README viewer) never sees a half-written PNG."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fig.savefig(tmp, format="png", dpi=100)  # explicit format: the temp name does not end in .png
    plt.close(fig)  # called at every eval: leaked figures would pile up in memory
    os.replace(tmp, path)
    return path


def plot_reward(runs, window):
    fns = sorted({k for _, rows in runs for r in rows for k in r if k.startswith("reward/")})
    split_fns = len(runs) == 1 and len(fns) > 1  # per-function curves are only readable for a single run
    fig, axes = plt.subplots(1, 2 if split_fns else 1, figsize=(13 if split_fns else 8, 5), squeeze=False)
    ax, drew = axes[0][0], False
    for i, (name, rows) in enumerate(runs):
        steps, vals = series(rows, "train", "reward")
        if steps:
            ax.plot(steps, vals, color=f"C{i}", alpha=0.3, linewidth=1)
            ax.plot(steps, moving_average(vals, window), color=f"C{i}", label=f"{name} (avg {window})")
            drew = True
    finish(ax, "train reward", "reward", drew)
    if split_fns:
        ax, drew = axes[0][1], False
        for j, fn in enumerate(fns):
            steps, vals = series(runs[0][1], "train", fn)
            if steps:
                ax.plot(steps, moving_average(vals, window), color=f"C{j}", label=fn[len("reward/"):])
                drew = True
        finish(ax, f"reward per function (avg {window})", "reward", drew)
    fig.tight_layout()
    return fig


def plot_accuracy(runs):
    fig, ax = plt.subplots(figsize=(8, 5))
    drew = False
    for i, (name, rows) in enumerate(runs):
        steps, vals = series(rows, "eval", "accuracy")
        if steps:
            ax.plot(steps, vals, color=f"C{i}", marker="o", label=f"{name} accuracy")
            drew = True
        for key in sorted({k for r in rows if r.get("split") == "eval" for k in r if k.startswith("pass@")}):
            steps, vals = series(rows, "eval", key)
            ax.plot(steps, vals, color=f"C{i}", marker=".", linestyle="--", label=f"{name} {key}")
            drew = True
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))  # metrics are fractions, people read percent
    finish(ax, "eval accuracy", "accuracy", drew)
    fig.tight_layout()
    return fig


def plot_health(runs, window):
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, key in zip(axes.flat, HEALTH_KEYS):
        drew = False
        for i, (name, rows) in enumerate(runs):
            steps, vals = series(rows, "train", key)
            if steps:
                ax.plot(steps, moving_average(vals, window), color=f"C{i}", label=name)
                drew = True
        finish(ax, f"{key} (avg {window})", key, drew)
    fig.tight_layout()
    return fig


def plot(run_dirs, out_dir, window=10):
    """Write reward.png, accuracy.png and health.png into out_dir; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    runs = [(os.path.basename(os.path.normpath(d)), read_metrics(d)) for d in run_dirs]
    return [save(plot_reward(runs, window), os.path.join(out_dir, "reward.png")),
            save(plot_accuracy(runs), os.path.join(out_dir, "accuracy.png")),
            save(plot_health(runs, window), os.path.join(out_dir, "health.png"))]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", help="output dir (default: the run dir for one run, else ./comparison)")
    parser.add_argument("--window", type=int, default=10, help="moving-average window in steps")
    args = parser.parse_args()
    out = args.out or (args.run_dirs[0] if len(args.run_dirs) == 1 else "comparison")
    for p in plot(args.run_dirs, out, args.window):
        print(p)
