"""The sampling ideas by name: `--sampler NAME` picks one of SAMPLERS (the KV cache is `--kv_cache`).

Each entry is a constructor `make_sampler(cfg, *, device, train_set)` that checks the idea's own
settings once, at start-up (and builds what it needs: a verifier backend, say), and returns

    sample(model, tokenizer, batch, step) -> rollout.Rollout

for a batch of B examples {"question", "answer", "solution"} and the 1-based step. The Rollout says
which tokens exist and which are trained (loss_mask); its `stats` are the idea's figures for the
train line, and its `reward_weight` (optional) scales each chain's reward. Every caller reaches every
idea through this dict alone: a new idea is one constructor here plus its config fields.
"""
import difflib

import config
import ghpo
import guidance
import rollout
import verifier

SAMPLERS = {
    "plain": rollout.make_sampler,      # G independent chains per question (rollout.py)
    "guided": guidance.make_sampler,    # Guide-GRPO: shared prefix, guidance tokens, postfix (guidance.py)
    "ghpo": ghpo.make_sampler,          # GHPO: all-wrong groups sampled again with hints (ghpo.py)
    "verifier": verifier.make_sampler,  # Guided-GRPO: a verifier corrects each step (verifier.py)
}


def check(cfg) -> None:
    """Fail fast, before anything loads, on a misspelled --sampler."""
    if cfg.sampler in ("dynamic", "static"):  # the KV-cache values of `sampler` before it was renamed
        raise config.UserError(f"sampler picks the sampling idea ({', '.join(SAMPLERS)}); the KV cache is now "
                               f"kv_cache: write kv_cache: {cfg.sampler}")
    if cfg.sampler not in SAMPLERS:
        close = difflib.get_close_matches(cfg.sampler, SAMPLERS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise config.UserError(f"unknown sampler {cfg.sampler!r}.{hint} Valid names: {', '.join(SAMPLERS)} "
                               f"(samplers.py)")


def make(cfg, *, device: str, train_set: list[dict]):
    """The sample function of cfg.sampler, its start-up checks done."""
    check(cfg)
    return SAMPLERS[cfg.sampler](cfg, device=device, train_set=train_set)
