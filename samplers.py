"""The sampling ideas by name: `--rollout NAME` picks one of SAMPLERS.

Each entry is a constructor `make_sampler(cfg, *, device, train_set)` that checks the idea's own
settings once, at start-up (and builds what it needs: a verifier backend, say), and returns

    sample(model, tokenizer, batch, step) -> rollout.Rollout

for a batch of B examples {"question", "answer", "solution"} and the 1-based step. The Rollout says
which tokens exist and which are trained (loss_mask); its `stats` are the idea's figures for the
train line, and its `reward_weight` (optional) scales each chain's reward. train.py, bench.py and
grad_agreement.py reach every idea through this dict alone: a new idea is one constructor here plus
its config fields.
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
    """Fail fast, before anything loads, on a misspelled --rollout."""
    if cfg.rollout not in SAMPLERS:
        close = difflib.get_close_matches(cfg.rollout, SAMPLERS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise config.UserError(f"unknown rollout {cfg.rollout!r}.{hint} Valid names: {', '.join(SAMPLERS)} "
                               f"(samplers.py)")


def make(cfg, *, device: str, train_set: list[dict]):
    """The sample function of cfg.rollout, its start-up checks done."""
    check(cfg)
    return SAMPLERS[cfg.rollout](cfg, device=device, train_set=train_set)
