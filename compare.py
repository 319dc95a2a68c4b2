"""Recipes compared over seeds: held-out accuracy at step 0 and at the end, the gain, with intervals.

    python compare.py configs/tiny.yaml configs/tiny_guided.yaml --seeds 0,1,2
    python compare.py configs/tiny.yaml configs/tiny_verifier.yaml --seeds 0,1,2 --baseline tiny --max_steps 50

Each recipe runs once per seed, as `python train.py --config RECIPE --seed K --out_dir out/compare/<recipe>/seed<K>`
plus any other --key value given here (they apply to every run). A finished run there is read, not run
again; an unfinished one is resumed; one whose config.json no longer matches what the recipe and flags
give (the recipe was edited since) stops compare.py with the keys that differ. The runs share `--sft_cache <out>/sft_cache` (sft.py): recipes that
differ only after the warm start train each seed's warm start once and start GRPO from the same weights
(`--sft_cache ''` trains it in every run). Then, per recipe: the mean over seeds and its 95% interval
(Student's t over seeds) of the accuracy at step 0, at the last eval and of the gain; each recipe's
paired difference to the baseline (the first recipe, or --baseline) on the seeds both have; and the
evaluation noise, the binomial standard error of one accuracy figure (questions x samples per question,
taken as independent: a lower bound when a question's samples agree), next to the spread over seeds.
It prints a markdown table, writes it to <out>/compare.md, and draws <out>/compare.png: each recipe's
mean accuracy curve with its 95% band over seeds.
"""
import dataclasses
import json
import math
import os
import subprocess
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

import config
import plot

ROOT = os.path.dirname(os.path.abspath(__file__))
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # by df


def name_of(recipe: str) -> str:
    return os.path.splitext(os.path.basename(recipe))[0]


def finished(run_dir: str) -> bool:
    """The run logged its eval at its last step (train.py evaluates at max_steps)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            max_steps = json.load(f)["max_steps"]
    except (OSError, ValueError, KeyError):
        return False
    return any(r["split"] == "eval" and r["step"] == max_steps for r in plot.read_metrics(run_dir))


def check_same_settings(recipe: str, seed: int, run_dir: str, extra: list[str]) -> None:
    """A run folder kept from before must have been trained with what the recipe and flags give now;
    keys its config.json lacks (added to Config since), where runs are written and whether they were
    resumed (a resumed run's config.json names the folder it went on from) are not compared."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            saved = config.renamed(json.load(f))
    except (OSError, ValueError):
        return  # no run there yet (or one that never got going): train.py starts it afresh
    now = json.loads(json.dumps(dataclasses.asdict(config.load(
        ["--config", recipe, "--seed", str(seed), "--out_dir", run_dir, *extra]))))
    differ = [f"{k}: {saved[k]!r} there, {now[k]!r} now" for k in now
              if k in saved and k not in ("out_dir", "sft_cache", "resume") and saved[k] != now[k]]
    if differ:
        raise config.UserError(f"{run_dir} was trained with other settings than {recipe} gives now ("
                               f"{'; '.join(differ)}): delete that folder to train it again, or pass --out "
                               f"for a fresh comparison")


def run(recipe: str, seed: int, run_dir: str, extra: list[str]) -> None:
    """train.py in its own process; an unfinished run folder is resumed (its flags are its config's)."""
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        argv = ["--resume", run_dir]
    else:
        argv = ["--config", recipe, "--seed", str(seed), "--out_dir", run_dir, *extra]
    print(f"compare: python train.py {' '.join(argv)}", flush=True)
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], check=True)


def mean_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% interval): Student's t over the values; 0 for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def run_figures(run_dir: str) -> dict:
    """Accuracy at step 0 and at the last eval, the gain, the eval curve, the eval noise of the last figure."""
    evals = [r for r in plot.read_metrics(run_dir) if r["split"] == "eval"]
    with open(os.path.join(run_dir, "config.json")) as f:
        samples = json.load(f)["eval_samples"]
    first, last = evals[0], evals[-1]
    p, n = last["accuracy"], last["n"] * samples
    return {"start": first["accuracy"], "end": p, "gain": p - first["accuracy"],
            "curve": {r["step"]: r["accuracy"] for r in evals}, "eval_se": math.sqrt(p * (1 - p) / max(1, n))}


