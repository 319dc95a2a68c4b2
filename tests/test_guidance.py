"""Three-phase guided sampling: boundaries, prefix choice, budgets, loss masks, batching, and a guided run."""
import copy
import json

import pytest
import torch

import config
import guidance
import samplers
from sft import warm_start
import grpo
import llms
import logprobs
import rollout
from helpers import FAST, run_train


@pytest.fixture(scope="module")
def sft(tiny, task):
    """A copy of the tiny model warm-started on the solutions: it writes lines ending in '.' and '\\n'
    and stops with EOS, so prefixes have boundaries to cut at (the untrained model rarely does)."""
    model, tok = tiny
    model = copy.deepcopy(model)
    cfg = config.Config(system_prompt="", sft_steps=80, sft_batch_size=32, sft_learning_rate=5e-3,
                        sft_warmup_steps=5, max_prompt_tokens=96, max_completion_tokens=48, logp_chunk=64)
    torch.manual_seed(0)
    warm_start(model, tok, task[0], cfg)
    return model, tok


def prompts_of(tok, task, n):
    return [llms.chat_prompt(tok, "", ex["question"]) for ex in task[0][:n]]


def sample(model, tok, prompts, seed=0, **kw):
    args = dict(num_chains=4, max_prompt_tokens=96, max_completion_tokens=24, temperature=1.0, top_p=1.0,
                min_prefix_tokens=1, max_prefix_tokens=20, prefix_retries=2, min_guide_tokens=2,
                max_guide_tokens=5, loss_on="guidance")
    torch.manual_seed(seed)
    args = {**args, **kw}
    return guidance.three_phase(model, tok, prompts, args.pop("num_chains"), **args)


def completion_of(r, i):
    """Chain i's completion tokens (prefix + guidance + postfix), padding dropped: P is the prompt width."""
    width = max(d["prefix_len"] + d["guide_len"] + d["postfix_len"] for d in r.info)
    P = r.input_ids.shape[1] - width
    return r.input_ids[i, P:][r.attention_mask[i, P:].bool()].tolist(), P


# ----------------------------------------------------------------------------------------------
# boundaries and the prefix cut


class FakeTokenizer:
    vocab = ["a", ".", ". ", "3.", "x,y", " ", "?!", "\n", "\t", "ok!  ", "<eos>", "...", '."', ",\t"]
    all_special_ids = [10]

    def __len__(self):
        return len(self.vocab)

    def batch_decode(self, rows):
        return ["".join(self.vocab[i] for i in row) for row in rows]


def test_boundary_ids_from_decoded_text():
    # trailing spaces and tabs are stripped, special tokens never count, '."' does not end in a boundary
    assert guidance.boundary_ids(FakeTokenizer()) == {1, 2, 3, 6, 7, 9, 11, 13}


def test_boundary_ids_of_the_tiny_tokenizer(tiny):
    _, tok = tiny
    found = guidance.boundary_ids(tok)
    for ch in guidance.BOUNDARY_CHARS:
        ids = tok(ch, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] in found, ch
    assert not found & set(tok.all_special_ids)
    assert all(tok.decode([i]).rstrip(" \t").endswith(guidance.BOUNDARY_CHARS) for i in found)


NL, DOT, COMMA = 1, 2, 3


@pytest.mark.parametrize("ids, cut", [
    ([5, NL, 6, DOT, 7, COMMA, 8], [5, NL, 6, DOT, 7, COMMA]),  # last boundary, not the first kind found
    ([5, COMMA, 6, NL, 7, DOT, 8, 8], [5, COMMA, 6, NL, 7, DOT]),
    ([5, 6, 7], []),                                            # no boundary at all
    ([5, DOT], [5, DOT]),                                       # boundary as the last token
    ([DOT], [DOT]),
    ([], []),
])
def test_cut_at_last_boundary_of_any_kind(ids, cut):
    assert guidance.cut_at_boundary(ids, {NL, DOT, COMMA}) == cut


EOS = 0


@pytest.mark.parametrize("candidates, budgets, expected", [
    ([[5, DOT, 6, EOS, 9], [5, DOT, 6, DOT, 7]], [8, 4], ([5, DOT, 6, DOT], False)),  # EOS: next candidate
    ([[5, DOT, 6, EOS]], [3], ([5, DOT], False)),               # an EOS past the budget was never sampled
    ([[5, DOT, EOS], [DOT, EOS]], [5, 2], ([], True)),          # every candidate finished: empty prefix
    ([[5, 6, 7], [5, 6]], [3, 1], ([], True)),                  # no boundary in any candidate
    ([[5, 7, 6, DOT]], [3], ([], True)),                        # the boundary lies past the budget
    ([[DOT, 5]], [0], ([], True)),                              # a zero budget samples nothing
])
def test_pick_prefix_skips_finished_and_boundaryless_candidates(candidates, budgets, expected):
    assert guidance.pick_prefix(candidates, budgets, {NL, DOT, COMMA}, [EOS]) == expected


