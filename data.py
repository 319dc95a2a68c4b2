"""Datasets: GSM8K (hub or local file), judge data (OpenJudge layout), rows with images, and the built-in
tasks (builtin_tasks.py) by name.

Every loader returns plain lists of examples, one dict per problem:
    {"question": str, "answer": str, "solution": str}  (+ "images": [PIL images], "videos": [video.Video])
`answer` is the final answer (what answers.is_correct compares against; a judge's label), `solution`
is the worked solution without the answer line (what the SFT warm start imitates and GHPO hints are
cut from). Judge examples add "target", the verdict the warm start imitates.

`dataset: arithmetic` and `dataset: digits` are the built-in tasks (builtin_tasks.py), which need no
download. A row's images (`image_field`) are read as vision.to_image reads them, its videos (`video_field`)
as video.read reads them.

Other tasks are other files and a prompt template: `question` is the template filled with the row
(configs/prompts/*.txt; `{question}` for math, `{query}` and `{response}` or `{response_a}` and
`{response_b}` for judges). Judge data follows OpenJudge's layout, one record per line (jsonl) or row
(parquet): `input` is a list of chat messages, `output` a list of {"answer": {"role", "content",
"label": {"helpfulness": 0..4} or {"preference": "A" or "B"}}}. A pointwise record gives one example
per response (answer "0".."4"), a pairwise record one example (answer "A" or "B"). A malformed record
is an error naming its file, row and field; skip_bad_rows skips and counts such rows instead.

    python data.py --config configs/tiny.yaml   # a run's train and test examples: counts and the first two
"""
import json
import os
import random
import re
import sys

import builtin_tasks
import config
import rewards
import video
import vision

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
                 image_field: str = "", base_dir: str = "", *, video_field: str = "", fps: float = 2.0,
                 max_frames: int = 16) -> list[dict]:
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
    videos = row.get(video_field) if video_field else None
    if videos is not None:  # a list of videos, each a list of frames or a file; one file alone is one video
        videos = [videos] if isinstance(videos, str) else videos
        if not isinstance(videos, list):
            raise BadRow(f"{where} {video_field}: a {type(videos).__name__} is not a list of videos")
        try:
            rate = float(row.get("fps") or fps)
        except (TypeError, ValueError):
            raise BadRow(f"{where} fps: {row.get('fps')!r} is not a number of frames per second") from None
        example["videos"] = []
        for k, clip in enumerate(videos):
            try:
                example["videos"].append(video.read(clip, base_dir, fps=rate, max_frames=max_frames,
                                                    to_image=vision.to_image))
            except ValueError as e:
                raise BadRow(f"{where} {video_field}[{k}]: {e}") from None
    if images is not None or videos is not None or vision.has_visual(example["question"]):
        try:  # marks without images or videos are an error too
            example["question"] = vision.with_placeholders(example["question"], len(example.get("images", [])),
                                                           len(example.get("videos", [])))
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
                answer_field: str, skip_bad_rows: bool, image_field: str = "", *, video_field: str = "",
                fps: float = 2.0, max_frames: int = 16) -> list[dict]:
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
                                         base_dir, video_field=video_field, fps=fps, max_frames=max_frames)
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
    """(train, test) examples of cfg.dataset: "arithmetic", "addition", "digits" or "clips" (builtin_tasks.py), a
    hub name, or a local file or folder; cfg.task says how rows become examples (math: question/answer
    columns; judge_*: the OpenJudge layout)."""
    template = load_template(cfg.prompt_template, cfg.task)
    if cfg.dataset == "clips":
        train, test = builtin_tasks.clips_task(cfg.digits_train_size, cfg.digits_test_size, cfg.seed, cfg.digits_count,
                                               cfg.fps)
        return tuple([{**ex, "question": vision.with_placeholders(fill(template, question=ex["question"]), 0, 1)}
                      for ex in split] for split in (train, test))
    if cfg.dataset == "digits":
        train, test = builtin_tasks.digits_task(cfg.digits_train_size, cfg.digits_test_size, cfg.seed,
                                                cfg.digits_count)
        return tuple([{**ex, "question": vision.with_placeholders(fill(template, question=ex["question"]), 1)}
                      for ex in split] for split in (train, test))
    if cfg.dataset in ("arithmetic", "addition"):
        if cfg.task != "math":
            raise config.UserError(f"the built-in {cfg.dataset} task is a math task; task {cfg.task!r} needs judge "
                                   f"data: make a small set with `python builtin_tasks.py make-demo out/demo_data`")
        if cfg.dataset == "addition":
            train, test = builtin_tasks.addition_task(cfg.arithmetic_train_size, cfg.arithmetic_test_size, cfg.seed,
                                                      cfg.addition_digits)
        else:
            train, test = builtin_tasks.arithmetic_task(cfg.arithmetic_train_size, cfg.arithmetic_test_size,
                                                        cfg.seed, cfg.arithmetic_min_steps, cfg.arithmetic_max_steps,
                                                        cfg.arithmetic_max_value)
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
    videos = dict(video_field=cfg.video_field, fps=cfg.fps, max_frames=cfg.max_frames)
    return to_examples(train_rows, cfg.dataset, *args, **videos), to_examples(test_rows, test_source, *args, **videos)


