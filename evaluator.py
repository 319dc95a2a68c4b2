"""Held-out evaluation: accuracy, pass@k and a record per example.

The protocol is fixed so that curves of different sampling ideas compare: the test split (or a fixed
seeded subset of it), plain sampling only (never guided or hinted), greedy or one fixed temperature,
and correctness from rewards.is_correct, never from a reward value.

    python evaluator.py     # evaluates the untrained tiny model on 20 built-in problems
"""
import random

import llms
import rewards
import rollout


def subset(examples: list[dict], n: int, seed: int) -> list[dict]:
    """The whole split when n is 0, else the same n examples at every eval of the run."""
    return examples if n <= 0 or n >= len(examples) else random.Random(seed).sample(examples, n)


def evaluate(model, tokenizer, examples: list[dict], system_prompt: str, max_prompt_tokens: int,
             max_new_tokens: int, temperature: float, samples: int, batch_size: int
             ) -> tuple[dict, list[dict]]:
    """({"accuracy", "n", "pass@k"}, per-example records). accuracy is the mean over all samples."""
    records = []
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        prompts = [llms.chat_prompt(tokenizer, system_prompt, ex["question"]) for ex in batch]
        r = rollout.sample(model, tokenizer, prompts, samples, max_prompt_tokens, max_new_tokens, temperature)
        for j, ex in enumerate(batch):
            texts = r.texts[j * samples:(j + 1) * samples]
            records.append({"question": ex["question"], "answer": ex["answer"], "completions": texts,
                            "correct": [rewards.is_correct(t, ex["answer"]) for t in texts]})
    n = len(records)
    accuracy = sum(sum(rec["correct"]) / samples for rec in records) / max(1, n)
    metrics = {"accuracy": accuracy, "n": n}
    if samples > 1:  # with k samples per question, pass@k is "any of them correct"
        metrics[f"pass@{samples}"] = sum(any(rec["correct"]) for rec in records) / max(1, n)
    return metrics, records


if __name__ == "__main__":
    import data

    train, test = data.arithmetic_task(500, 20, seed=0)
    m, tok = llms.load(llms.TINY, "cpu", tiny_corpus=[ex["question"] for ex in train])
    print(evaluate(m, tok, test, "", 128, 16, temperature=1.0, samples=2, batch_size=20)[0])
