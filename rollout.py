"""Rollout, the one structure every sampling idea hands to the loss, and plain sampling.

A sampling idea only decides which tokens exist and which of them the policy is trained on:

    input_ids      (N, L) long   full sequences, prompt included, left padded
    attention_mask (N, L) long   1 on real tokens, 0 on padding
    loss_mask      (N, L) float  1 only on tokens the policy sampled and is trained on
    group          (N,)   long   which prompt each chain belongs to (0..B-1)
    texts          N strings     what the reward functions read (the completion)
    info           N dicts       per-chain facts for rewards and logs ("truncated", "completion_len", ...)
    reward_weight  (N,) float or None   each chain's total reward is multiplied by it (None = 1)
    temperature    (N,) float or None   the temperature each chain was sampled at, at which the loss takes
                                 its log-probs (None = cfg.temperature for every chain; samplers set it)
    stats          dict          the idea's own figures for the step's train line (merged as they are)
    visual         N vision.Visual or None   a VL policy's images and videos of each chain's question
                                 (pixel_values (p, D), image_grid_thw (k, 3), and the same for videos),
                                 computed once per question and shared by its chains (vision.py); each
                                 forward pass encodes a question's images once, for all its chains
                                 (vision.model_inputs)

N = B prompts x G chains, chains of one prompt are adjacent. Plain sampling is one batched HF
`generate` call with every sampling setting passed explicitly. `kv_cache` picks its KV cache:
"dynamic" (HF's default, grows per token) or "static" (allocated once for prompt + completion, so
HF compiles the decode step with torch.compile and replays it as a CUDA graph on GPU, to cut the
per-token Python and kernel launches; same distribution: tests/test_rollout.py checks both agree).

Each sampling idea has a constructor `make_sampler(cfg, *, device, train_set)` that checks its own
settings once, at start-up, and returns `sample(model, tokenizer, batch, step) -> Rollout` for a
batch of examples {"question", "answer", "solution"}; samplers.py maps names to them. This file's
is plain sampling.

    python rollout.py     # samples a few chains from the untrained tiny model and prints the masks
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

import config
import fsdp
import llms
import vision


@dataclass
class Rollout:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    group: torch.Tensor
    texts: list[str]
    info: list[dict] = field(default_factory=list)
    reward_weight: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)
    visual: list | None = None  # vision.Visual per chain
    temperature: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def visual_of(self, rows) -> list[tuple] | None:
        """The visual inputs of the chains `rows` (a list or tensor of indices); None for text."""
        return visual_rows(self.visual, torch.as_tensor(rows).tolist())


def visual_rows(visual: list[tuple] | None, rows: list[int]) -> list[tuple] | None:
    """visual[i] for each i of rows (a chain's, or its prompt's: the same tensors, never copied); None
    for text (visual None)."""
    return None if visual is None else [visual[i] for i in rows]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, exactly as HF generate computes them while sampling."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def stops_of(model) -> list[tuple[int, ...]]:
    """Every token sequence that ends a completion: each EOS id of the model's generation config, and its
    `stop_sequences` (llms.stop_sequences: the plain format's blank line where a tokenizer writes it
    as two tokens)."""
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    return [(i,) for i in eos if i is not None] + [tuple(s) for s in getattr(gen, "stop_sequences", None) or []]


def as_stops(stops) -> list[tuple[int, ...]]:
    """Stops given as ids (one-token stops) or id sequences, all as tuples."""
    return [tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in stops]


def ends_at(ids: list[int], j: int, stops) -> bool:
    """Whether a stop (as_stops) ends at ids[j]."""
    return any(j + 1 >= len(s) and tuple(ids[j + 1 - len(s):j + 1]) == s for s in as_stops(stops))


def completion_mask(completions: torch.Tensor, stops) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (N, T) of tokens up to and including the end of the first stop (an EOS id, or a sequence
    of ids: as_stops), truncated (N,) bool: no stop at all)."""
    n, t = completions.shape
    is_end = torch.zeros_like(completions, dtype=torch.bool)
    for stop in as_stops(stops):
        if len(stop) <= t:
            match = torch.ones(n, t - len(stop) + 1, dtype=torch.bool, device=completions.device)
            for k, token in enumerate(stop):  # the stop's k-th id at each start position
                match &= completions[:, k:t - len(stop) + 1 + k] == token
            is_end[:, len(stop) - 1:] |= match  # marked where the stop ends
    # a token is kept while no stop ended strictly before it
    end_before = (is_end.long().cumsum(-1) - is_end.long()) > 0
    return (~end_before).long(), ~is_end.any(-1)


