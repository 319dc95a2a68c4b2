"""DAPO's dynamic sampling (grpo.py): uninformative groups are dropped and refilled, with any sampler."""
import math

import pytest
import torch

import builtin_tasks
import config
import data
import grpo
import llms
import rollout
import samplers
from helpers import FAST, read, run_train

G = 4


def question(i: int, kind: str) -> dict:
    """kind: "mixed" (2 of G chains right: informative), "right" or "wrong" (all alike: no gradient)."""
    return {"question": f"What is {i} + 0?", "answer": str(i), "solution": "", "kind": kind}


def teacher_forced_sampler(calls: list):
    """Each question's G chains answer it right as its kind says; records each call's batch."""
    def sample(model, tokenizer, batch, step):
        calls.append([ex["question"] for ex in batch])
        completions = []
        for ex in batch:
            right = {"mixed": [True, False, True, False], "right": [True] * G, "wrong": [False] * G}[ex["kind"]]
            completions += [f"#### {ex['answer'] if ok else '-1'}" for ok in right]
        prompts = [llms.chat_prompt(tokenizer, "", ex["question"]) for ex in batch for _ in range(G)]
        r = rollout.teacher_forced(tokenizer, prompts, completions, 64, 16)
        r.group = torch.arange(len(batch)).repeat_interleave(G)
        for d, c in zip(r.info, completions):
            d.update(completion_len=len(c), truncated=False)
        r.stats = {"toy/chains": float(len(r))}
        r.reward_weight = torch.full((len(r),), 2.0) if len(calls) == 2 else None  # only the second call weighs
        return r
    return sample


@pytest.fixture(scope="module")
def policy():
    model, tok = llms.load(llms.TINY, "cpu", tiny_corpus=["What is 3 + 0? #### 3"] * 10, tiny_hidden=32,
                           tiny_layers=2, seed=0)
    return llms.Policy(model, tok, None)


def run_step(policy, batch, pool, rounds=3):
    cfg = config.Config(dynamic_sampling=True, max_sampling_rounds=rounds, rewards={"correctness": 1.0},
                        num_chains=G, optimizer="adamw", max_completion_tokens=16)
    calls = []
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.0)

    def refill(n, k):
        return [pool.pop(0) for _ in range(n)]
    out = grpo.step(policy, teacher_forced_sampler(calls), batch, 1, optimizer, cfg, refill=refill)
    return out, calls


def test_uninformative_groups_are_replaced_until_the_step_is_full(policy):
    batch = [question(1, "mixed"), question(2, "right"), question(3, "wrong"), question(4, "mixed")]
    pool = [question(5, "right"), question(6, "mixed"), question(7, "mixed"), question(8, "wrong"),
            question(9, "mixed"), question(10, "mixed")]
    out, calls = run_step(policy, batch, pool)
    # round 1: 2 of 4 informative; round 2 asks for ceil(2 missing x 4 sampled / 2 kept) = 4 questions,
    # of which 6 and 7 fill the step (9 is informative but not needed)
    assert [len(c) for c in calls] == [4, 4]
    assert [ex["answer"] for ex in out.batch] == ["1", "4", "6", "7"]
    assert out.metrics["sampling_rounds"] == 2
    assert out.metrics["filtered_frac"] == pytest.approx(1 - 4 / 8)
    assert out.metrics["zero_adv_frac"] == 0.0  # every trained group has signal
    r = out.rollout
    assert len(r) == 4 * G and r.group.tolist() == [g for g in range(4) for _ in range(G)]
    assert out.answers == [out.batch[g]["answer"] for g in r.group.tolist()]  # groups index the kept batch
    assert all(t.endswith(a) or t.endswith("-1") for t, a in zip(r.texts, out.answers))
    # round 1 has no reward weights and round 2 weighs 2: the kept chains carry theirs
    assert r.reward_weight.tolist() == [1.0] * 2 * G + [2.0] * 2 * G
    # the reward figures are over all 8 x G chains sampled: 2 + 4 + 0 + 2 | 4 + 2 + 2 + 0 right of 32
    assert out.metrics["reward/correctness"] == pytest.approx(16 / 32)
    assert out.metrics["toy/chains"] == pytest.approx(16.0)  # the idea's figures: averaged over the rounds


def test_rounds_stop_at_max_sampling_rounds(policy):
    batch = [question(1, "right"), question(2, "mixed")]
    pool = [question(i, "wrong") for i in range(3, 20)]
    out, calls = run_step(policy, batch, pool, rounds=3)
    assert [len(c) for c in calls] == [2, 2, 2]  # 1 kept of 2 sampled: 1 missing x 2 / 1 = 2 per round
    assert [ex["answer"] for ex in out.batch] == ["2"] and out.metrics["sampling_rounds"] == 3
    assert out.metrics["filtered_frac"] == pytest.approx(5 / 6)


