"""Held-out evaluation: the task's own metric, pass@k and a record per example.

The protocol is fixed so that curves of different sampling ideas compare: the test split (or a fixed
seeded subset of it), plain sampling only (never guided or hinted), greedy or one fixed temperature,
and correctness from the task's checker, never from a reward value: answers.is_correct for math,
the judge parsers of judge_rewards.py for judges. One loop samples and grades; `task_metrics` turns
the records into the task's figures:
    math             accuracy
    judge_pointwise  accuracy (exact score), within1 (|score - label| <= 1), mae, parsed
    judge_pairwise   accuracy (judge accuracy), parsed
`parsed` is the share of verdicts that could be read; mae counts an unreadable one as 4, the worst.

The same protocol as a command, on a saved model (a run folder: its latest checkpoint, with the run's
own config unless --config is given; a checkpoint, full weights or a LoRA adapter on its run's base;
a hub name or a model folder; `tiny`). Every other --key is a config key (--eval_temperature 1
--eval_samples 8, --eval_n 0 for the whole test split). It prints the task's metrics and writes one
record per question to --out; with --compare it evaluates a second model on the same questions and
prints the paired difference of their accuracies, with a 95% interval over questions. With --gguf FILE
it also runs an exported GGUF file in llama.cpp on the same questions (export.py --check calls this).

    python evaluator.py --model out/tiny                                # the run's last checkpoint
    python evaluator.py --model out/tiny --compare out/tiny/base_model  # against its starting weights
    python evaluator.py --model Qwen/Qwen2.5-1.5B-Instruct --config configs/gsm8k_1.5b_24gb.yaml --eval_n 0
    python evaluator.py --model out/smollm2_cpu --gguf smollm2.gguf      # the exported file in llama.cpp
    python evaluator.py --demo    # the untrained tiny model on 20 built-in problems
"""
import json
import math
import os
import random
import sys

import torch

import checkpoint
import config
import answers
import builtin_tasks
import data
import distributed
import fsdp
import gguf_models
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
    return answers.is_correct(completion, answer), None


def task_metrics(task: str, records: list[dict], samples: int) -> dict:
    """{"accuracy", "n", "pass@k" (k > 1), "format" (records with "in_format": eval_format)} plus the task's
    own figures (module docstring)."""
    n = len(records)
    metrics = {"accuracy": sum(sum(rec["correct"]) / samples for rec in records) / max(1, n), "n": n}
    if records and "in_format" in records[0]:
        metrics["format"] = sum(sum(rec["in_format"]) / samples for rec in records) / n
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


def record(cfg, ex: dict, texts: list[str], settings: dict) -> dict:
    """One question's record: its completions graded by the task's checker (and the eval_format reward)."""
    graded = [grade(cfg.task, t, ex["answer"]) for t in texts]
    return ({"question": ex["question"], "answer": ex["answer"], "completions": texts,
             "correct": [c for c, _ in graded]}
            | ({"predicted": [p for _, p in graded]} if cfg.task != "math" else {})
            | ({"in_format": [bool(rewards.REWARDS[cfg.eval_format](t, ex["answer"], **settings)) for t in texts]}
               if cfg.eval_format else {}))


def evaluate(model, tokenizer, examples: list[dict], cfg) -> tuple[dict, list[dict]]:
    """(task_metrics, per-example records) of plain sampling at eval_temperature, eval_samples chains per
    question; accuracy is the mean over all samples. Its own RNG, seeded with cfg.seed: every eval
    samples alike, and the caller's random stream is untouched. Under torchrun the ranks take turns
    with the batches (rank k: batches k, k + N, ...) and gather the records in order, so greedy
    evaluation is that of one process, N times faster; sampled evaluation draws from one stream per
    rank (rank 0's is one process's), so it is an equally good estimate, not the same draws."""
    device = next(model.parameters()).device
    starts = list(range(0, len(examples), cfg.eval_batch_size))
    rewards.check_names({cfg.eval_format: 1.0} if cfg.eval_format else {})
    settings = rewards.settings(cfg)
    mine = {}  # batch start -> its records
    # --fsdp: the ranks' generate calls match, whatever their number of batches (fsdp.sampling)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), fsdp.sampling(model):
        torch.manual_seed(cfg.seed + 1_000_003 * distributed.rank())
        for i in starts[distributed.rank()::distributed.world()]:
            batch = examples[i:i + cfg.eval_batch_size]
            r = rollout.sample(model, tokenizer, rollout.prompts_of(tokenizer, cfg.system_prompt, batch),
                               cfg.eval_samples, max_prompt_tokens=cfg.max_prompt_tokens,
                               max_new_tokens=cfg.max_completion_tokens, temperature=cfg.eval_temperature,
                               images=rollout.images_of(batch))
            mine[i] = [record(cfg, ex, r.texts[j * cfg.eval_samples:(j + 1) * cfg.eval_samples], settings)
                       for j, ex in enumerate(batch)]
    shards = {i: recs for part in distributed.gather(mine) for i, recs in part.items()}
    records = [rec for i in starts for rec in shards[i]]
    return task_metrics(cfg.task, records, cfg.eval_samples), records


