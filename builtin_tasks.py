"""The built-in tasks, which need no download, and the demo files made from them.

    arithmetic  GSM8K-shaped word problems of 2 to 4 steps: a solution with one equation per sentence,
                the answer after `####` (`dataset: arithmetic`; the CPU demo and most tests use it)
    addition    "What is 47 + 38?": two numbers of `addition_digits` digits (2: 10 to 99), the sum the answer, the
                question saying nothing of the answer's layout (the recipe's system prompt does:
                `dataset: addition`; the SmolLM2 recipe)
    digits      a visual task: one-digit numbers drawn as seven-segment digits in an image, their sum
                asked, the text never saying them (`dataset: digits`, for VL policies: vision.py)
    clips       the same sums shown as a video clip, the numbers one after another (`dataset: clips`: video.py)
    with_slips  a built-in solution worked the way imperfect human data is, for the warm start
                (sft_slip_rate: data.target_text)
    make_demo   small judge, problem/answer and image files for the CPU recipes (configs/ headers)

Each task returns (train, test) lists of examples as data.py describes them, deterministic from one
seed, with no test question in train.

    python builtin_tasks.py                          # a few problems of each task (PNGs to out/digits_demo/)
    python builtin_tasks.py make-demo out/demo_data  # the demo files
"""
import itertools
import json
import os
import random
import re

from PIL import Image, ImageDraw

import config
import video

# ----------------------------------------------------------------------------------------------
# The arithmetic task

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


def worked(example: dict) -> str:
    """A built-in example's solution and answer in GSM8K's layout: 'steps\n#### answer'."""
    return f"{example['solution']}\n#### {example['answer']}"


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
# The addition task


def addition_task(n_train: int, n_test: int, seed: int, digits: int = 2) -> tuple[list[dict], list[dict]]:
    """Every pair of `digits`-digit numbers (10 to 99 for 2) as "What is a + b?", shuffled by seed, the first
    n_test held out; a + b and b + a are different questions. The solution works it by place value
    ("40 + 30 = 70", "7 + 8 = 15", "70 + 15 = 85": GHPO's hints), the target is the bare sum: what few-shot
    examples and a warm start show as the answer."""
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
    count = (high - low + 1) ** 2
    if n_train + n_test > count:
        raise config.UserError(f"only {count} additions of {digits}-digit numbers exist; lower "
                               f"arithmetic_train_size + arithmetic_test_size ({n_train} + {n_test}) or raise "
                               f"addition_digits")
    rng = random.Random(seed)
    picked = rng.sample(range(count), n_train + n_test)  # pair k is (low + k // width, low + k % width)
    width = high - low + 1
    examples = []
    for k in picked:
        a, b = low + k // width, low + k % width
        tens, units = a // 10 * 10 + b // 10 * 10, a % 10 + b % 10
        worked = f"{a // 10 * 10} + {b // 10 * 10} = {tens}\n{a % 10} + {b % 10} = {units}\n{tens} + {units} = {a + b}"
        examples.append({"question": f"What is {a} + {b}?", "answer": str(a + b), "solution": worked,
                         "target": str(a + b)})
    return examples[n_test:], examples[:n_test]


# ----------------------------------------------------------------------------------------------
# The built-in visual task: numbers drawn as seven-segment digits, the question asks for their sum

SEGMENTS = {0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg", 5: "acdfg", 6: "acdefg", 7: "abc",
            8: "abcdefg", 9: "abcdfg"}


