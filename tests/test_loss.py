"""The GRPO loss family in grpo.py: policy_loss against hand-written formulas, micro-batching,
group advantages, loss masks, Liger's fused loss against our path, and grpo.update.

Everything runs on CPU in fp32 with a 2-layer, 32-wide random Qwen2 built in about a second.
"""
import copy
import dataclasses
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config  # noqa: E402
import grpo
import llms  # noqa: E402
import logprobs
import optim
import rollout  # noqa: E402
from grpo import group_advantages, policy_loss  # noqa: E402
from logprobs import liger_loss, token_logps  # noqa: E402

ALL_LOSSES = ["grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce"]
LIGER_LOSSES = ["grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo"]
EPS_LOW, EPS_HIGH = 0.2, 0.28  # asymmetric on purpose: a swapped bound would show
CISPO_CAP = 1.3                 # cispo_max_weight: low enough that the test batches' ratios reach it
MAX_LEN = 16                    # max_completion_tokens (dr_grpo's normaliser)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors here are tiny: one thread is faster, and 100x faster when another job shares the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_cfg(loss_type, beta=0.0, **kw):
    return config.Config(loss_type=loss_type, beta=beta, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                         cispo_max_weight=CISPO_CAP, max_completion_tokens=MAX_LEN, temperature=0.7, logp_chunk=3,
                         **kw)


# ----------------------------------------------------------------------------------------------
# A hand-written reference: loops over chains and tokens, one term at a time


def reference_loss(logps, old, ref, adv, mask, loss_type, beta, num_seqs, num_tokens, num_micro):
    """(loss, clipped token count, kl sum), written independently of grpo.policy_loss."""
    lo, hi = 1 - EPS_LOW, 1 + EPS_HIGH
    rows, clipped, kl_sum = [], 0, 0.0
    for i in range(logps.shape[0]):
        toks = mask[i].nonzero().flatten().tolist()
        A = float(adv[i])
        # GSPO: one ratio per chain, the exponentiated mean token log-ratio
        seq_ratio = torch.exp(sum(logps[i, t] - old[i, t] for t in toks) / len(toks)) if toks else None
        terms = []
        for t in toks:
            lp = logps[i, t]
            r = seq_ratio if loss_type == "gspo" else torch.exp(lp - old[i, t])
            if loss_type == "cispo":  # capped, stop-gradient weight on plain REINFORCE
                term = -torch.clamp(r, max=CISPO_CAP).detach() * A * lp
            elif loss_type == "reinforce":
                term = -A * lp
            else:  # PPO clipped surrogate
                term = -torch.min(r * A, torch.clamp(r, lo, hi) * A)
            if loss_type != "reinforce":
                r = float(r.detach())
                clipped += int((r < lo and A < 0) or (r > hi and A > 0))
            if beta > 0:  # k3 estimator
                d = ref[i, t] - lp
                kl = torch.exp(d) - d - 1
                term = term + beta * kl
                kl_sum += float(kl.detach())
            terms.append(term)
        rows.append(terms)
    every = [t for terms in rows for t in terms]
    if loss_type in ("grpo", "gspo", "reinforce"):
        loss = sum(sum(terms) / len(terms) for terms in rows if terms) / num_seqs
    elif loss_type == "bnpo":
        loss = sum(every) / len(every) / num_micro
    elif loss_type == "dr_grpo":
        loss = sum(every) / (num_seqs * MAX_LEN)
    else:  # dapo, cispo
        loss = sum(every) / num_tokens
    return loss, clipped, kl_sum


def random_batch(lengths, seed=0):
    """n chains of T = 6 positions: ragged prefix masks (one hole), mixed-sign advantages, and
    old/ref log-probs far enough from the current ones that both clip bounds act."""
    g = torch.Generator().manual_seed(seed)
    n, T = len(lengths), 6
    logps = -torch.rand(n, T, generator=g) * 3 - 0.1
    # per-chain drift of old: ratios up where A > 0, down where A < 0, so both bounds (and GSPO) clip
    shift = torch.tensor([-0.3, 0.3, -0.25, 0.25])[:n, None]
    old = logps + 0.4 * torch.randn(n, T, generator=g) + shift
    ref = logps + 0.5 * torch.randn(n, T, generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1])[:n]
    return logps, old, ref, adv, mask