def test_left_pad():
    ids, mask = rollout.left_pad([[1, 2, 3], [4]], pad_id=9, device="cpu")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# ----------------------------------------------------------------------------------------------
# sampling: budgets, shared prefixes, masks, batching


@pytest.mark.parametrize("seed", [0, 1])
def test_budgets_shared_prefix_and_info(sft, task, seed):
    model, tok = sft
    eos = model.generation_config.eos_token_id
    boundaries = guidance.boundary_ids(tok)
    r = sample(model, tok, prompts_of(tok, task, 3), seed=seed)
    assert len(r) == 12 and r.group.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert any(not d["prefix_fallback"] for d in r.info)  # the check below is not vacuous
    for i, d in enumerate(r.info):
        comp, P = completion_of(r, i)
        a, b = d["prefix_len"], d["prefix_len"] + d["guide_len"]
        assert len(comp) == b + d["postfix_len"] <= 24  # completion tokens only, never the prompt
        assert r.texts[i] == tok.decode(comp, skip_special_tokens=True)
        assert d["guidance"] == tok.decode(comp[a:b], skip_special_tokens=True)
        prefix, guide = comp[:a], comp[a:b]
        assert d["prefix_fallback"] == (a == 0)
        assert not set(prefix) & set(eos) and (a == 0 or prefix[-1] in boundaries)
        if guide[-1] in eos:  # finished during guidance: nothing follows
            assert 1 <= len(guide) <= 5 and d["postfix_len"] == 0
        else:
            assert 2 <= len(guide) <= 5
        assert d["truncated"] == (not set(comp) & set(eos)) and (not d["truncated"] or len(comp) == 24)
        assert r.loss_mask[i, :P + a].sum() == 0 and r.loss_mask[i].sum() == d["guide_len"]
    for g in range(3):  # chains of one prompt share the prefix and the guidance budget
        chains = [i for i in range(12) if r.group[i] == g]
        n, fallback = r.info[chains[0]]["prefix_len"], r.info[chains[0]]["prefix_fallback"]
        for i in chains:
            assert completion_of(r, i)[0][:n] == completion_of(r, chains[0])[0][:n]
            assert (r.info[i]["prefix_len"], r.info[i]["prefix_fallback"]) == (n, fallback)
        unfinished = {r.info[i]["guide_len"] for i in chains if r.info[i]["postfix_len"] > 0}
        assert len(unfinished) <= 1


@pytest.mark.parametrize("loss_on", config.options("guide_loss_on"))
def test_loss_on_trains_exactly_the_intended_tokens(sft, task, loss_on):
    model, tok = sft
    r = sample(model, tok, prompts_of(tok, task, 2), seed=3, loss_on=loss_on, num_chains=3)
    for i, d in enumerate(r.info):
        _, P = completion_of(r, i)
        a = d["prefix_len"]
        b = a + d["guide_len"]
        c = b + d["postfix_len"]
        start, end = {"guidance": (a, b), "guidance+postfix": (a, c), "all": (0, c)}[loss_on]
        expected = [0] * P + [int(start <= j < end) for j in range(r.input_ids.shape[1] - P)]
        assert r.loss_mask[i].long().tolist() == expected
    # the loss's gradient reaches the per-token log-probs exactly where the mask is 1
    start = logprobs.first_trained_column(r.loss_mask)
    mask = r.loss_mask[:, start:]
    logps = logprobs.token_logps(model, r.input_ids, r.attention_mask, start, 1.0, chunk=16)
    logps.retain_grad()
    cfg = config.Config(loss_type="grpo")
    loss, _ = grpo.policy_loss(logps, logps.detach(), None, torch.ones(len(r)), mask, cfg, len(r), mask.sum(), 1)
    loss.backward()
    model.zero_grad(set_to_none=True)
    assert torch.equal(logps.grad != 0, mask.bool())


