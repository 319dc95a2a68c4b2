"""Datasets: GSM8K (hub or local file), judge data (OpenJudge layout), and the built-in arithmetic task.

Every loader returns plain lists of examples, one dict per problem:
    {"question": str, "answer": str, "solution": str}  (+ "images": [PIL images] for a row with images)
`answer` is the final answer (what rewards.is_correct compares against; a judge's label), `solution`
is the worked solution without the answer line (what the SFT warm start imitates and GHPO hints are
cut from). Judge examples add "target", the verdict the warm start imitates.

The built-in task is GSM8K-shaped: a word problem of 2 to 4 steps, a solution with one equation per
sentence, and the answer after `####`. It needs no download, so the CPU demo and the tests use it.

Other tasks are other files and a prompt template: `question` is the template filled with the row
(configs/prompts/*.txt; `{question}` for math, `{query}` and `{response}` or `{response_a}` and
`{response_b}` for judges). Judge data follows OpenJudge's layout, one record per line (jsonl) or row
(parquet): `input` is a list of chat messages, `output` a list of {"answer": {"role", "content",
"label": {"helpfulness": 0..4} or {"preference": "A" or "B"}}}. A pointwise record gives one example
per response (answer "0".."4"), a pairwise record one example (answer "A" or "B"). A malformed record
is an error naming its file, row and field; skip_bad_rows skips and counts such rows instead.

    python data.py                          # prints a few built-in problems and the target text
    python data.py make-demo out/demo_data  # small judge, problem/answer and image files for the CPU demos
"""
import json
import os
import random
import re

