"""Datasets: GSM8K (hub or local file) and the built-in arithmetic task.

Every loader returns plain lists of examples, one dict per problem:
    {"question": str, "answer": str, "solution": str}
`answer` is the final answer (what rewards.is_correct compares against), `solution` is the worked
solution without the answer line (what the SFT warm start imitates and GHPO hints are cut from).

The built-in task is GSM8K-shaped: a word problem of 2 to 4 steps, a solution with one equation per
sentence, and the answer after `####`. It needs no download, so the CPU demo and the tests use it.

    python data.py     # prints a few built-in problems and the GSM8K-style target text
"""
import os
import random

# ----------------------------------------------------------------------------------------------
# The built-in arithmetic task

NAMES = [("Tom", "He"), ("Ann", "She"), ("Sam", "He"), ("Mia", "She"), ("Ben", "He"), ("Eva", "She"),
         ("Max", "He"), ("Zoe", "She"), ("Leo", "He"), ("Ivy", "She")]
ITEMS = ["apples", "pens", "books", "cards", "coins", "shells", "stamps", "marbles", "cookies", "toys"]


def arithmetic_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 4, max_value: int = 99) -> dict:
    """One word problem; each step is one sentence in the question and one equation in the solution."""
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    x = rng.randint(2, 12)
    sentences = [f"{name} has {x} {item}."]
    equations = []
    for _ in range(rng.randint(min_steps, max_steps)):
        ops = ["+"] if x < max_value - 1 else []
        ops += ["-"] if x > 1 else []
        ops += ["*"] if 2 * x <= max_value and x <= 12 else []
        op = rng.choice(ops)
        if op == "+":
            b = rng.randint(1, min(9, max_value - x))
            sentences.append(f"{pronoun} gets {b} more.")
            y = x + b
        elif op == "-":
            b = rng.randint(1, min(9, x - 1))
            sentences.append(f"{pronoun} gives away {b}.")
            y = x - b
        else:
            b = rng.randint(2, max(2, min(4, max_value // x)))
            sentences.append(f"{pronoun} gets {b} times as many.")
            y = x * b
        equations.append(f"{x} {op} {b} = {y}.")
        x = y
    sentences.append(f"How many {item} does {name} have now?")
    return {"question": " ".join(sentences), "answer": str(x), "solution": "\n".join(equations)}


def arithmetic_task(n_train: int, n_test: int, seed: int, min_steps: int = 2, max_steps: int = 4,
                    max_value: int = 99) -> tuple[list[dict], list[dict]]:
    """Deterministic train/test splits from one seed; no test question appears in train."""
    rng = random.Random(seed)
    seen, examples = set(), []
    for _ in range(50 * (n_train + n_test)):  # bounded: a tiny problem space raises below, never hangs
        ex = arithmetic_problem(rng, min_steps, max_steps, max_value)
        if ex["question"] not in seen:
            seen.add(ex["question"])
            examples.append(ex)
        if len(examples) == n_train + n_test:
            return examples[n_test:], examples[:n_test]
    raise ValueError(f"only {len(examples)} distinct problems exist for these settings; "
                     f"lower arithmetic_train_size / arithmetic_test_size")


# ----------------------------------------------------------------------------------------------
# Hub and local datasets (GSM8K layout: the answer text ends with "#### <final answer>")

def split_gsm8k_answer(text: str) -> tuple[str, str]:
    """'steps ... #### 72' -> ('steps ...', '72'); text without '####' is a bare answer."""
    if "####" not in text:
        return "", text.strip()
    solution, final = text.rsplit("####", 1)
    return solution.strip(), final.strip().replace(",", "")


def is_local(name: str) -> bool:
    return os.path.exists(name) or name.endswith((".jsonl", ".json", ".parquet"))


def _load_rows(name: str, split: str, config_name: str | None):
    """Rows of one split from a local file or folder, or from the hub; errors say how to fix them."""
    from datasets import load_dataset  # imported here: the built-in task needs no datasets import

    if is_local(name):
        if not os.path.exists(name):
            raise FileNotFoundError(f"dataset file {name!r} does not exist")
        if os.path.isdir(name):
            return load_dataset(name, split=split)
        kind = "parquet" if name.endswith(".parquet") else "json"
        return load_dataset(kind, data_files=name, split="train")  # one file is one split
    try:
        return load_dataset(name, config_name or None, split=split)
    except Exception as e:
        raise RuntimeError(
            f"could not load dataset {name!r} (config {config_name!r}, split {split!r}) from the hub: "
            f"{type(e).__name__}: {str(e)[:300]}\nIf this machine is offline, pass local files instead: "
            f"--dataset path/to/train.jsonl --test_dataset path/to/test.jsonl (jsonl or parquet with "
            f"the same columns).") from None


def to_examples(rows, source: str, question_field: str, answer_field: str) -> list[dict]:
    """Map raw rows to examples, naming the missing field and the config key to set if any."""
    columns = list(rows.column_names) if hasattr(rows, "column_names") else list(rows[0].keys())
    for field, key in ((question_field, "question_field"), (answer_field, "answer_field")):
        if field not in columns:
            raise KeyError(f"dataset {source!r} has no field {field!r} (its columns: {columns}); "
                           f"set --{key} to the column that holds it")
    examples = []
    for row in rows:
        solution, final = split_gsm8k_answer(str(row[answer_field]))
        examples.append({"question": str(row[question_field]), "answer": final, "solution": solution})
    return examples


def load(dataset: str, dataset_config: str, train_split: str, test_split: str, test_dataset: str,
         question_field: str, answer_field: str, seed: int, arithmetic_train_size: int,
         arithmetic_test_size: int, arithmetic_min_steps: int, arithmetic_max_steps: int,
         arithmetic_max_value: int = 99
         ) -> tuple[list[dict], list[dict]]:
    """(train, test) examples. `dataset` is "arithmetic", a hub name, or a local file/folder."""
    if dataset == "arithmetic":
        return arithmetic_task(arithmetic_train_size, arithmetic_test_size, seed,
                               arithmetic_min_steps, arithmetic_max_steps, arithmetic_max_value)
    train_rows = _load_rows(dataset, train_split, dataset_config)
    if test_dataset:
        test_rows, test_source = _load_rows(test_dataset, test_split, dataset_config), test_dataset
    elif is_local(dataset) and not os.path.isdir(dataset):
        raise ValueError(f"{dataset!r} is a single file, so it holds no test split: pass the held-out "
                         f"file with --test_dataset path/to/test.jsonl")
    else:
        test_rows, test_source = _load_rows(dataset, test_split, dataset_config), dataset
    return (to_examples(train_rows, dataset, question_field, answer_field),
            to_examples(test_rows, test_source, question_field, answer_field))


def target_text(example: dict) -> str:
    """What the SFT warm start teaches: the worked solution, then the answer after '####'."""
    return f"{example['solution']}\n#### {example['answer']}" if example["solution"] else f"#### {example['answer']}"


if __name__ == "__main__":
    train, test = arithmetic_task(1000, 100, seed=0)
    for ex in train[:3]:
        print(ex["question"], "\n---\n" + target_text(ex), "\n")
    print(f"{len(train)} train / {len(test)} test problems")