def test_greedy_three_phases_equal_one_greedy_generate(sft, task):
    """Greedy decoding is a fixed path: cutting it into prefix, guidance and postfix, re-padding each
    phase's batch in between, must give the same tokens as one greedy generate of the same budget."""
    model, tok = sft
    prompts = prompts_of(tok, task, 3)
    r = sample(model, tok, prompts, temperature=0.0, num_chains=2, max_completion_tokens=30,
               min_prefix_tokens=6, max_prefix_tokens=18, prefix_retries=0, min_guide_tokens=2, max_guide_tokens=4)
    plain = rollout.sample(model, tok, prompts, 1, max_prompt_tokens=96, max_new_tokens=30, temperature=0.0)
    assert any(d["prefix_len"] > 0 for d in r.info)  # some chains really were cut and re-padded
    for i in range(len(r)):
        g = r.group[i]
        assert completion_of(r, i)[0] == plain.input_ids[g][plain.loss_mask[g].bool()].tolist()


def test_one_generate_call_per_phase(sft, task, monkeypatch):
    model, tok = sft
    calls = []
    real = rollout.generate

    def counting(model, input_ids, attention_mask, *, max_new_tokens, temperature, top_p=1.0, kv_cache="dynamic",
                 visual=None):
        calls.append((input_ids.shape[0], max_new_tokens, kv_cache))
        return real(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, visual=visual)

    monkeypatch.setattr(rollout, "generate", counting)
    sample(model, tok, prompts_of(tok, task, 2), num_chains=3, prefix_retries=1, max_guide_tokens=4, kv_cache="static")
    assert [rows for rows, _, _ in calls] == [2 * 2, 2 * 3, 2 * 3]  # prefix: B x (1 + retries); then B x G twice
    assert calls[0][1] <= 20 and 2 <= calls[1][1] <= 4 and calls[2][1] <= 24 - 2
    assert {s for _, _, s in calls} == {"static"}  # --kv_cache reaches every phase


# ----------------------------------------------------------------------------------------------
# reward weighting, config, and a guided training run


def test_position_weight_and_summary():
    assert guidance.position_weight(0, 10) == 0.5 and guidance.position_weight(10, 10) == 1.0
    assert guidance.position_weight(2, 10) < guidance.position_weight(6, 10)
    info = [{"prefix_len": 0, "guide_len": 2, "postfix_len": 8, "prefix_fallback": True},
            {"prefix_len": 6, "guide_len": 2, "postfix_len": 2, "prefix_fallback": False}]
    assert (torch.tensor([2.0, -1.0]) * guidance.position_weights(info)).tolist() == pytest.approx([1.0, -0.8])
    assert guidance.summary(info) == {"guide/prefix_len": 3.0, "guide/guidance_len": 2.0,
                                      "guide/postfix_len": 5.0, "guide/prefix_fallback_frac": 0.5}


@pytest.mark.parametrize("argv, message", [
    (["--min_guide_tokens", "0"], "1 <= min_guide_tokens"),
    (["--min_guide_tokens", "9", "--max_guide_tokens", "8"], "min_guide_tokens <= max_guide_tokens"),
    (["--max_guide_tokens", "64", "--max_completion_tokens", "64"], "below max_completion_tokens"),
    (["--guide_min_prefix_tokens", "40", "--guide_max_prefix_tokens", "20"], "guide_min_prefix_tokens <="),
    (["--guide_prefix_retries", "-1"], "guide_prefix_retries"),
    (["--guide_loss_on", "prefix"], "guide_loss_on must be one of"),
])
def test_guided_config_errors(argv, message):
    with pytest.raises(ValueError, match=message):  # the config, or the guided sampler's start-up check
        samplers.make(config.load(["--sampler", "guided"] + argv), device="cpu", train_set=[])
    if "--guide_loss_on" not in argv:  # plain sampling ignores the guided keys
        samplers.make(config.load(argv), device="cpu", train_set=[])


def test_guided_run_logs_guide_metrics(tmp_path):
    out = str(tmp_path / "guided")
    run_train(FAST + ["--out_dir", out, "--max_steps", "2", "--save_every", "2", "--eval_every", "5",
                       "--sampler", "guided", "--guide_min_prefix_tokens", "2", "--guide_max_prefix_tokens", "12",
                       "--guide_loss_on", "guidance+postfix", "--guide_position_weight"])
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    trains = [row for row in rows if row["split"] == "train"]
    assert [row["step"] for row in trains] == [1, 2]
    for row in trains:
        assert 0 <= row["guide/prefix_fallback_frac"] <= 1 and row["guide/guidance_len"] >= 1
        assert row["guide/prefix_len"] + row["guide/guidance_len"] + row["guide/postfix_len"] <= 24
    samples = [json.loads(line) for line in open(f"{out}/samples.jsonl")]
    assert all("guidance" in s["info"] and "prefix_fallback" in s["info"] for s in samples)
