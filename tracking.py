"""The train line's figures, and experiment tracking beside metrics.jsonl: `report_to [tensorboard, wandb]`.

train_metrics turns one GRPO step (grpo.step) into the figures of its train line: the rewards, the GRPO
health signals, the update's stats and the sampling idea's own; under torchrun each rank's part is
gathered and combined, so the line is the whole step's (one process: its own).

Every train and eval line of metrics.jsonl goes to each tracker under the same names, at its step
(numbers only: TensorBoard and W&B plot scalars), and the chains logged to samples.jsonl each step go
as a completions table: TensorBoard text (a markdown table) and a W&B Table. Both packages are
optional: imported only when asked for, a missing one is an error naming its pip command.
  tensorboard  event files in <out_dir>/tensorboard (`tensorboard --logdir out`)
  wandb        project `wandb_project`, the run named after out_dir, its files in <out_dir>/wandb; a
               resumed run continues the same W&B run (its id is kept in <out_dir>/wandb_id). The API
               key is wandb's own business (`wandb login` or WANDB_API_KEY): never read or logged here;
               WANDB_MODE=offline keeps everything local.
"""
import dataclasses
import math
import os
import uuid

import torch

import config
import distributed
import rollout


def train_metrics(rounds: list, trained, zero_adv_frac: float, filtered: dict, stats: dict, tokenizer, cfg) -> dict:
    """The train line of a step: the reward figures over every chain sampled (all rounds of dynamic
    sampling: `rounds`, grpo.Scored each), the update's over the chains trained on (`trained`, whose
    rollout's stats are the sampling idea's figures), with the filter's figures (`filtered`) and the
    update's `stats` (grpo.update). Under torchrun each rank's part is gathered, on every rank."""
    r = trained.rollout
    info = [d for x in rounds for d in x.rollout.info]
    lengths = rollout.prompt_lengths(tokenizer, rollout.prompts_of(
        tokenizer, cfg.system_prompt, [ex for x in rounds for ex in x.batch]))
    per_rank = distributed.gather({
        "total": torch.cat([x.total for x in rounds]).cpu(), "per_fn": torch.cat([x.rewards for x in rounds]).cpu(),
        "errors": {k: sum(x.errors[k] for x in rounds) for k in trained.names},
        "completion_len": [d["completion_len"] for d in info], "truncated": [d["truncated"] for d in info],
        "cut": [n > cfg.max_prompt_tokens for n in lengths], "groups": len(trained.batch),
        "zero_adv_frac": zero_adv_frac, "sampled": sum(len(x.batch) for x in rounds), **filtered, "chains": len(r),
        **r.stats})  # the idea's figures are named with a slash (guide/..., ghpo/...): no clash
    total, per_fn = torch.cat([p["total"] for p in per_rank]), torch.cat([p["per_fn"] for p in per_rank])
    completion_lens = torch.tensor([n for p in per_rank for n in p["completion_len"]], dtype=torch.float)  # (N,)
    truncated, cut = [t for p in per_rank for t in p["truncated"]], [c for p in per_rank for c in p["cut"]]
    errors = {k: sum(p["errors"][k] for p in per_rank) for k in trained.names}
    return {"reward": total.mean().item(),
            **{f"reward/{k}": per_fn[:, i].mean().item() for i, k in enumerate(trained.names)},
            **{f"reward_errors/{k}": n for k, n in errors.items() if n},
            "reward_std": total.std().item(), "zero_adv_frac": mean_of(per_rank, "zero_adv_frac", "groups"),
            **({"sampling_rounds": mean_of(per_rank, "sampling_rounds"),
                "filtered_frac": mean_of(per_rank, "filtered_frac", "sampled")} if filtered else {}),
            "completion_len": completion_lens.mean().item(), "truncated_frac": sum(truncated) / len(truncated),
            "prompt_truncated_frac": sum(cut) / len(cut), **stats,
            **{k: mean_of(per_rank, k, "chains") for k in r.stats}}


def mean_of(per_rank: list[dict], key: str, weight: str = "") -> float:
    """The ranks' figure `key`, averaged with the weights per_rank[k][weight] (equal weights without
    one); one process's figure as it is."""
    if len(per_rank) == 1:
        return per_rank[0][key]
    w = [p[weight] if weight else 1 for p in per_rank]
    return sum(p[key] * wk for p, wk in zip(per_rank, w)) / max(1, sum(w))


def _need(package: str):
    try:
        return __import__(package)
    except ImportError:
        raise config.UserError(f"report_to {package} needs the {package} package: pip install {package} "
                               f"(or drop {package} from report_to)") from None


def scalars(row: dict) -> dict:
    """The finite numbers of a metrics line, without its step."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    def __init__(self, cfg, run_dir: str):
        _need("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def log(self, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def samples(self, step: int, rows: list[dict]) -> None:
        cell = lambda text: str(text).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
        table = ["| question | completion | answer | rewards | advantage |", "|---|---|---|---|---|"]
        table += [f"| {cell(r['question'])} | {cell(r['completion'])} | {cell(r['answer'])} | "
                  f"{cell(r['rewards'])} | {r['advantage']:.3f} |" for r in rows]
        self.writer.add_text("samples", "\n".join(table), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, cfg, run_dir: str):
        wandb = _need("wandb")
        id_path = os.path.join(run_dir, "wandb_id")
        run_id = open(id_path).read().strip() if os.path.exists(id_path) else uuid.uuid4().hex[:12]
        with open(id_path, "w") as f:
            f.write(run_id)
        self.wandb = wandb
        self.run = wandb.init(project=cfg.wandb_project, name=os.path.basename(os.path.abspath(run_dir)),
                              id=run_id, resume="allow", dir=run_dir, config=dataclasses.asdict(cfg))

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def samples(self, step: int, rows: list[dict]) -> None:
        columns = ["question", "completion", "answer", "rewards", "advantage"]
        data = [[str(r[c]) if c == "rewards" else r[c] for c in columns] for r in rows]
        self.run.log({"samples": self.wandb.Table(columns=columns, data=data)}, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB}


def check(cfg) -> None:
    unknown = [name for name in cfg.report_to if name not in TRACKERS]
    if unknown:
        raise config.UserError(f"report_to takes {list(TRACKERS)}, got {unknown}")


def make(cfg, run_dir: str) -> list:
    """The trackers cfg.report_to names, started for run_dir."""
    check(cfg)
    return [TRACKERS[name](cfg, run_dir) for name in cfg.report_to]
