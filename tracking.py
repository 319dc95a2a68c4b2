"""Experiment tracking beside metrics.jsonl (which is always written): `report_to [tensorboard, wandb]`.

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

import config


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