import config
import vision

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
    raise config.UserError(f"only {len(examples)} distinct problems exist for these settings; "
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


class BadRow(config.UserError):
    """A record that cannot be used; its message names the file, the row and what is wrong."""


def _base_dir(name: str) -> str:
    """Where a dataset's relative image paths start: the data file's folder (or the folder itself)."""
    return name if os.path.isdir(name) else os.path.dirname(os.path.abspath(name)) if is_local(name) else os.getcwd()


def _read_file(path: str) -> list[tuple[str, object]]:
    """(where, row) pairs of a local jsonl, json (one array) or parquet file. `where` is "file line N"
    (jsonl, blank lines counted) or "file row N"; a line that is not JSON becomes a BadRow in place."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return [(f"{path} row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist(), 1)]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json") and text.lstrip().startswith("["):
        return [(f"{path} row {i}", row) for i, row in enumerate(json.loads(text), 1)]
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{path} line {i}", json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((f"{path} line {i}", BadRow(f"{path} line {i}: not valid JSON ({e.msg})")))
    return rows


def _load_rows(name: str, split: str, config_name: str | None) -> list[tuple[str, object]]:
    """(where, row) pairs of one split from a local file or folder, or from the hub; errors say how to
    fix them. `where` names the file (or dataset and split) and the row, for error messages."""
    if is_local(name) and not os.path.exists(name):
        raise config.UserError(f"dataset file {name!r} does not exist")
    if is_local(name) and not os.path.isdir(name):
        return _read_file(name)  # one file is one split
    from datasets import load_dataset  # imported here: the built-in task needs no datasets import

    try:
        rows = load_dataset(name, split=split) if is_local(name) else load_dataset(name, config_name or None,
                                                                                   split=split)
    except Exception as e:
        if is_local(name):
            raise
        raise config.UserError(
                f"could not load dataset {name!r} (config {config_name!r}, split {split!r}) from the hub: "
                f"{type(e).__name__}: {str(e)[:300]}\nIf this machine is offline, pass local files instead: "
                f"--dataset path/to/train.jsonl --test_dataset path/to/test.jsonl (jsonl or parquet with "
                f"the same columns).") from None
    return [(f"{name} [{split}] row {i}", row) for i, row in enumerate(rows, 1)]


# ----------------------------------------------------------------------------------------------
# Prompt templates: editable text files whose {placeholders} are filled per example

TEMPLATE_FIELDS = {"math": ["question"], "judge_pointwise": ["query", "response"],
                   "judge_pairwise": ["query", "response_a", "response_b"]}
_PLACEHOLDER_RE = re.compile(r"\{(\w+)\}")


def load_template(path: str, task: str) -> str:
    """The template text of a task; "" means the question as-is (math) or configs/prompts/<task>.txt."""
    if not path:
        if task == "math":
            return "{question}"
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "prompts", f"{task}.txt")
    if not os.path.exists(path):
        raise config.UserError(f"prompt template {path!r} does not exist (--prompt_template)")
    with open(path, encoding="utf-8") as f:
        template = f.read().strip()
    missing = [k for k in TEMPLATE_FIELDS[task] if "{" + k + "}" not in template]
    if missing:
        raise config.UserError(f"prompt template {path!r} lacks {', '.join('{' + k + '}' for k in missing)}, which "
                               f"task {task!r} fills in (its placeholders: {TEMPLATE_FIELDS[task]})")
    return template


def fill(template: str, **values: str) -> str:
    """{name} -> values[name] in one pass, so a value that contains "{response}" is left as it is;
    other braces (JSON examples in a template) stay untouched."""
    return _PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), m.group(0)), template)


# ----------------------------------------------------------------------------------------------
# Rows to examples: math problems and judge records (OpenJudge layout)

def _get(value, path: list, where: str):
    """value[path[0]][path[1]]..., or a BadRow naming the first missing, empty or mistyped step."""
    for i, key in enumerate(path):
        shown = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path[:i + 1]).lstrip(".")
        if isinstance(key, int):
            if not isinstance(value, list) or len(value) <= key:
                raise BadRow(f"{where}: missing field {shown} (a list of {key + 1}+ items is needed)")
        elif not isinstance(value, dict) or value.get(key) is None:
            raise BadRow(f"{where}: missing field {shown!r}")
        value = value[key]
    return value


def math_example(row, where: str, question_field: str, answer_field: str, template: str,
                 image_field: str = "", base_dir: str = "") -> list[dict]:
    question = str(_get(row, [question_field], where)).strip()
    solution, final = split_gsm8k_answer(str(_get(row, [answer_field], where)))
    if not question or not final:
        raise BadRow(f"{where}: empty {'question' if not question else 'final answer'} in field "
                     f"{question_field if not question else answer_field!r}")
    example = {"question": fill(template, question=question), "answer": final, "solution": solution}
    images = row.get(image_field) if image_field else None
    if images is not None:  # one image or a list of them; the question's <image> marks say where they go
        images = images if isinstance(images, list) else [images]
        example["images"] = []
        for k, image in enumerate(images):
            try:
                example["images"].append(vision.to_image(image, base_dir))
            except ValueError as e:
                raise BadRow(f"{where} {image_field}[{k}]: {e}") from None
        try:
            example["question"] = vision.with_placeholders(example["question"], len(images))
        except ValueError as e:
            raise BadRow(f"{where}: {e}") from None
    return [example]


def _query(row, where: str) -> str:
    """The conversation to judge: the one user message, or every message as "role: content"."""
    messages = _get(row, ["input"], where)
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"{where}: field 'input' must be a non-empty list of chat messages")
    texts = [(str(_get(m, ["role"], f"{where} input[{i}]")), str(_get(m, ["content"], f"{where} input[{i}]")))
             for i, m in enumerate(messages)]
    return texts[0][1] if len(texts) == 1 else "\n\n".join(f"{role}: {content}" for role, content in texts)


def judge_examples(row, where: str, task: str, template: str) -> list[dict]:
    """One example per response (pointwise, label = helpfulness 0..4) or per pair (pairwise, label A/B)."""
    query, outputs = _query(row, where), _get(row, ["output"], where)
    if not isinstance(outputs, list):
        raise BadRow(f"{where}: field 'output' must be a list of {{'answer': {{...}}}} items")
    if task == "judge_pointwise":
        examples = []
        for k in range(len(outputs)):
            label = _get(row, ["output", k, "answer", "label", "helpfulness"], where)
            try:
                value = None if isinstance(label, bool) else float(label)
            except (TypeError, ValueError):
                value = None
            if value not in range(5):  # 3, 3.0 and "3" are fine; 3.5, "high" and True are not
                raise BadRow(f"{where}: output[{k}].answer.label.helpfulness is {label!r}, not an integer in 0..4")
            response = str(_get(row, ["output", k, "answer", "content"], where))
            examples.append({"question": fill(template, query=query, response=response),
                             "answer": str(int(value)), "solution": "",
                             "target": f"<think>\n</think>\n<score>{int(value)}</score>"})
        if not examples:
            raise BadRow(f"{where}: field 'output' holds no response")
        return examples
    if len(outputs) != 2:
        raise BadRow(f"{where}: a pairwise record needs exactly 2 responses in 'output', got {len(outputs)}")
    a, b = (str(_get(row, ["output", k, "answer", "content"], where)) for k in (0, 1))
    labels = [str(_get(row, ["output", 0, "answer", "label", "preference"], where)).strip().upper()]
    second = (outputs[1].get("answer") or {}).get("label") if isinstance(outputs[1], dict) else None
    if isinstance(second, dict) and second.get("preference") is not None:
        labels.append(str(second["preference"]).strip().upper())
    if labels[0] not in ("A", "B") or len(set(labels)) > 1:
        raise BadRow(f"{where}: label.preference must be 'A' or 'B' (the same on both responses), got {labels}")
    return [{"question": fill(template, query=query, response_a=a, response_b=b), "answer": labels[0],
             "solution": "", "target": f"<think>\n</think>\n<better>{labels[0]}</better>"}]


def to_examples(rows: list[tuple[str, object]], source: str, task: str, template: str, question_field: str,
                answer_field: str, skip_bad_rows: bool, image_field: str = "") -> list[dict]:
    """Examples from (where, row) pairs. A bad row is an error naming it, or, with skip_bad_rows, is
    skipped and counted; a column missing from the first row is a config error, never skipped."""
    first = next((row for _, row in rows if isinstance(row, dict)), None)
    if first is None:
        raise config.UserError(f"dataset {source!r} holds no records")
    needed = [(question_field, "question_field"), (answer_field, "answer_field")] if task == "math" else [
        ("input", ""), ("output", "")]
    for column, key in needed:
        if column not in first:
            hint = f"set --{key} to the column that holds it" if key else (
                "judge data needs the OpenJudge layout: 'input' (chat messages) and 'output' (labelled answers)")
            raise config.UserError(f"dataset {source!r} has no field {column!r} (its columns: {list(first)}); {hint}")
    examples, bad, base_dir = [], [], _base_dir(source)
    for where, row in rows:
        try:
            if isinstance(row, BadRow):
                raise row
            if task == "math":
                examples += math_example(row, where, question_field, answer_field, template, image_field,
                                         base_dir)
            else:
                examples += judge_examples(row, where, task, template)
        except BadRow as e:
            if not skip_bad_rows:
                raise BadRow(f"{e}. Fix the record, or pass --skip_bad_rows to skip and count such rows") from None
            bad.append(str(e))
    if bad:
        print(f"skipped {len(bad)} of {len(rows)} rows of {source} (--skip_bad_rows); the first: {bad[0]}")
    if not examples:
        raise config.UserError(f"dataset {source!r}: none of its {len(rows)} rows is usable")
    return examples


def load(cfg) -> tuple[list[dict], list[dict]]:
    """(train, test) examples of cfg.dataset: "arithmetic" (the built-in task), a hub name, or a local
    file or folder; cfg.task says how rows become examples (math: question/answer columns; judge_*:
    the OpenJudge layout)."""
    template = load_template(cfg.prompt_template, cfg.task)
    if cfg.dataset == "digits":
        train, test = vision.digits_task(cfg.digits_train_size, cfg.digits_test_size, cfg.seed, cfg.digits_count)
        return ([{**ex, "question": fill(template, question=ex["question"])} for ex in train],
                [{**ex, "question": fill(template, question=ex["question"])} for ex in test])
    if cfg.dataset == "arithmetic":
        if cfg.task != "math":
            raise config.UserError(f"the built-in arithmetic task is a math task; task {cfg.task!r} needs judge data: "
                                   f"make a small set with `python data.py make-demo out/demo_data`")
        train, test = arithmetic_task(cfg.arithmetic_train_size, cfg.arithmetic_test_size, cfg.seed,
                                      cfg.arithmetic_min_steps, cfg.arithmetic_max_steps, cfg.arithmetic_max_value)
        return ([{**ex, "question": fill(template, question=ex["question"])} for ex in train],
                [{**ex, "question": fill(template, question=ex["question"])} for ex in test])
    train_rows = _load_rows(cfg.dataset, cfg.train_split, cfg.dataset_config)
    if cfg.test_dataset:
        test_rows, test_source = _load_rows(cfg.test_dataset, cfg.test_split, cfg.dataset_config), cfg.test_dataset
    elif is_local(cfg.dataset) and not os.path.isdir(cfg.dataset):
        raise config.UserError(f"{cfg.dataset!r} is a single file, so it holds no test split: pass the held-out "
                               f"file with --test_dataset path/to/test.jsonl")
    else:
        test_rows, test_source = _load_rows(cfg.dataset, cfg.test_split, cfg.dataset_config), cfg.dataset
    args = (cfg.task, template, cfg.question_field, cfg.answer_field, cfg.skip_bad_rows, cfg.image_field)
    return to_examples(train_rows, cfg.dataset, *args), to_examples(test_rows, test_source, *args)


def step_batch(examples: list[dict], step: int, size: int, seed: int) -> list[dict]:
    """The questions of a step: a fresh seeded shuffle per epoch, so a resumed run sees the same order."""
    epoch_len = max(1, len(examples) // size)
    epoch, pos = divmod(step - 1, epoch_len)
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [examples[i] for i in order[pos * size:(pos + 1) * size]]


def refill(examples: list[dict], step: int, round_: int, size: int, seed: int, taken: list[dict]) -> list[dict]:
    """`size` more questions for round `round_` of a step's dynamic sampling (grpo.py): a seeded draw of
    (seed, step, round), so a resumed run draws the same, without the questions in `taken` (the step's)."""
    taken_ids = {id(ex) for ex in taken}
    order = list(range(len(examples)))
    random.Random((seed * 1_000_003 + step) * 1_009 + round_).shuffle(order)
    return [examples[i] for i in order if id(examples[i]) not in taken_ids][:size]


def target_text(example: dict, answer_only: bool = False, slip_rate: float = 0.0, rng: random.Random | None = None
                ) -> str:
    """What the SFT warm start teaches: a judge example's verdict in its output format (its "target",
    with an empty think), else the worked solution (left out when answer_only), then '#### answer'.
    slip_rate > 0 (needs rng): each equation's result is off by one with that probability, and the slip
    carries into the later steps and the final answer (see with_slips)."""
    if "target" in example:
        return example["target"]
    if answer_only or not example["solution"]:
        return f"#### {example['answer']}"
    solution, answer = example["solution"], example["answer"]
    if slip_rate > 0:
        solution, answer = with_slips(solution, slip_rate, rng)
    return f"{solution}\n#### {answer}"


EQUATION_RE = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)\.$")


def with_slips(solution: str, rate: float, rng: random.Random) -> tuple[str, str]:
    """(solution, final answer) of a built-in problem worked the way imperfect human-written data is:
    each result is one more or one less than right with probability `rate`, and every later step starts
    from the slipped value. Lines that are not `a op b = c.` equations are kept as they are."""
    lines, value = [], None
    for line in solution.split("\n"):
        m = EQUATION_RE.match(line)
        if not m:
            lines.append(line)
            continue
        a, op, b = int(m[1]) if value is None else value, m[2], int(m[3])
        value = a + b if op == "+" else a - b if op == "-" else a * b
        if rng.random() < rate:
            value = value + 1 if value == 0 or rng.random() < 0.5 else value - 1
        lines.append(f"{a} {op} {b} = {value}.")
    return "\n".join(lines), str(value)


# ----------------------------------------------------------------------------------------------
# Small demo files for the judge and problem/answer recipes, made from the built-in task

def _demo_responses(ex: dict, rng: random.Random) -> dict[int, str]:
    """Responses to one problem by helpfulness: 4 worked and right, 3 right without work, 1 worked
    with a wrong last step, 0 no attempt."""
    wrong = str(int(ex["answer"]) + rng.choice([-2, -1, 1, 2]))
    steps = ex["solution"].split("\n")
    steps[-1] = steps[-1].rsplit("= ", 1)[0] + f"= {wrong}."
    return {4: target_text(ex), 3: f"The answer is {ex['answer']}.", 1: "\n".join(steps) + f"\n#### {wrong}",
            0: "I do not know."}


def make_demo(out_dir: str, n_train: int = 200, n_test: int = 40, seed: int = 0) -> list[str]:
    """Writes judge_pointwise_{train,test}.jsonl and judge_pairwise_{train,test}.jsonl (OpenJudge layout)
    and problems_{train,test}.jsonl (problem/answer columns) into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for split, examples in zip(("train", "test"), arithmetic_task(n_train, n_test, seed)):
        files = {name: [] for name in ("judge_pointwise", "judge_pairwise", "problems")}
        for ex in examples:
            query = [{"role": "user", "content": ex["question"]}]
            responses = _demo_responses(ex, rng)
            label = rng.choice(list(responses))
            files["judge_pointwise"].append({"input": query, "output": [{"answer": {
                "role": "assistant", "content": responses[label], "label": {"helpfulness": label}}}]})
            pair, better = [responses[4], responses[rng.choice([0, 1])]], rng.choice("AB")
            if better == "B":
                pair.reverse()
            files["judge_pairwise"].append({"input": query, "output": [{"answer": {
                "role": "assistant", "content": text, "label": {"preference": better}}} for text in pair]})
            files["problems"].append({"problem": ex["question"], "answer": ex["answer"]})
        for name, rows in files.items():
            paths.append(os.path.join(out_dir, f"{name}_{split}.jsonl"))
            with open(paths[-1], "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
    return paths + make_digits_demo(out_dir, seed=seed)


def make_digits_demo(out_dir: str, n_train: int = 80, n_test: int = 20, seed: int = 0) -> list[str]:
    """The built-in visual task as files, in the two layouts of image data: digits_{train,test}.jsonl
    (problem, answer in GSM8K's layout, images as PNG paths relative to the file) and
    digits_{train,test}.parquet (images as HF datasets' {"bytes", "path"} dicts). Returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(out_dir, "digits_images"), exist_ok=True)
    paths = []
    for split, examples in zip(("train", "test"), vision.digits_task(n_train, n_test, seed)):
        rows, png = [], []
        for k, ex in enumerate(examples):
            path = os.path.join("digits_images", f"{split}_{k}.png")
            ex["images"][0].save(os.path.join(out_dir, path))
            with open(os.path.join(out_dir, path), "rb") as f:
                png.append(f.read())
            rows.append({"problem": ex["question"], "answer": f"{ex['solution']}\n#### {ex['answer']}",
                         "images": [path]})
        paths.append(os.path.join(out_dir, f"digits_{split}.jsonl"))
        with open(paths[-1], "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        paths.append(os.path.join(out_dir, f"digits_{split}.parquet"))
        pq.write_table(pa.table({"problem": [r["problem"] for r in rows], "answer": [r["answer"] for r in rows],
                                 "images": [[{"bytes": b, "path": None}] for b in png]}), paths[-1])
    return paths


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["make-demo"]:  # python data.py make-demo OUT_DIR [N_TRAIN N_TEST]
        if len(sys.argv) not in (3, 5):
            sys.exit("usage: python data.py make-demo OUT_DIR [N_TRAIN N_TEST]")
        sizes = [int(n) for n in sys.argv[3:5]]
        print("\n".join(make_demo(sys.argv[2], *sizes)))
        sys.exit()
    train, test = arithmetic_task(1000, 100, seed=0)
    for ex in train[:3]:
        print(ex["question"], "\n---\n" + target_text(ex), "\n")
    print(f"{len(train)} train / {len(test)} test problems")