# ----------------------------------------------------------------------------------------------
# 1. policy_loss against the reference formulas


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("loss_type", ALL_LOSSES)
def test_policy_loss_matches_reference_formula(loss_type, beta):
    logps, old, ref, adv, mask = random_batch([6, 4, 1, 5])
    mask[3, 2] = 0  # a hole inside a chain, not only ragged ends
    num_tokens = mask.sum()
    logps = logps.clone().requires_grad_(True)
    cfg = make_cfg(loss_type, beta)

    loss, stats = policy_loss(logps, old, ref, adv, mask, cfg, 4, num_tokens, 1)
    (grad,) = torch.autograd.grad(loss, logps)
    expected, clipped, kl_sum = reference_loss(logps, old, ref, adv, mask, loss_type, beta, 4, num_tokens, 1)
    (expected_grad,) = torch.autograd.grad(expected, logps)

    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7), (loss.item(), expected.item())
    assert torch.allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert (grad[mask == 0] == 0).all()  # padding gets exactly no gradient
    assert stats["kl"] == pytest.approx(kl_sum, rel=1e-5, abs=1e-7)
    if loss_type not in ("cispo", "reinforce"):  # cispo's count: test_cispo_clip_stat_counts_the_cap_on_both_signs
        assert stats["clip"] == clipped
    if loss_type in ("grpo", "dapo", "gspo"):  # the batch really exercises clipping on both sides
        assert 0 < clipped < num_tokens


def test_cispo_gradient_weight_is_capped_and_detached():
    # d/dlogp of -min(r, c).detach() * A * logp is -min(r, c) * A: no gradient through the ratio
    logps, old, _, adv, mask = random_batch([6, 6, 6, 6])
    logps = logps.clone().requires_grad_(True)
    loss, _ = policy_loss(logps, old, None, adv, mask, make_cfg("cispo"), 4, mask.sum(), 1)
    (grad,) = torch.autograd.grad(loss, logps)
    weight = torch.exp(logps - old).detach().clamp(max=CISPO_CAP)
    assert torch.allclose(grad, -weight * adv[:, None] / mask.sum(), rtol=1e-6)
    assert (weight == CISPO_CAP).any() and (weight < 1).any()


def test_cispo_clip_stat_counts_the_cap_on_both_signs():
    # the cap scales a token's weight whatever the sign of its advantage: both count as clipped
    logps, old, _, adv, mask = random_batch([6, 4, 2, 5])
    _, stats = policy_loss(logps, old, None, adv, mask, make_cfg("cispo"), 4, mask.sum(), 1)
    capped = (torch.exp(logps - old) > CISPO_CAP).float() * mask
    assert stats["clip"] == capped.sum().item()
    assert capped[adv < 0].sum() > 0 and capped[adv > 0].sum() > 0  # the batch has both


def test_kl_is_k3_and_nonnegative():
    logps, _, ref, adv, mask = random_batch([6, 6, 6, 6])
    _, stats = policy_loss(logps, logps, ref, adv, mask, make_cfg("dapo", 1.0), 4, mask.sum(), 1)
    d = ref - logps
    assert stats["kl"] == pytest.approx((torch.exp(d) - d - 1).sum().item(), rel=1e-6)
    assert stats["kl"] > 0


def test_on_policy_ratio_is_one_and_never_clips():
    # num_iterations 1: old = logps.detach(), so every ratio is exactly 1
    logps, _, _, adv, mask = random_batch([6, 4, 2, 5])
    for loss_type in ALL_LOSSES:
        _, stats = policy_loss(logps, logps.detach(), None, adv, mask, make_cfg(loss_type), 4, mask.sum(), 1)
        assert stats["clip"] == 0


# ----------------------------------------------------------------------------------------------
# 2. micro-batching: the sum over micro-batches is the step's loss


@pytest.mark.parametrize("loss_type", ALL_LOSSES)
def test_micro_batches_sum_to_the_whole_batch(loss_type):
    # bnpo normalises per micro-batch, so give both halves the same token count (8 and 8)
    lengths = [6, 2, 3, 5] if loss_type == "bnpo" else [6, 4, 1, 5]
    logps, old, ref, adv, mask = random_batch(lengths)
    logps = logps.clone().requires_grad_(True)
    cfg, n, num_tokens = make_cfg(loss_type, 0.1), 4, mask.sum()

    whole, st_whole = policy_loss(logps, old, ref, adv, mask, cfg, n, num_tokens, 1)
    (g_whole,) = torch.autograd.grad(whole, logps)
    parts, st_parts = [], []
    for s in (slice(0, 2), slice(2, 4)):
        loss, st = policy_loss(logps[s], old[s], ref[s], adv[s], mask[s], cfg, n, num_tokens, 2)
        parts.append(loss)
        st_parts.append(st)
    summed = sum(parts)
    (g_parts,) = torch.autograd.grad(summed, logps)

    assert torch.allclose(summed, whole, rtol=1e-5, atol=1e-7)
    assert torch.allclose(g_parts, g_whole, rtol=1e-5, atol=1e-7)
    for key in ("kl", "clip"):  # stats are sums: they add up too
        assert sum(st[key] for st in st_parts) == pytest.approx(st_whole[key], rel=1e-5)