def test_a_step_without_any_informative_group_trains_its_first_round(policy):
    batch = [question(1, "right"), question(2, "wrong")]
    out, calls = run_step(policy, batch, [question(i, "right") for i in range(3, 20)], rounds=2)
    assert len(calls) == 2 and [ex["answer"] for ex in out.batch] == ["1", "2"]
    assert out.metrics["filtered_frac"] == 1.0 and out.metrics["zero_adv_frac"] == 1.0


def test_callers_without_more_questions_are_refused(policy):
    cfg = config.Config(dynamic_sampling=True)
    with pytest.raises(ValueError, match="refill"):
        grpo.step(policy, teacher_forced_sampler([]), [question(1, "mixed")], 1, None, cfg)


def test_refill_is_seeded_and_skips_the_steps_own_questions():
    train, _ = builtin_tasks.arithmetic_task(50, 5, seed=0)
    taken = train[:10]
    a = data.refill(train, 3, 1, 8, 0, taken=taken, per_round=8)
    assert a == data.refill(train, 3, 1, 8, 0, taken=taken, per_round=8) and len(a) == 8
    assert not any(ex is t for ex in a for t in taken)
    assert a != data.refill(train, 3, 2, 8, 0, taken=taken, per_round=8)  # another round draws other questions


def test_refill_never_draws_a_question_twice_in_a_step_across_rounds_and_ranks():
    """2 ranks x 3 refill rounds, each asking for up to its B / N = 3: 18 distinct questions, none of the
    step's own; each rank derives the others' draws alike, so none of them needs to be told."""
    train, _ = builtin_tasks.arithmetic_task(30, 5, seed=0)
    taken = train[:6]
    drawn = [ex for k in (1, 2, 3) for rank in (0, 1)
             for ex in data.refill(train, 7, k, 3, 0, taken=taken, per_round=3, rank=rank, world=2)]
    assert len(drawn) == 18 and len({id(ex) for ex in drawn}) == 18
    assert not any(ex is t for ex in drawn for t in taken)
    short = data.refill(train, 7, 1, 2, 0, taken=taken, per_round=3, rank=1, world=2)  # asks for fewer than 3
    assert short == data.refill(train, 7, 1, 3, 0, taken=taken, per_round=3, rank=1, world=2)[:2]
    assert data.refill(train, 7, 5, 3, 0, taken=taken, per_round=3, rank=0, world=2) == []  # the set ran out


def test_no_question_is_sampled_twice_in_a_step_of_train_py(tmp_path, monkeypatch):
    """Every group is uninformative (one reward for all), so each step refills in every round: from a train
    set of 8 questions, 4 rounds of 2 take all 8, each once."""
    import rewards
    import samplers
    monkeypatch.setitem(rewards.REWARDS, "always_one", lambda completion, answer, **info: 1.0)
    make, calls = samplers.make, []

    def recording_make(cfg, **kwargs):
        sample = make(cfg, **kwargs)

        def recorded(model, tokenizer, batch, step):
            calls.append((step, [ex["question"] for ex in batch]))
            return sample(model, tokenizer, batch, step)
        return recorded
    monkeypatch.setattr(samplers, "make", recording_make)
    run_train(FAST + ["--out_dir", str(tmp_path / "run"), "--max_steps", "2", "--eval_every", "5",
                      "--dynamic_sampling", "--max_sampling_rounds", "4", "--rewards", "always_one=1",
                      "--arithmetic_train_size", "8", "--max_completion_tokens", "8"])
    for step in (1, 2):
        questions = [q for s, batch in calls if s == step for q in batch]
        assert len(questions) == 8 and len(set(questions)) == 8, step


@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))  # a new idea is covered at once
def test_dynamic_sampling_trains_with_every_sampler(tmp_path, sampler):
    out = str(tmp_path / sampler)
    run_train(FAST + ["--out_dir", out, "--max_steps", "1", "--eval_every", "5", "--sampler", sampler,
                      "--dynamic_sampling", "--max_sampling_rounds", "2", "--max_completion_tokens", "16",
                      "--guide_max_prefix_tokens", "8", "--guide_min_prefix_tokens", "2", "--max_guide_tokens", "3",
                      "--verifier_turn_tokens", "8", "--verifier_max_turns", "2"])
    row = [r for r in read(f"{out}/metrics.jsonl") if r["split"] == "train"][0]
    assert 1 <= row["sampling_rounds"] <= 2 and 0 <= row["filtered_frac"] <= 1
    assert math.isfinite(row["loss"]) and row["skipped"] == 0
    assert len(read(f"{out}/samples.jsonl")) > 0