def pct(mean: float, half: float) -> str:
    return f"{100 * mean:.1f} ± {100 * half:.1f}"


def table(results: dict, baseline: str) -> str:
    lines = ["| recipe | seeds | step 0 | end | gain | vs " + baseline + " (paired, end) | seed sd (end) | eval s.e. |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        seeds = sorted(runs)
        cells = [pct(*mean_interval([runs[s][k] for s in seeds])) for k in ("start", "end", "gain")]
        ends = [runs[s]["end"] for s in seeds]
        sd = math.sqrt(sum((v - sum(ends) / len(ends)) ** 2 for v in ends) / max(1, len(ends) - 1))
        shared = [s for s in seeds if s in results[baseline]]
        paired = "—" if name == baseline or not shared else pct(*mean_interval(
            [runs[s]["end"] - results[baseline][s]["end"] for s in shared]))
        noise = sum(runs[s]["eval_se"] for s in seeds) / len(seeds)
        lines.append(f"| {name} | {','.join(map(str, seeds))} | {cells[0]} | {cells[1]} | {cells[2]} | {paired} | "
                     f"{100 * sd:.1f} | {100 * noise:.1f} |")
    return "\n".join(lines) + ("\n\nAccuracy in %, mean ± the half-width of its 95% interval over seeds (Student's t); "
                               "the paired column is the mean per-seed difference to " + baseline + ".\n")


def draw(results: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in results.items():
        steps = sorted(set.intersection(*(set(r["curve"]) for r in runs.values())))
        stats = [mean_interval([r["curve"][s] for r in runs.values()]) for s in steps]
        means = [m for m, _ in stats]
        ax.plot(steps, means, marker="o", label=f"{name} ({len(runs)} seeds)")
        ax.fill_between(steps, [m - h for m, h in stats], [m + h for m, h in stats], alpha=0.2)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("mean over seeds, 95% band")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> dict:
    recipes = [a for a in argv if not a.startswith("--") and a.endswith((".yaml", ".yml"))]
    flags = config.parse_flags([a for a in argv if a not in recipes])
    seeds = [int(s) for s in flags.pop("seeds", "0,1,2").split(",")]
    out = flags.pop("out", "out/compare")
    baseline = flags.pop("baseline", name_of(recipes[0]) if recipes else "")
    if not recipes:
        raise config.UserError("which recipes? python compare.py configs/a.yaml configs/b.yaml [--seeds 0,1,2]")
    if baseline not in map(name_of, recipes):
        raise config.UserError(f"--baseline {baseline!r} is none of the recipes {[name_of(r) for r in recipes]}")
    for key in ("config", "seed", "out_dir", "resume"):
        if key in flags:
            raise config.UserError(f"--{key} is compare.py's to set for each run; pass recipes and --seeds instead")
    flags.setdefault("sft_cache", os.path.join(out, "sft_cache"))  # one warm start per seed for all recipes
    extra = [item for key, value in flags.items() for item in (f"--{key}", value)]
    results = {}
    for recipe in recipes:
        results[name_of(recipe)] = {}
        for seed in seeds:
            run_dir = os.path.join(out, name_of(recipe), f"seed{seed}")
            check_same_settings(recipe, seed, run_dir, extra)
            if not finished(run_dir):
                run(recipe, seed, run_dir, extra)
            results[name_of(recipe)][seed] = run_figures(run_dir)
    text = table(results, baseline)
    print(text)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(f"`python compare.py {' '.join(argv)}`\n\n{text}")
    draw(results, os.path.join(out, "compare.png"))
    print(f"{out}/compare.md, {out}/compare.png")
    return results


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except config.UserError as e:
        sys.exit(f"error: {e}")
