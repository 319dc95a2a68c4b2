"""The supervised warm start: a short pass on reference solutions before GRPO (sft_steps > 0).

GRPO learns only from groups where some chains succeed; a policy that never succeeds gets no
gradient. The built-in tiny model starts from random weights, so its recipes first imitate the
reference solutions for a few hundred steps (cross-entropy on the completion tokens only).
FINDINGS.md has what the recipe's settings (decay, answer-only targets, slips) did to the demo.

    python sft.py     # a short warm start of the tiny model, then its greedy answer to one question
"""
import math
import random

import torch
from tqdm import tqdm

import data
import llms
import losses
import rollout


def warm_start(model, tokenizer, examples: list[dict], cfg) -> None:
    """cfg.sft_steps supervised steps on batches of examples' targets (data.target_text), in place.

    Learning rate: linear warmup over sft_warmup_steps, then cosine decay to 0 at sft_steps. A share
    sft_answer_only_frac of the targets is the final answer alone, without the worked steps;
    sft_slip_rate puts carried one-off slips into the built-in task's solutions (data.with_slips).
    """
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.sft_learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.sft_warmup_steps)
                                                  * 0.5 * (1 + math.cos(math.pi * s / cfg.sft_steps)))
    rng = random.Random(cfg.seed)
    for _ in tqdm(range(cfg.sft_steps), desc="warm start (SFT)", leave=False):
        batch = rng.sample(examples, min(cfg.sft_batch_size, len(examples)))
        prompts = rollout.prompts_of(tokenizer, cfg.system_prompt, batch)
        targets = [data.target_text(ex, rng.random() < cfg.sft_answer_only_frac, cfg.sft_slip_rate, rng)
                   for ex in batch]
        r = rollout.teacher_forced(tokenizer, prompts, targets, cfg.max_prompt_tokens, cfg.max_completion_tokens)
        start = losses.first_trained_column(r.loss_mask)
        mask = r.loss_mask[:, start:].to(device)
        logps = losses.token_logps(model, r.input_ids.to(device), r.attention_mask.to(device), start, 1.0,
                                   cfg.logp_chunk)
        nll = -(logps * mask).sum() / mask.sum()  # mean over the target tokens
        nll.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    import config

    train, _ = data.arithmetic_task(2000, 10, seed=0)
    m, tok = llms.load(llms.TINY, "cpu", tiny_corpus=[ex["question"] + "\n" + data.target_text(ex) for ex in train])
    cfg = config.Config(system_prompt="", sft_steps=100, sft_learning_rate=3e-3, max_completion_tokens=64)
    warm_start(m, tok, train, cfg)
    r = rollout.sample(m, tok, rollout.prompts_of(tok, "", train[:1]), 1, max_prompt_tokens=128, max_new_tokens=64,
                       temperature=0.0)
    print(train[0]["question"], "\n->", r.texts[0], f"\n(reference answer {train[0]['answer']})")