class StopSequences(StoppingCriteria):
    """Ends a row of `generate` once its new tokens end with one of `sequences` (multi-token stops, which
    generate's eos_token_id cannot express); start: the context width, where new tokens begin."""

    def __init__(self, sequences: list[tuple[int, ...]], start: int):
        self.sequences, self.start = sequences, start

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.start:]
        done = torch.zeros(len(new), dtype=torch.bool, device=input_ids.device)
        for seq in self.sequences:
            if new.shape[1] >= len(seq):
                done |= (new[:, -len(seq):] == torch.tensor(seq, device=new.device)).all(-1)
        return done


@torch.no_grad()
def prefilled_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """A KV cache of every column but the last of each distinct prompt row, run once per prompt and indexed
    out to its rows (the G chains of a group), for generate to start from; None when no two rows share
    a prompt. Sampling G chains then costs one prefill per prompt, not per chain."""
    unique, inverse = torch.unique(torch.cat([input_ids, attention_mask.to(input_ids.dtype)], 1), dim=0,
                                   return_inverse=True)
    if len(unique) == len(input_ids) or input_ids.shape[1] < 2:
        return None
    width = input_ids.shape[1]
    ids, mask = unique[:, :width - 1], unique[:, width:2 * width - 1].to(attention_mask.dtype)
    body, _ = llms.decoder_and_head(model)
    cache = fsdp.as_forward(  # --fsdp: the body runs inside the root's forward, as in logprobs.token_logps
        model, lambda: body(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True).cache)
    cache.batch_select_indices(inverse)
    return cache


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
             temperature: float, top_p: float = 1.0, kv_cache: str = "dynamic",
             min_new_tokens: int = 0, stopping_criteria=None, visual: list[tuple] | None = None) -> torch.Tensor:
    """New tokens (N, T) for already-tokenized, left-padded prompts; T <= max_new_tokens. `visual`: each
    row's images for a VL model (Rollout.visual).

    Every setting is explicit: no top-k, no repetition penalty, all EOS ids, temperature 0 = greedy.
    Rows that share a prompt (G chains) share its prefill (prefilled_cache); the same tokens as each
    row's own, up to float rounding.
    The model samples in eval mode with its KV cache, and is put back in train mode afterwards; the
    cache is freed when generate returns, before any backward pass. min_new_tokens > 0 forbids EOS
    before that many tokens (a benchmark forces full-length chains with it).
    `stopping_criteria` (transformers StoppingCriteria, with per-row state) may end rows early to save
    time, never to decide where a row ends: callers cut rows themselves (verifier.cut_turn).
    Out of GPU memory, the rows are sampled in halves (same settings; only the random draws differ;
    the halves run without the stopping criteria, whose per-row state does not split).
    """
    was_training = model.training
    model.eval()  # also turns gradient checkpointing off, so the KV cache works
    gen = model.generation_config
    config = GenerationConfig(
        do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None, top_k=0 if temperature > 0 else None,
        repetition_penalty=1.0, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, use_cache=True,
        cache_implementation="static" if kv_cache == "static" else None, suppress_tokens=vision.banned_ids(model),
        eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id)
    extra = vision.model_inputs(model, input_ids, visual) if visual is not None else {}
    multi = [s for s in stops_of(model) if len(s) > 1]  # callers cut rows at them (completion_mask, ends_at)
    criteria = (stopping_criteria or []) + ([StopSequences(multi, input_ids.shape[1])] if multi else [])
    synced = fsdp.before_generate(model)  # --fsdp: keeps the ranks' calls matched (fsdp.sampling)
    # the shared prefill is one more forward pass, which a per-layer-gathering rank's partner would not match
    share = visual is None and kv_cache == "dynamic" and not synced.get("synced_gpus")
    cache = prefilled_cache(model, input_ids, attention_mask) if share else None
    if cache is not None:  # (a static cache generate allocates itself)
        extra = {"cache": cache}
    try:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                              stopping_criteria=StoppingCriteriaList(criteria),
                              **synced, **extra)[:, input_ids.shape[1]:]
    except torch.OutOfMemoryError:  # sample the rows in two halves (recursively), down to one row
        if len(input_ids) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(input_ids) // 2
        print(f"out of memory sampling {len(input_ids)} sequences: sampling them in two halves")
        parts = [generate(model, input_ids[s], attention_mask[s], max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, kv_cache=kv_cache, min_new_tokens=min_new_tokens,
                          visual=visual_rows(visual, range(len(input_ids))[s]))
                 for s in (slice(0, half), slice(half, None))]
        width = max(p.shape[1] for p in parts)  # (n, T_i) -> (N, T): pad after the end, as generate does
        return torch.cat([F.pad(p, (0, width - p.shape[1]), value=gen.pad_token_id)
                          for p in parts])
    finally:
        model.train(was_training)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths as left-padded (ids (n, L), mask (n, L)) for generate."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def tokenize_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int, device) -> tuple[torch.Tensor, ...]:
    """Left-padded (ids, mask); a prompt longer than max_prompt_tokens keeps its end (the question)."""
    tokenizer.truncation_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                    max_length=max_prompt_tokens, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int, device, images: list[list] | None
                   ) -> tuple[torch.Tensor, torch.Tensor, list[tuple] | None]:
    """tokenize_prompts, and with images (one list per prompt, for a VL model) each prompt's visual
    inputs (vision.encode). A prompt with images is never cut: a cut could split an image's tokens."""
    if images is None:
        return *tokenize_prompts(tokenizer, prompts, max_prompt_tokens, device), None
    prompts, visual = vision.encode(tokenizer, prompts, images)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device), visual