def test_bnpo_with_unequal_micro_batches_is_the_mean_of_micro_batch_means():
    logps, old, ref, adv, mask = random_batch([6, 4, 1, 5])  # 10 and 6 tokens
    cfg = make_cfg("bnpo")
    parts = [policy_loss(logps[s], old[s], ref[s], adv[s], mask[s], cfg, 4, mask.sum(), 2)[0]
             for s in (slice(0, 2), slice(2, 4))]
    means = [reference_loss(logps[s], old[s], ref[s], adv[s], mask[s], "bnpo", 0.0, 4, 0, 1)[0]
             for s in (slice(0, 2), slice(2, 4))]
    assert torch.allclose(sum(parts), (means[0] + means[1]) / 2, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# 3. group advantages


REWARDS = torch.tensor([1.0, 1.0, 1.0, 1.0,   # group 0: all equal, no signal
                        0.0, 2.0, 0.5, 3.5,   # group 1
                        1.0, 0.0, 0.0, 1.5])  # group 2
GROUPS = torch.arange(3).repeat_interleave(4)


def test_zero_variance_group_gets_exactly_zero_advantage():
    for scale in ("group", "batch", "none"):
        adv, zero_frac = group_advantages(REWARDS, GROUPS, scale)
        assert torch.equal(adv[:4], torch.zeros(4))
        assert zero_frac == pytest.approx(1 / 3)


def test_zero_variance_group_is_zero_for_inexact_rewards():
    adv, zero_frac = group_advantages(torch.full((7,), 0.7), torch.zeros(7, dtype=torch.long), "group")
    assert zero_frac == 1.0
    assert torch.equal(adv, torch.zeros(7))


def test_group_scale_gives_mean_zero_and_unit_std_per_group():
    adv, _ = group_advantages(REWARDS, GROUPS, "group")
    for g in (1, 2):
        a = adv[GROUPS == g]
        assert a.mean().item() == pytest.approx(0.0, abs=1e-6)
        assert a.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)  # population std
    # a group of 2 is well defined: +-1
    adv2, _ = group_advantages(torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), "group")
    assert torch.allclose(adv2, torch.tensor([-1.0, 1.0]), atol=1e-3)