def evaluate_gguf(path: str, examples: list[dict], cfg, shots: list[tuple[str, str]] = ()) -> tuple[dict, list[dict]]:
    """The same protocol in llama.cpp (the xllamacpp wheel) on a GGUF file, as a user runs it: each
    question through llama.cpp's chat endpoint, which applies the template stored in the file; greedy,
    or eval_temperature with seed cfg.seed + k for sample k; stopping at the model's end of turn and,
    in the plain prompt format, at its blank line. metrics["prompt_mismatch"] is the share of questions
    whose prompt llama.cpp tokenized to another length than transformers does with the file's own
    tokenizer and template (0: the runtime prompts the model as training did)."""
    try:
        import xllamacpp
    except ImportError:
        raise config.UserError("a GGUF file is evaluated in llama.cpp: pip install xllamacpp (requirements.txt "
                               "lists it)") from None
    if not os.path.isfile(path):
        raise config.UserError(f"--gguf {path}: no such file")
    tokenizer = gguf_models.read_tokenizer(path)  # the file's tokenizer and chat template
    tokenizer.chat_template_kwargs = dict(cfg.chat_template_kwargs)  # the run's switches, as llama.cpp gets them
    layout = llms.plain_template(tokenizer, list(shots))  # as export.py writes it into the file
    plain = cfg.prompt_format == "plain" or tokenizer.chat_template in (layout, llms.without_raw_blocks(layout))
    prompts = [llms.chat_messages(tokenizer, cfg.system_prompt, ex["question"]) for ex in examples]
    lengths = [len(tokenizer(llms.render(tokenizer, m), add_special_tokens=False)["input_ids"]) for m in prompts]
    params = xllamacpp.CommonParams()
    params.model.path = path
    params.use_jinja = True  # the chat template stored in the file, as `llama-server --jinja` uses it
    params.n_ctx = max(lengths) + cfg.max_completion_tokens + 8
    params.n_parallel, params.warmup, params.verbosity = 1, False, -1
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = torch.get_num_threads()
    server = xllamacpp.Server(params)
    settings, records, mismatched = rewards.settings(cfg), [], 0
    for ex, messages, length in zip(examples, prompts, lengths):
        texts = []
        for k in range(cfg.eval_samples):
            reply = server.handle_chat_completions({
                "messages": messages, "max_tokens": cfg.max_completion_tokens, "temperature": cfg.eval_temperature,
                "seed": cfg.seed + k, "stop": [llms.PLAIN_STOP] if plain else [],
                "chat_template_kwargs": dict(cfg.chat_template_kwargs)})
            if "choices" not in reply:
                raise config.UserError(f"llama.cpp could not answer with {path}: {str(reply)[:300]}")
            texts.append(reply["choices"][0]["message"]["content"])
        mismatched += reply["usage"]["prompt_tokens"] != length
        records.append(record(cfg, ex, texts, settings))
    return task_metrics(cfg.task, records, cfg.eval_samples) | {"prompt_mismatch": mismatched / len(examples)}, records


# ----------------------------------------------------------------------------------------------
# python evaluator.py --model PATH [--compare PATH2]: a saved model under the run's eval protocol


def is_run(path: str) -> bool:
    """A run folder of train.py: its config.json and its checkpoints."""
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints"))