def images_of(batch: list[dict]) -> list[list] | None:
    """Each example's images and videos (video.Video), one list per example, or None when no example has
    any. Every sampler passes them on as they are; vision.encode tells the kinds apart."""
    items = [ex.get("images", []) + ex.get("videos", []) for ex in batch]
    return items if any(items) else None


def assemble(tokenizer, prompt_ids, prompt_mask, completions, stops, group, info, visual=None,
             temperature: float | None = None) -> Rollout:
    """Join prompts (N, P) and completions (N, T) sampled at `temperature` (None: not sampled, as
    teacher_forced's) into a Rollout trained on the completions."""
    comp_mask, truncated = completion_mask(completions, stops)
    for d, t, n in zip(info, truncated.tolist(), comp_mask.sum(1).tolist()):
        d["truncated"], d["completion_len"] = t, n  # completion tokens, EOS included, trained or not
    # tokens after the first stop are padding; set them to pad so that the sequences are clean
    completions = torch.where(comp_mask.bool(), completions, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([prompt_ids, completions], 1),
        attention_mask=torch.cat([prompt_mask, comp_mask], 1),
        loss_mask=torch.cat([torch.zeros_like(prompt_mask), comp_mask], 1).float(),
        group=group, texts=texts, info=info, visual=visual,
        temperature=None if temperature is None else torch.full((len(group),), float(temperature)))


def sample(model, tokenizer, prompts: list[str], num_chains: int, *, max_prompt_tokens: int,
           max_new_tokens: int, temperature: float, top_p: float = 1.0, kv_cache: str = "dynamic",
           min_new_tokens: int = 0, images: list[list] | None = None) -> Rollout:
    """Plain GRPO sampling: B prompts x G chains in one batched generate call; `images`: each prompt's
    (images_of), for a VL model."""
    device = next(model.parameters()).device
    ids, mask, visual = encode_prompts(tokenizer, prompts, max_prompt_tokens, device, images)
    ids, mask = ids.repeat_interleave(num_chains, 0), mask.repeat_interleave(num_chains, 0)  # (N, P)
    group = torch.arange(len(prompts), device=device).repeat_interleave(num_chains)
    visual = visual_rows(visual, group.tolist())  # each chain: its prompt's images
    completions = generate(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,  # (N, T)
                           top_p=top_p, kv_cache=kv_cache, min_new_tokens=min_new_tokens, visual=visual)
    info = [{} for _ in range(len(group))]
    return assemble(tokenizer, ids, mask, completions, stops_of(model), group, info, visual, temperature)


def prompts_of(tokenizer, system_prompt: str, batch: list[dict]) -> list[str]:
    """The chat prompt of each example's question, ending where the assistant starts writing."""
    return [llms.chat_prompt(tokenizer, system_prompt, ex["question"]) for ex in batch]