def test_none_scale_is_just_centred_and_batch_scale_divides_by_batch_std():
    means = torch.tensor([REWARDS[GROUPS == g].mean() for g in range(3)])
    centred = REWARDS - means[GROUPS]
    adv_none, _ = group_advantages(REWARDS, GROUPS, "none")
    adv_batch, _ = group_advantages(REWARDS, GROUPS, "batch")
    assert torch.allclose(adv_none, centred, atol=1e-6)
    # the batch std is torch's default (Bessel-corrected) one, as in TRL's scale_rewards="batch"
    assert torch.allclose(adv_batch, centred / (REWARDS.std() + 1e-4), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The tiny model and a teacher-forced Rollout of 4 chains with ragged completions

CORPUS = ["What is 12 + 7? The answer is 19.", "Compute 3 * 4 - 2. We get 10.",
          "<reasoning>\n5 + 5 = 10\n</reasoning>\n<answer>\n10\n</answer>"] * 5
PROMPTS = ["What is 12 + 7?", "Compute 3 * 4 - 2 and then add 5 to it.", "What is 5 + 5?", "3 * 4?"]
COMPLETIONS = ["The answer is 19.", "10", "<answer>\n10\n</answer> so we get 10 + 5 = 15", "We get 12."]


@pytest.fixture(scope="module")
def lm():
    model, tok = llms.load(llms.TINY, "cpu", tiny_corpus=CORPUS, tiny_hidden=32, tiny_layers=2, seed=0)
    return model, tok


@pytest.fixture(scope="module")
def roll(lm):
    _, tok = lm
    prompts = [llms.chat_prompt(tok, "", p) for p in PROMPTS]
    r = rollout.teacher_forced(tok, prompts, COMPLETIONS, 64, MAX_LEN)
    r.group = torch.tensor([0, 0, 1, 1])
    assert (r.attention_mask[:, 0] == 0).any() and (r.attention_mask[:, -1] == 0).any()  # both paddings
    return r


@pytest.fixture(scope="module")
def fixed(lm, roll):
    """old and ref log-probs: the model's own, perturbed so that ratios differ from 1 and clip."""
    model, _ = lm
    start = logprobs.first_trained_column(roll.loss_mask)
    with torch.no_grad():
        base = token_logps(model, roll.input_ids, roll.attention_mask, start, 0.7, 3)
    g = torch.Generator().manual_seed(1)
    shift = torch.tensor([-0.3, 0.3, -0.25, 0.25])[:, None]  # as in random_batch: both bounds clip
    old = base + 0.3 * torch.randn(base.shape, generator=g) + shift
    ref = base + 0.5 * torch.randn(base.shape, generator=g)
    adv = torch.tensor([1.2, -0.8, 0.5, -0.9])
    return SimpleNamespace(start=start, mask=roll.loss_mask[:, start:], old=old, ref=ref, adv=adv)


def param_grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(g1, g2, rel=1e-4):
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:
        err = (g1[k] - g2[k]).norm().item()
        assert err <= rel * g2[k].norm().item() + 1e-9, (k, err, g2[k].norm().item())


def hand_loss(model, r, f, cfg, slices, ids=None):
    """token_logps + policy_loss over micro-batches, backward on each; (summed loss, stats, grads)."""
    ids = r.input_ids if ids is None else ids
    model.zero_grad(set_to_none=True)
    total, kl, clip = 0.0, 0.0, 0.0
    for s in slices:
        logps = token_logps(model, ids[s], r.attention_mask[s], f.start, cfg.temperature, cfg.logp_chunk)
        ref = f.ref[s] if cfg.beta > 0 else None
        loss, st = policy_loss(logps, f.old[s], ref, f.adv[s], f.mask[s], cfg, len(r), f.mask.sum(), len(slices))
        loss.backward()
        total, kl, clip = total + loss.item(), kl + st["kl"], clip + st["clip"]
    grads = param_grads(model)
    model.zero_grad(set_to_none=True)
    return total, {"kl": kl, "clip": clip}, grads


# ----------------------------------------------------------------------------------------------
# 4. log-probs and loss masks on the model


def test_token_logps_equal_plain_forward_log_softmax(lm, roll):
    model, _ = lm
    ids, attn = roll.input_ids, roll.attention_mask
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=rollout.position_ids(attn)).logits
        expected = torch.log_softmax(logits.float() / 0.7, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        for start, chunk in ((1, 5), (1, 1000), (logprobs.first_trained_column(roll.loss_mask), 3)):
            got = token_logps(model, ids, attn, start, 0.7, chunk)
            real = attn[:, start:].bool()  # positions whose token is real (pads: any value)
            assert torch.allclose(got[real], expected[:, start - 1:][real], atol=1e-5)


def test_token_logps_take_each_chains_own_temperature(lm, roll):
    model, _ = lm
    temps = torch.tensor([0.5, 1.0, 2.0, 0.7])
    with torch.no_grad():
        got = token_logps(model, roll.input_ids, roll.attention_mask, 1, temps, 3)
        for i, t in enumerate(temps.tolist()):
            alone = token_logps(model, roll.input_ids[i:i + 1], roll.attention_mask[i:i + 1], 1, t, 3)[0]
            assert torch.allclose(got[i], alone, atol=1e-5)
        at_one = token_logps(model, roll.input_ids[:1], roll.attention_mask[:1], 1, 1.0, 3)[0]
    assert not torch.allclose(got[0], at_one, atol=1e-3)  # row 0's own temperature, 0.5, does matter


def test_left_padding_does_not_change_logps(lm, roll):
    # the attention mask keeps both paddings out: a padded row scores its tokens as the row alone
    # would (position_ids skip left padding too, though RoPE would forgive a uniform shift)
    model, _ = lm
    with torch.no_grad():
        padded = token_logps(model, roll.input_ids, roll.attention_mask, 1, 0.7, 4)
        for i in range(len(roll)):
            pos = roll.attention_mask[i].nonzero().flatten()  # the real tokens, contiguous
            alone = token_logps(model, roll.input_ids[i:i + 1, pos], torch.ones(1, len(pos), dtype=torch.long),
                                1, 0.7, 4)[0]  # log-probs of pos[1:]
            assert torch.allclose(padded[i, pos[1:] - 1], alone, atol=1e-5)


@pytest.mark.parametrize("loss_type", ALL_LOSSES)
def test_tokens_outside_the_loss_mask_contribute_nothing(lm, roll, fixed, loss_type):
    model, tok = lm
    # stop training on the last two real tokens of chain 0 (its EOS included)
    last0 = int(roll.attention_mask[0].nonzero().max())
    r = copy.copy(roll)
    r.loss_mask = roll.loss_mask.clone()
    r.loss_mask[0, last0 - 1:last0 + 1] = 0
    f = SimpleNamespace(**vars(fixed))
    f.mask = r.loss_mask[:, f.start:]
    cfg = make_cfg(loss_type, 0.1)
    loss, _, grads = hand_loss(model, r, f, cfg, [slice(0, 4)])

    # change the masked EOS of chain 0 and a right-padding token of another chain: both come after
    # every trained token of their row, so only masked log-probs can change
    pad_row = int((roll.attention_mask[:, -1] == 0).nonzero()[0])
    ids = roll.input_ids.clone()
    ids[0, last0] = (ids[0, last0] + 7) % len(tok)
    ids[pad_row, -1] = (ids[pad_row, -1] + 11) % len(tok)
    loss2, _, grads2 = hand_loss(model, r, f, cfg, [slice(0, 4)], ids=ids)
    assert loss2 == pytest.approx(loss, rel=1e-6, abs=1e-9)
    assert_grads_close(grads2, grads, rel=1e-6)

    # whereas changing a trained token does change the loss (the check above has power)
    ids[0, last0 - 2] = (ids[0, last0 - 2] + 7) % len(tok)
    loss3, _, _ = hand_loss(model, r, f, cfg, [slice(0, 4)], ids=ids)
    assert abs(loss3 - loss) > 1e-6


# ----------------------------------------------------------------------------------------------
# 5. Liger's fused linear GRPO loss against token_logps + policy_loss


def liger_path(model, r, f, cfg, slices):
    model.zero_grad(set_to_none=True)
    total, kl, clip = 0.0, 0.0, 0.0
    for s in slices:
        ref = f.ref[s] if cfg.beta > 0 else None
        loss, st = liger_loss(model, r.input_ids[s], r.attention_mask[s], f.mask[s], f.start, f.adv[s],
                              f.old[s], ref, cfg, len(r), f.mask.sum(), len(slices))
        loss.backward()
        total, kl, clip = total + loss.item(), kl + st["kl"], clip + st["clip"]
    grads = param_grads(model)
    model.zero_grad(set_to_none=True)
    return total, {"kl": kl, "clip": clip}, grads


@pytest.mark.parametrize("micro", [1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("loss_type", LIGER_LOSSES)
def test_liger_loss_matches_hand_written_path(lm, roll, fixed, loss_type, beta, micro):
    model, _ = lm
    cfg = make_cfg(loss_type, beta)
    slices = [slice(0, 4)] if micro == 1 else [slice(0, 2), slice(2, 4)]
    loss, st, grads = hand_loss(model, roll, fixed, cfg, slices)
    l_loss, l_st, l_grads = liger_path(model, roll, fixed, cfg, slices)

    assert l_loss == pytest.approx(loss, rel=1e-4, abs=1e-7)
    assert_grads_close(l_grads, grads, rel=1e-4)
    assert l_st["kl"] == pytest.approx(st["kl"], rel=1e-4, abs=1e-7)
    assert l_st["clip"] == pytest.approx(st["clip"], abs=1e-3)
    if loss_type not in ("dr_grpo", "cispo"):
        assert st["clip"] > 0  # the perturbed old log-probs do make clipping act


# ----------------------------------------------------------------------------------------------
# 6. grpo.update


def train_cfg(**kw):
    return config.Config(**{**dict(loss_type="grpo", beta=0.1, num_iterations=2, micro_batch_size=2,
                                   logp_chunk=4, temperature=0.7, max_completion_tokens=MAX_LEN,
                                   max_grad_norm=1.0, liger=False), **kw})


def test_update_updates_and_reports_finite_stats(lm, roll):
    base, _ = lm
    torch.manual_seed(0)
    model, ref_model = copy.deepcopy(base), copy.deepcopy(base).requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), roll.group, "group")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    stats = grpo.update(model, ref_model, roll, adv, optimizer, train_cfg())

    assert set(stats) == {"loss", "grad_norm", "kl", "clip_frac", "skipped", "micro_batch_size"}
    assert stats["skipped"] == 0 and stats["micro_batch_size"] == 2
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert stats["grad_norm"] > 0 and stats["kl"] >= 0
    assert 0 < stats["clip_frac"] <= 1  # the second iteration is off-policy after a large step
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())  # grads are cleared after each step


