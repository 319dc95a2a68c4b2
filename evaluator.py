"""Held-out evaluation: the task's own metric, pass@k and a record per example.

The protocol is fixed so that curves of different sampling ideas compare: the test split (or a fixed
seeded subset of it), plain sampling only (never guided or hinted), greedy or one fixed temperature,
and correctness from the task's checker, never from a reward value: rewards.is_correct for math,
the judge parsers of judge_rewards.py for judges. One loop samples and grades; `task_metrics` turns
the records into the task's figures:
    math             accuracy
    judge_pointwise  accuracy (exact score), within1 (|score - label| <= 1), mae, parsed
    judge_pairwise   accuracy (judge accuracy), parsed
`parsed` is the share of verdicts that could be read; mae counts an unreadable one as 4, the worst.

    python evaluator.py     # evaluates the untrained tiny model on 20 built-in problems
"""
import random

import torch

import judge_rewards
import llms
import rewards
import rollout


def subset(examples: list[dict], n: int, seed: int) -> list[dict]:
    """The whole split when n is 0, else the same n examples at every eval of the run."""
    return examples if n <= 0 or n >= len(examples) else random.Random(seed).sample(examples, n)


def grade(task: str, completion: str, answer: str) -> tuple[bool, int | str | None]:
    """(correct, the parsed verdict) of one sample; math has no verdict beyond correct (None)."""
    if task == "judge_pointwise":
        pred = judge_rewards.parse_score(completion)
        return pred == int(answer), pred
    if task == "judge_pairwise":
        pred = judge_rewards.parse_preference(completion)
        return pred == answer, pred
    return rewards.is_correct(completion, answer), None


def task_metrics(task: str, records: list[dict], samples: int) -> dict:
    """{"accuracy", "n", "pass@k" (k > 1)} plus the task's own figures (module docstring)."""
    n = len(records)
    metrics = {"accuracy": sum(sum(rec["correct"]) / samples for rec in records) / max(1, n), "n": n}
    if samples > 1:  # with k samples per question, pass@k is "any of them correct"
        metrics[f"pass@{samples}"] = sum(any(rec["correct"]) for rec in records) / max(1, n)
    if task != "math":
        preds = [(p, rec["answer"]) for rec in records for p in rec["predicted"]]  # every sample
        metrics["parsed"] = sum(p is not None for p, _ in preds) / max(1, len(preds))
    if task == "judge_pointwise":
        errors = [4 if p is None else abs(p - int(label)) for p, label in preds]
        metrics["within1"] = sum(e <= 1 for e in errors) / max(1, len(errors))
        metrics["mae"] = sum(errors) / max(1, len(errors))
    return metrics


def evaluate(model, tokenizer, examples: list[dict], cfg) -> tuple[dict, list[dict]]:
    """(task_metrics, per-example records) of plain sampling at eval_temperature, eval_samples chains per
    question; accuracy is the mean over all samples. Its own RNG, seeded with cfg.seed: every eval
    samples alike, and the caller's random stream is untouched."""
    device = next(model.parameters()).device
    records = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        for i in range(0, len(examples), cfg.eval_batch_size):
            batch = examples[i:i + cfg.eval_batch_size]
            r = rollout.sample(model, tokenizer, rollout.prompts_of(tokenizer, cfg.system_prompt, batch),
                               cfg.eval_samples, max_prompt_tokens=cfg.max_prompt_tokens,
                               max_new_tokens=cfg.max_completion_tokens, temperature=cfg.eval_temperature)
            for j, ex in enumerate(batch):
                texts = r.texts[j * cfg.eval_samples:(j + 1) * cfg.eval_samples]
                graded = [grade(cfg.task, t, ex["answer"]) for t in texts]
                records.append({"question": ex["question"], "answer": ex["answer"], "completions": texts,
                                "correct": [c for c, _ in graded]}
                               | ({"predicted": [p for _, p in graded]} if cfg.task != "math" else {}))
    return task_metrics(cfg.task, records, cfg.eval_samples), records


if __name__ == "__main__":
    import config
    import data

    train, test = data.arithmetic_task(500, 20, seed=0)
    m, tok = llms.load(llms.TINY, "cpu", tiny_corpus=[ex["question"] for ex in train])
    cfg = config.Config(system_prompt="", max_prompt_tokens=128, max_completion_tokens=16, eval_temperature=1.0,
                        eval_samples=2, eval_batch_size=20)
    print(evaluate(m, tok, test, cfg)[0])