def prompt_lengths(tokenizer, prompts: list[str]) -> list[int]:
    """Tokens of each prompt before any cut: tokenize_prompts cuts the start of those over max_prompt_tokens."""
    return [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def check_prompts_fit(tokenizer, cfg, examples: list[dict]) -> None:
    """A judge prompt starts with its instructions, which a prompt cut from the left would lose: every
    judge example must fit max_prompt_tokens. Math prompts may be cut (the question is at the end);
    the train line counts them (prompt_truncated_frac)."""
    if cfg.task == "math":
        return
    lengths = prompt_lengths(tokenizer, prompts_of(tokenizer, cfg.system_prompt, examples))
    over = [i for i, n in enumerate(lengths) if n > cfg.max_prompt_tokens]
    if over:
        raise config.UserError(f"{len(over)} of {len(examples)} {cfg.task} prompts are longer than "
                               f"max_prompt_tokens {cfg.max_prompt_tokens} (the longest: {max(lengths)} tokens), and "
                               f"a prompt is cut from its start, where the judge's instructions are: raise "
                               f"--max_prompt_tokens to {max(lengths)}, or drop the longest examples from the data")


def make_sampler(cfg, *, device: str, train_set: list[dict]):
    """Plain GRPO (the default idea): each question's G chains sampled independently, all in one call."""
    def sample_plain(model, tokenizer, batch: list[dict], step: int) -> Rollout:
        return sample(model, tokenizer, prompts_of(tokenizer, cfg.system_prompt, batch), cfg.num_chains,
                      max_prompt_tokens=cfg.max_prompt_tokens, max_new_tokens=cfg.max_completion_tokens,
                      temperature=cfg.temperature, top_p=cfg.top_p, kv_cache=cfg.kv_cache, images=images_of(batch))
    return sample_plain


def concat(parts: list[tuple[Rollout, list[int]]], group: torch.Tensor, pad_id: int) -> Rollout:
    """The chosen rows of several Rollouts as one, in order (GHPO mixes hinted and unhinted chains,
    dynamic sampling keeps the informative groups of several rounds); stats are the caller's to merge.

    The parts differ in width (a longer prompt, a longer completion), so each row is left padded as a
    whole to the widest (L,): its prompt and completion stay together and loss_mask still marks exactly
    its sampled tokens. Completions may then start at different columns; the loss never assumes otherwise.
    Parts may mix questions with and without images (a text-only round of dynamic sampling has visual
    None): each chain keeps its own visual inputs. Each chain keeps its sampling temperature; parts
    without one (temperature None: cfg.temperature) join only others without, since which temperature
    None stands for is the loss's to know, not concat's.
    """
    width = max(r.input_ids.shape[1] for r, _ in parts)

    def stack(name, value):  # (sum of rows, width)
        return torch.cat([F.pad(getattr(r, name)[list(rows)], (width - r.input_ids.shape[1], 0), value=value)
                          for r, rows in parts])
    weights = None  # a part without reward weights weighs 1
    if any(r.reward_weight is not None for r, _ in parts):
        weights = torch.cat([(r.reward_weight if r.reward_weight is not None else torch.ones(len(r)))[list(rows)]
                             for r, rows in parts])
    visual = None  # a text-only part (visual None) next to one with images: its chains have none
    if any(r.visual is not None for r, _ in parts):
        visual = [vision.no_images() if r.visual is None else r.visual[i] for r, rows in parts for i in rows]
    temperature = None
    if any(r.temperature is not None for r, _ in parts):
        if any(r.temperature is None for r, _ in parts):
            raise ValueError("concat: some parts carry their chains' sampling temperatures and some do not "
                             "(Rollout.temperature None): set it in every sampler that builds a part")
        temperature = torch.cat([r.temperature[list(rows)] for r, rows in parts])
    return Rollout(input_ids=stack("input_ids", pad_id), attention_mask=stack("attention_mask", 0),
                   loss_mask=stack("loss_mask", 0.0), group=group,
                   texts=[r.texts[i] for r, rows in parts for i in rows],
                   info=[r.info[i] for r, rows in parts for i in rows], reward_weight=weights, visual=visual,
                   temperature=temperature)


def teacher_forced(tokenizer, prompts: list[str], completions: list[str], max_prompt_tokens: int,
                   max_new_tokens: int, images: list[list] | None = None) -> Rollout:
    """A Rollout of given completions (each followed by EOS): the SFT warm start and tests use it."""
    ids, mask, visual = encode_prompts(tokenizer, prompts, max_prompt_tokens, "cpu", images)
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"][:max_new_tokens - 1] + [tokenizer.eos_token_id]
            for c in completions]
    width = max(len(r) for r in rows)
    completions_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    group = torch.arange(len(prompts))
    return assemble(tokenizer, ids, mask, completions_ids, [tokenizer.eos_token_id], group,
                    [{} for _ in prompts], visual)


if __name__ == "__main__":
    import builtin_tasks

    train, _ = builtin_tasks.arithmetic_task(500, 10, seed=0)
    m, tok = llms.load(llms.TINY, "cpu", tiny_corpus=[ex["question"] for ex in train])
    r = sample(m, tok, [llms.chat_prompt(tok, "", train[0]["question"])], num_chains=2,
               max_prompt_tokens=128, max_new_tokens=12, temperature=1.0)
    print("input_ids", tuple(r.input_ids.shape), "\nloss_mask\n", r.loss_mask.long(), "\ntexts", r.texts, r.info)