def test_update_single_iteration_never_clips(lm, roll):
    base, _ = lm
    model = copy.deepcopy(base)
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), roll.group, "group")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = grpo.update(model, model, roll, adv, optimizer, train_cfg(num_iterations=1))
    assert stats["clip_frac"] == 0
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the model itself


def test_update_takes_each_chains_log_probs_at_its_sampling_temperature(lm, roll):
    """A sampler that samples its chains at other temperatures than cfg.temperature (Rollout.temperature):
    one SGD step moves the weights by the gradient of the loss over each chain's log-probs at its own."""
    base, _ = lm
    r = copy.copy(roll)
    r.temperature = torch.tensor([0.5, 0.5, 2.0, 2.0])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    cfg = train_cfg(beta=0.0, num_iterations=1, micro_batch_size=4, temperature=1.0, max_grad_norm=1e9)
    start = logprobs.first_trained_column(r.loss_mask)
    mask = r.loss_mask[:, start:]
    by_hand = copy.deepcopy(base)
    logps = token_logps(by_hand, r.input_ids, r.attention_mask, start, r.temperature, cfg.logp_chunk)
    policy_loss(logps, logps.detach(), None, adv, mask, cfg, 4, mask.sum().item(), 1)[0].backward()
    want = [p.detach() - p.grad for p in by_hand.parameters()]
    moved = []
    for temperature in (r.temperature, None):  # None: every chain at cfg.temperature, which differs here
        model = copy.deepcopy(base)
        grpo.update(model, None, dataclasses.replace(r, temperature=temperature), adv,
                      torch.optim.SGD(model.parameters(), lr=1.0), cfg)
        moved.append([p.detach() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(moved[0], want, strict=True))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(moved[1], want, strict=True))