def draw_digit(draw: ImageDraw.ImageDraw, digit: int, x: int, y: int, w: int = 16, h: int = 24) -> None:
    """A seven-segment digit in the box (x, y, w, h): no font, so it draws alike on every machine."""
    t = max(2, w // 5)  # stroke
    boxes = {"a": (x, y, x + w, y + t), "g": (x, y + h // 2 - t // 2, x + w, y + h // 2 + t // 2),
             "d": (x, y + h - t, x + w, y + h), "f": (x, y, x + t, y + h // 2), "b": (x + w - t, y, x + w, y + h // 2),
             "e": (x, y + h // 2, x + t, y + h), "c": (x + w - t, y + h // 2, x + w, y + h)}
    for s in SEGMENTS[digit]:
        draw.rectangle(boxes[s], fill=(255, 255, 255))


def number_image(numbers: list[int]) -> Image.Image:
    """Each one-digit number in its own 28 x 28 cell (one image token of a 2x2-merged 14-pixel grid)."""
    image = Image.new("RGB", (28 * len(numbers), 28), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for k, n in enumerate(numbers):
        draw_digit(draw, n, 28 * k + 6, 2)
    return image


def digits_task(n_train: int, n_test: int, seed: int, count: int = 2) -> tuple[list[dict], list[dict]]:
    """Train and test problems {"question", "answer", "solution", "images"}: `count` one-digit numbers in
    the image, 10**count problems, none in both splits. The question has no <image> mark: loading puts it
    at the start, as for any row without one (data.load). The solution adds them left to right, one
    equation per line like the arithmetic task's (so sft_slip_rate works on it: with_slips)."""
    words = {2: "two", 3: "three", 4: "four"}.get(count, str(count))
    examples = [{"question": f"What is the sum of the {words} numbers in the image?",
                 "answer": str(sum(p)), "solution": running_sums(p), "images": [number_image(list(p))]}
                for p in digit_problems(n_train + n_test, seed, count)]
    return examples[n_test:], examples[:n_test]


def digit_problems(n: int, seed: int, count: int) -> list[tuple[int, ...]]:
    """n distinct tuples of `count` one-digit numbers, seeded (the first ones are the test split's)."""
    problems = list(itertools.product(range(10), repeat=count))
    random.Random(seed).shuffle(problems)
    if n > len(problems):
        raise config.UserError(f"the digits task with {count} numbers has {len(problems)} problems: lower "
                               f"digits_train_size and digits_test_size ({n} in all), or raise digits_count")
    return problems[:n]


def clips_task(n_train: int, n_test: int, seed: int, count: int = 3, fps: float = 2.0, hold: int = 2
               ) -> tuple[list[dict], list[dict]]:
    """The digits task as video: each problem's `count` one-digit numbers shown one after another in 28 x 28
    frames, each held for `hold` frames (2: one temporal patch of the Qwen VL families, so no patch mixes
    two numbers), at `fps` frames per second; {"question", "answer", "solution", "videos"}; the same
    problems and splits as digits_task's for the seed."""
    words = {2: "two", 3: "three", 4: "four"}.get(count, str(count))
    examples = []
    for p in digit_problems(n_train + n_test, seed, count):
        frames = [number_image([n]) for n in p for _ in range(hold)]
        examples.append({"question": f"What is the sum of the {words} numbers shown in the clip?",
                         "answer": str(sum(p)),
                         "solution": running_sums(p),
                         "videos": [video.Video(frames, [k / fps for k in range(len(frames))], fps)]})
    return examples[n_test:], examples[:n_test]


def running_sums(numbers) -> str:
    """(3, 4, 5) -> '3 + 4 = 7.\n7 + 5 = 12.'"""
    lines, total = [], numbers[0]
    for n in numbers[1:]:
        lines.append(f"{total} + {n} = {total + n}.")
        total += n
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Small demo files for the judge, problem/answer and image recipes, made from the built-in tasks

def _demo_responses(ex: dict, rng: random.Random) -> dict[int, str]:
    """Responses to one problem by helpfulness: 4 worked and right, 3 right without work, 1 worked
    with a wrong last step, 0 no attempt."""
    wrong = str(int(ex["answer"]) + rng.choice([-2, -1, 1, 2]))
    steps = ex["solution"].split("\n")
    steps[-1] = steps[-1].rsplit("= ", 1)[0] + f"= {wrong}."
    return {4: worked(ex), 3: f"The answer is {ex['answer']}.", 1: "\n".join(steps) + f"\n#### {wrong}",
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
    for split, examples in zip(("train", "test"), digits_task(n_train, n_test, seed)):
        rows, png = [], []
        for k, ex in enumerate(examples):
            path = os.path.join("digits_images", f"{split}_{k}.png")
            ex["images"][0].save(os.path.join(out_dir, path))
            with open(os.path.join(out_dir, path), "rb") as f:
                png.append(f.read())
            rows.append({"problem": ex["question"], "answer": worked(ex), "images": [path]})
        paths.append(os.path.join(out_dir, f"digits_{split}.jsonl"))
        with open(paths[-1], "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        paths.append(os.path.join(out_dir, f"digits_{split}.parquet"))
        pq.write_table(pa.table({"problem": [r["problem"] for r in rows], "answer": [r["answer"] for r in rows],
                                 "images": [[{"bytes": b, "path": None}] for b in png]}), paths[-1])
    return paths

if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["make-demo"]:  # python builtin_tasks.py make-demo OUT_DIR [N_TRAIN N_TEST]
        if len(sys.argv) not in (3, 5):
            sys.exit("usage: python builtin_tasks.py make-demo OUT_DIR [N_TRAIN N_TEST]")
        sizes = [int(n) for n in sys.argv[3:5]]
        print("\n".join(make_demo(sys.argv[2], *sizes)))
        sys.exit()
    train, test = arithmetic_task(1000, 100, seed=0)
    for ex in train[:3]:
        print(ex["question"], "\n---\n" + worked(ex), "\n")
    print(f"arithmetic: {len(train)} train / {len(test)} test problems")
    train, _ = digits_task(900, 100, seed=0, count=3)
    os.makedirs("out/digits_demo", exist_ok=True)
    for k, ex in enumerate(train[:3]):
        path = f"out/digits_demo/{k}.png"
        ex["images"][0].save(path)
        print(path, ex["question"], "->", worked(ex).replace("\n", " "))