def resolve(path: str) -> tuple[str, str]:
    """(weights to load, a LoRA adapter on top or ""): a run folder means its latest checkpoint; an
    adapter checkpoint loads on its run's saved base model when there is one, else on model_name ("")."""
    if is_run(path):
        ckpt = checkpoint.latest(path)
        if ckpt is None:
            raise config.UserError(f"{path} is a run without a checkpoint yet: evaluate it after its first save")
        path = ckpt
    if checkpoint.is_adapter(path):
        base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "base_model")
        return (base if os.path.isdir(base) else ""), path
    return path, ""


def load_for_eval(path: str, cfg, device: str, train_set: list[dict]):
    weights, adapter = resolve(path)
    shots = data.run_shots(cfg, train_set)
    model, tokenizer = llms.from_config(cfg, weights or cfg.model_name, device, gradient_checkpointing=False,
                                       shots=shots, tiny_corpus=data.tiny_corpus(train_set, cfg.system_prompt))
    if adapter:
        from peft import PeftModel

        with llms.lora_without_bitsandbytes(model):
            model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def paired_difference(a: list[dict], b: list[dict]) -> dict:
    """Accuracy of a minus b on the same questions: the mean per-question difference and its 95% interval
    (normal approximation over questions; each question's accuracy is the mean over its samples)."""
    d = [sum(x["correct"]) / len(x["correct"]) - sum(y["correct"]) / len(y["correct"]) for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / max(1, len(d) - 1))
    half = 1.96 * sd / math.sqrt(len(d))
    return {"difference": mean, "ci95": [mean - half, mean + half], "n": len(d)}


def print_metrics(name: str, metrics: dict) -> None:
    print(f"{name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


def print_paired(a: str, b: str, p: dict) -> None:
    print(f"accuracy {a} - {b}: {p['difference']:+.4f} (95% interval {p['ci95'][0]:+.4f} .. "
          f"{p['ci95'][1]:+.4f}, {p['n']} questions)")


def main(argv: list[str]) -> dict:
    flags = config.parse_flags(argv)
    model_path, other, out = flags.pop("model", ""), flags.pop("compare", ""), flags.pop("out", "out/eval.jsonl")
    gguf = flags.pop("gguf", "")
    if not model_path and not gguf:
        raise config.UserError("which model? --model PATH (a run folder, a checkpoint, a model folder, a hub name "
                               "or tiny), or --gguf FILE; see python evaluator.py's docstring")
    if "config" not in flags and is_run(model_path):
        flags["config"] = os.path.join(model_path, "config.json")  # the run's own settings (JSON is YAML)
    cfg = config.load([item for key, value in flags.items() for item in (f"--{key}", value)])
    device = llms.pick_device(cfg.device)
    train_set, test_set = data.load(cfg)
    questions = subset(test_set, cfg.eval_n, cfg.seed)
    results = {}
    for name, path in (("model", model_path), ("compare", other)):
        if not path:
            continue
        model, tokenizer = load_for_eval(path, cfg, device, train_set)
        metrics, records = evaluate(model, tokenizer, questions, cfg)
        results[name] = {"path": path, "metrics": metrics, "records": records}
        print_metrics(path, metrics)
        del model
    if gguf:  # the exported file in llama.cpp, on the same questions
        metrics, records = evaluate_gguf(gguf, questions, cfg, shots=data.run_shots(cfg, train_set))
        results["gguf"] = {"path": gguf, "metrics": metrics, "records": records}
        print_metrics(f"{gguf} in llama.cpp", metrics)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        for name, res in results.items():
            f.writelines(json.dumps({"model": res["path"], **rec}) + "\n" for rec in res["records"])
    for name, key in (("compare", "paired"), ("gguf", "paired_gguf")):  # each one paired with the model
        if name in results and "model" in results:
            results[key] = paired_difference(results["model"]["records"], results[name]["records"])
            print_paired(model_path, results[name]["path"], results[key])
    print(f"records: {out}")
    return results


if __name__ == "__main__":
    if sys.argv[1:] == ["--demo"]:
        train, test = builtin_tasks.arithmetic_task(500, 20, seed=0)
        m, tok = llms.load(llms.TINY, "cpu", tiny_corpus=[ex["question"] for ex in train])
        cfg = config.Config(system_prompt="", max_prompt_tokens=128, max_completion_tokens=16, eval_temperature=1.0,
                            eval_samples=2, eval_batch_size=20)
        print(evaluate(m, tok, test, cfg)[0])
        sys.exit()
    try:
        main(sys.argv[1:])
    except config.UserError as e:
        sys.exit(f"error: {e}")