def test_liger_refuses_chains_sampled_at_different_temperatures(lm, roll):
    """Liger's fused loss takes one scalar temperature: a rollout mixing two is refused, not trained on
    the wrong log-probs."""
    base, _ = lm
    r = dataclasses.replace(roll, temperature=torch.tensor([0.7, 0.7, 1.0, 1.0]))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="one temperature for every chain.*sampled at 0.7, 1: drop --liger"):
        grpo.update(model, None, r, torch.tensor([1.0, -1.0, 0.5, -0.5]),
                      torch.optim.SGD(model.parameters(), lr=0.1), train_cfg(beta=0.0, liger=True))


@pytest.mark.parametrize("loss_type", ["dapo", "gspo"])
def test_update_liger_matches_plain(lm, roll, loss_type):
    # two iterations in two micro-batches, SGD so that the parameters follow the gradients linearly
    base, _ = lm
    ref_model = copy.deepcopy(base).requires_grad_(False)
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), roll.group, "group")
    results = []
    for liger in (False, True):
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        stats = grpo.update(model, ref_model, roll, adv, optimizer,
                                       train_cfg(loss_type=loss_type, liger=liger))
        results.append((stats, [p.detach() for p in model.parameters()]))
    (s0, p0), (s1, p1) = results
    for key in ("loss", "grad_norm", "kl", "clip_frac"):
        assert s1[key] == pytest.approx(s0[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(p0, p1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def with_right_padding(r, extra):
    """The same rollout with `extra` more padding columns after every chain."""
    def pad(t, value):
        return torch.nn.functional.pad(t, (0, extra), value=value)
    return rollout.Rollout(pad(r.input_ids, 0), pad(r.attention_mask, 0), pad(r.loss_mask, 0.0), r.group,
                           r.texts, r.info)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "gspo", "cispo"])
def test_sorted_cropped_micro_batches_give_the_same_update(lm, roll, loss_type, monkeypatch):
    # unsorted micro-batches {0, 1}, {2, 3} against sorted ones {2, 0}, {3, 1} of a rollout with 5 more
    # padding columns: old and ref log-probs (num_iterations 2, beta 0.1), loss and update all agree
    base, _ = lm
    ref_model = copy.deepcopy(base).requires_grad_(False)
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), roll.group, "group")
    widths, original = [], logprobs.token_logps

    def recorded(model, input_ids, *args, **kwargs):
        widths.append(input_ids.shape[1])
        return original(model, input_ids, *args, **kwargs)
    monkeypatch.setattr(logprobs, "token_logps", recorded)
    results = []
    for r, sort in ((roll, False), (with_right_padding(roll, 5), True)):
        widths.clear()
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        stats = grpo.update(model, ref_model, r, adv, optimizer,
                                       train_cfg(loss_type=loss_type, sort_micro_batches=sort))
        results.append((stats, [p.detach() for p in model.parameters()], list(widths)))
    (s0, p0, w0), (s1, p1, w1) = results
    for key in ("loss", "grad_norm", "kl", "clip_frac"):
        assert s1[key] == pytest.approx(s0[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(p0, p1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    ends = logprobs.last_trained_column(roll.loss_mask) + 1
    assert w0[:2] == [int(ends[:2].max()), int(ends[2:].max())]  # rollout order, each cropped
    by_length = ends.sort(descending=True).values
    assert w1[:2] == [int(by_length[0]), int(by_length[2])]  # longest first; the extra padding never seen
    assert sum(w1[:2]) < sum(w0[:2])  # sorting saves columns here


# ----------------------------------------------------------------------------------------------
# 7. each loss type's paper defaults (config.LOSS_DEFAULTS) make its clip act on a second iteration


def second_iteration(log_ratio: float, n=4, T=6):
    """logps and old log-probs of a second iteration (num_iterations 2) whose log-ratio is +log_ratio
    where the advantage is > 0 and -log_ratio where it is < 0: the direction an update moves them."""
    logps = -torch.rand(n, T, generator=torch.Generator().manual_seed(0)) - 0.5
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])[:n]
    old = logps - log_ratio * adv.sign()[:, None]
    return logps, old, adv, torch.ones(n, T)


def loaded_cfg(loss_type, *flags):
    return config.load(["--loss_type", loss_type, "--max_completion_tokens", str(MAX_LEN), *flags])


def test_gspo_default_range_clips_a_realistic_sequence_ratio():
    # GSPO's sequence ratio moves by about 1e-3 per update: its paper's 3e-4 / 4e-4 clips that,
    # the token range 0.2 / 0.2 never does
    logps, old, adv, mask = second_iteration(1e-3)
    cfg = loaded_cfg("gspo")
    assert (cfg.eps_low, cfg.eps_high) == (3e-4, 4e-4)
    _, stats = policy_loss(logps, old, None, adv, mask, cfg, 4, mask.sum(), 1)
    assert stats["clip"] == mask.sum().item()  # every chain moved past its bound
    _, stats = policy_loss(logps, old, None, adv, mask, loaded_cfg("gspo", "--eps_low", "0.2", "--eps_high", "0.2"),
                           4, mask.sum(), 1)
    assert stats["clip"] == 0


def test_dapo_default_clip_higher_lets_a_rising_token_through():
    # DAPO's clip-higher (eps_high 0.28): a token of a good chain whose probability rose 25% still learns
    logps, old, adv, mask = second_iteration(0.22)  # ratios 1.246 and 0.803
    cfg = loaded_cfg("dapo")
    assert (cfg.eps_low, cfg.eps_high) == (0.2, 0.28)
    _, stats = policy_loss(logps, old, None, adv, mask, cfg, 4, mask.sum(), 1)
    assert stats["clip"] == 0  # both inside [0.8, 1.28]
    _, stats = policy_loss(logps, old, None, adv, mask, loaded_cfg("dapo", "--eps_high", "0.2"), 4, mask.sum(), 1)
    assert stats["clip"] == mask[adv > 0].sum().item()  # the symmetric range clips the rising side


def test_cispo_default_cap_acts_on_a_fork_token_only():
    # CISPO's cap (cispo_max_weight 5, ScaleRL's eps_max) bounds the weight of a rare token whose
    # probability jumped e^2 = 7.4x, and leaves a token that moved 25% at its ratio
    logps, old, adv, mask = second_iteration(0.22)
    old[0, 2] = logps[0, 2] - 2.0  # the fork token, in a chain with A > 0
    old[1, 3] = logps[1, 3] - 2.0  # and one in a chain with A < 0: the cap scales it all the same
    cfg = loaded_cfg("cispo")
    assert cfg.cispo_max_weight == 5.0
    logps = logps.clone().requires_grad_(True)
    loss, stats = policy_loss(logps, old, None, adv, mask, cfg, 4, mask.sum(), 1)
    assert stats["clip"] == 2
    (grad,) = torch.autograd.grad(loss, logps)
    weight = -grad * mask.sum() / adv[:, None]  # the stop-gradient weight of each token
    assert weight[0, 2].item() == pytest.approx(5.0) and weight[1, 3].item() == pytest.approx(5.0)
    assert weight[0, 0].item() == pytest.approx(math.exp(0.22), rel=1e-5)


def test_dr_grpo_defaults_to_unscaled_advantages():
    assert loaded_cfg("dr_grpo").adv_scale == "none"
    assert loaded_cfg("grpo").adv_scale == "group"


def test_micro_batches_end_at_the_last_trained_column(lm, roll, monkeypatch):
    # a guided-like rollout: each chain trains a few tokens in the middle and its tail is untrained;
    # the update computes no column after the last trained one, and equals the update of the whole width
    base, _ = lm
    r = copy.deepcopy(roll)
    start = logprobs.first_trained_column(r.loss_mask)
    for i in range(len(r)):
        trained = r.loss_mask[i].nonzero().flatten()
        r.loss_mask[i, trained[max(1, len(trained) // 2):]] = 0  # the second half of each chain is a postfix
    ends = logprobs.last_trained_column(r.loss_mask) + 1
    assert (ends < logprobs.last_trained_column(roll.loss_mask) + 1).any()
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), r.group, "group")
    cfg = train_cfg(beta=0.0, num_iterations=1, micro_batch_size=4)
    widths, original = [], logprobs.token_logps

    def recorded(model, input_ids, *args, **kwargs):
        widths.append(input_ids.shape[1])
        return original(model, input_ids, *args, **kwargs)
    monkeypatch.setattr(logprobs, "token_logps", recorded)
    cropped = copy.deepcopy(base)
    grpo.update(cropped, None, r, adv, torch.optim.SGD(cropped.parameters(), lr=0.5), cfg)
    assert widths == [int(ends.max())] and widths[0] < r.input_ids.shape[1]

    whole = copy.deepcopy(base)  # by hand: every column, then the same clipping and SGD step
    logps = original(whole, r.input_ids, r.attention_mask, start, cfg.temperature, cfg.logp_chunk)
    mask = r.loss_mask[:, start:]
    loss, _ = policy_loss(logps, logps.detach(), None, adv, mask, cfg, len(r), mask.sum(), 1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(whole.parameters(), cfg.max_grad_norm)
    torch.optim.SGD(whole.parameters(), lr=0.5).step()
    for a, b in zip(cropped.parameters(), whole.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_shared_prompt_run_once_gives_the_log_probs_and_gradient_of_the_full_pass(lm):
    """share_prompt: each group's prompt columns run once and its keys and values (with their gradient)
    go to every chain: the same log-probs and weight gradients as running every chain in full."""
    model, tok = lm
    prompts = [llms.chat_prompt(tok, "", p) for p in PROMPTS[:2]]  # two lengths: left padding in the prompt columns
    torch.manual_seed(0)
    r = rollout.sample(model, tok, prompts, 3, max_prompt_tokens=64, max_new_tokens=6, temperature=1.0)
    start = logprobs.first_trained_column(r.loss_mask)
    body, _ = llms.decoder_and_head(model)
    shared = logprobs.shared_prompt_hidden(body, r.input_ids, r.attention_mask, start)
    full = logprobs.hidden_states(body, r.input_ids, r.attention_mask)[:, start - 1:]
    assert shared.shape == full.shape and torch.allclose(shared, full, atol=1e-5)
    got = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        logps = token_logps(model, r.input_ids, r.attention_mask, start, 0.7, 3, share_prompt=share)
        (logps * r.loss_mask[:, start:] * torch.tensor([1.0, -2.0, 0.5, 1.5, -1.0, 0.3])[:, None]).sum().backward()
        got[share] = logps.detach(), param_grads(model)
    model.zero_grad(set_to_none=True)
    assert torch.allclose(got[True][0], got[False][0], atol=1e-5)
    assert_grads_close(got[True][1], got[False][1])
    distinct = torch.arange(len(r))[:, None].expand(-1, start)  # no two rows share a prompt: the full pass
    assert logprobs.shared_prompt_hidden(body, distinct, torch.ones_like(distinct), start) is None


@pytest.mark.parametrize("schedule, want", [
    ("constant", [0.5, 1, 1, 1, 1, 1, 1, 1]),
    ("wsd", [0.5, 1, 1, 1, 1, 0.75, 0.5, 0.25]),  # the last 4 steps down to 1/4, none at 0
    ("cosine", [0.5, 1] + [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]),  # never at 0 either
])
def test_the_learning_rate_of_each_step_under_each_schedule(schedule, want):
    cfg = config.Config(optimizer="adamw", kahan_updates=False, learning_rate=2.0, warmup_steps=2, max_steps=8,
                        lr_schedule=schedule, lr_decay_steps=4)
    optimizer, scheduler = optim.make_optimizer(torch.nn.Linear(2, 2), cfg)
    got = []
    for _ in range(cfg.max_steps):
        got.append(optimizer.param_groups[0]["lr"] / cfg.learning_rate)
        optimizer.step()
        scheduler.step()
    assert got == pytest.approx(want)