def step_batch(examples: list[dict], step: int, size: int, seed: int) -> list[dict]:
    """The questions of a step: a fresh seeded shuffle per epoch, so a resumed run sees the same order."""
    epoch_len = max(1, len(examples) // size)
    epoch, pos = divmod(step - 1, epoch_len)
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [examples[i] for i in order[pos * size:(pos + 1) * size]]


def refill(examples: list[dict], step: int, round_: int, size: int, seed: int, *, taken: list[dict],
           per_round: int, rank: int = 0, world: int = 1) -> list[dict]:
    """`size` (<= per_round) more questions for round `round_` (1, 2, ...) of a step's dynamic sampling
    (grpo.py) on rank `rank` of `world`. Every rank derives the same seeded order of (seed, step) without
    the step's questions (`taken`, all ranks' B), and each (round, rank) takes its own slice of it,
    per_round wide: no question is trained twice in a step, across rounds and ranks, and a resumed run
    draws the same. Fewer (or none) when the train set runs out."""
    taken_ids = {id(ex) for ex in taken}
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + step).shuffle(order)
    pool = [examples[i] for i in order if id(examples[i]) not in taken_ids]
    start = ((round_ - 1) * world + rank) * per_round
    return pool[start:start + min(size, per_round)]


# How a few-shot example shows the answer of a row that has nothing but its final answer (a question file in
# GSM8K's published form: "#### 125"), by the run's eval_format (a reward of rewards.py): a model copies the
# example's layout whatever the system prompt asks. bare_number wants the number alone. correctness and
# integer_answer read the "#### N" line target_text gives, as does a run without eval_format. The layouts
# that wrap a reasoning (strict_format, soft_format, r1_format, think_format, think_answer) get no invented
# one: an empty reasoning would teach the model to skip it (and in strict_format and r1_format is a blank
# line, where plain-format answers stop), so those keep "#### N", and few_shot_examples warns.
SHOT_ANSWERS = {"bare_number": "{answer}"}


def few_shot_examples(train_set: list[dict], k: int, seed: int, *, eval_format: str = "",
                      settings: dict | None = None) -> list[tuple[str, str]]:
    """k solved training examples (question, answer text) for the plain prompt format, the same for a
    seed in every process: target_text, except that a row with neither a worked solution nor a target
    shows its final answer as eval_format's reward wants it (SHOT_ANSWERS). An example that still scores
    0 on that reward (called with `settings`, rewards.settings) is a warning that names it."""
    def answer_text(ex: dict) -> str:
        if "target" in ex or ex["solution"] or eval_format not in SHOT_ANSWERS:
            return target_text(ex)
        return SHOT_ANSWERS[eval_format].format(answer=ex["answer"])
    picked = random.Random(seed).sample(train_set, min(k, len(train_set)))
    shots = [(ex["question"], answer_text(ex)) for ex in picked]
    if eval_format:
        score = rewards.REWARDS[eval_format]
        off = [(q, a) for (q, a), ex in zip(shots, picked) if not score(a, ex["answer"], **(settings or {}))]
        if off:
            # a warning, not an error: the run is still sound (accuracy comes from the answer checker), and a
            # checkpoint trained this way must still load in evaluator.py; but the model now sees one layout
            # and is asked for another, which costs accuracy without any other sign
            first = "Question: {}\nAnswer: {}".format(*off[0])
            print(f"warning: {len(off)} of {len(shots)} few-shot examples score 0 on eval_format {eval_format!r}, the "
                  f"answer layout this run asks for, and a model tends to copy the example's layout instead; the "
                  f"first reads {first!r}. Set few_shot 0 (no example), or eval_format to the layout the examples "
                  f"show, or give the training rows answers in the layout asked for", file=sys.stderr)
    return shots


def run_shots(cfg, train_set: list[dict]) -> list[tuple[str, str]]:
    """The run's few-shot examples (few_shot_examples with its settings), for llms.from_config."""
    return few_shot_examples(train_set, cfg.few_shot, cfg.seed, eval_format=cfg.eval_format,
                             settings=rewards.settings(cfg))


def tiny_corpus(train_set: list[dict], system_prompt: str) -> list[str]:
    """The texts the built-in tiny model's tokenizer is trained on: the train set's chats."""
    return [f"system\n{system_prompt}\nuser\n{ex['question']}\nassistant\n{target_text(ex)}" for ex in train_set]


def target_text(example: dict, answer_only: bool = False, slip_rate: float = 0.0, rng: random.Random | None = None
                ) -> str:
    """What the SFT warm start teaches: a judge example's verdict in its output format (its "target",
    with an empty think), else the worked solution (left out when answer_only), then '#### answer'.
    slip_rate > 0 (needs rng): each equation's result is off by one with that probability, and the slip
    carries into the later steps and the final answer (builtin_tasks.with_slips)."""
    if "target" in example:
        return example["target"]
    if answer_only or not example["solution"]:
        return f"#### {example['answer']}"
    solution, answer = example["solution"], example["answer"]
    if slip_rate > 0:
        solution, answer = builtin_tasks.with_slips(solution, slip_rate, rng)
    return f"{solution}\n#### {answer}"


if __name__ == "__main__":
    cfg = config.load(sys.argv[1:] or ["--dataset", "arithmetic"])
    train, test = load(cfg)
    for ex in train[:2]:
        print({k: v for k, v in ex.items() if k not in ("images", "videos")},
              f"({len(ex.get('images', []))} images, {len(ex.get('videos', []))} videos)")
        print("---\n" + target_text(ex), "\n")
    print(f"{cfg.dataset}: {len(train)} train / {len(test)} test examples")
