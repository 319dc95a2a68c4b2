"""Verifier turns (Guided-GRPO, arXiv 2602.04290): a verifier corrects the policy step by step.

Each of the B x G chains is a conversation, and each turn all live conversations move together:

1. policy    one batched `rollout.generate` call: every live conversation writes one turn of at most
             `turn_tokens` new tokens, ending at EOS or at the end of a step (`step_end`: the first
             newline, or sentence end, after some text, <tag> markup such as "<reasoning>" not
             counted; "eos" makes each turn a whole attempt).
2. verifier  one request per conversation, all at once (`backend(jobs, ...)`, see verifier_backends.py):
             the problem, the reference answer and the policy's turns so far. It replies with a short
             correction, or `###STOP###`, and may add a line `[SCORE] hallucination_detect=0|1`.
3. next      a correction becomes a user message and the policy writes the next turn; an empty or
             failed reply lets the policy go on with its next step unprompted. A conversation ends on
             STOP when the policy's work holds a final answer, on STOP without one after the `nudge`
             message and one more turn (written to EOS), after `max_turns` turns, when the policy's
             tokens reach max_completion_tokens, or when the policy ends a turn with EOS and the
             verifier has nothing to add.

The Rollout holds the whole conversation (prompt, turns, inserted messages). loss_mask is 1 on the
policy's own tokens only: all its turns (`train_on` "all") or its last turn ("last_turn", the paper's
choice). Verifier text, nudges and chat-template glue are 0. `texts` (what the rewards read) is the
policy's turns joined; info["verifier_hallucination_score"] is the mean [SCORE] of the conversation
(0.5 when it got none) and info["verifier_scored"] the number of [SCORE] lines, which the
`verifier_score` reward reads: it pays 0 to a conversation nobody scored.

Choices of ours, not the paper's: the verifier prompt (DEFAULT_PROMPT, or yours via `verifier_prompt`);
a verifier call that fails (after the backend's retries) lets the policy continue without feedback;
an empty reply means "right so far, go on"; the final turn after a nudge is extra to max_turns.

    python verifier.py                                   # a few conversations with the rules verifier
    python verifier.py serve --model tiny --port 8000    # an OpenAI-compatible server (verifier_backends.py)
"""
import functools
import re
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria

import config
import guidance
import llms
import rewards
import rollout
import verifier_backends
import vision
from verifier_backends import STOP, Job

STEP_ENDS = {"newline": ("\n",), "sentence": ("\n", ".", "!", "?"), "eos": ()}


# ----------------------------------------------------------------------------------------------
# Replies: STOP, corrections, [SCORE] lines; final answers


# Instruct models answer in markdown: emphasis, code spans, bullets, "Score:" lines, a colon or
# spaces around "=", trailing (also full-width) punctuation. Each line is read without its markdown;
# a single "*" is emphasis only when it touches text on its inner side and none on its outer side
# (`*so*`), so that "3 * 4" and "3*4" keep their multiplication.
_BULLET_RE = re.compile(r"^\s*(?:[-+*\u2022>]|\d+[.)]|#{1,6}(?![#\s]*STOP))\s+")  # "### STOP ###" is no heading
_EMPHASIS_RE = re.compile(r"\*\*|__(?=\S)|(?<=\S)__|(?<![\w*])\*(?=[^\s*])|(?<=[^\s*])\*(?![\w*])|`")
_DETECT = r"hallucination[_ ]detect\s*[=:\uff1a\uff1d]"  # the key and its "=" (or a colon), full-width too
_SCORE_MARK_RE = re.compile(r"\[\s*score\s*\]|^\s*score\s*[:\uff1a]|^(?=\s*" + _DETECT + ")", re.IGNORECASE)
_SCORE_VALUE_RE = re.compile(r"[\s:\uff1a-]*" + _DETECT + r"\s*([01])[\s.,;!\u3002\uff0c\uff1b\uff01]*", re.IGNORECASE)
_STOP_RE = re.compile(r"#{3}\s*" + STOP.strip("#") + r"\s*#{3}", re.IGNORECASE)  # ###STOP###, ### STOP ###
_WORD_RE = re.compile(r"[^\W\d_]")  # a letter of any script: what makes a line a correction


def plain(line: str) -> str:
    """A line without its markdown: list and heading markers, bold, italics, code-span backticks."""
    return _EMPHASIS_RE.sub("", _BULLET_RE.sub("", line))


def parse_reply(reply: str) -> tuple[str, bool, int | None]:
    """(feedback for the policy, stop, score). A score line (`[SCORE] hallucination_detect=0`, also
    `Score: ...` or the bare `hallucination_detect = 1.`, in any markdown) runs from its marker to the
    end of its line and is cut out of the feedback whether it parses or not; the last well-formed one
    gives the score (0 or 1). STOP counts outside score lines only. What is left is feedback only on
    lines that hold a word: a reply of markers and punctuation corrects nothing."""
    score, stop, kept = None, False, []
    for line in reply.splitlines():
        text = plain(line)
        if m := _SCORE_MARK_RE.search(text):
            if value := _SCORE_VALUE_RE.fullmatch(text[m.end():]):
                score = int(value.group(1))
            text = text[:m.start()]
        stop = stop or bool(_STOP_RE.search(text))
        text = _STOP_RE.sub("", text).strip()
        if _WORD_RE.search(text):
            kept.append(text)
    return "\n".join(kept), stop, score


# ----------------------------------------------------------------------------------------------
# Policy turns: where a step ends, and the chat-template tokens around inserted messages


_TAG_RE = re.compile(r"</?[A-Za-z][\w-]*>")  # <reasoning>, </answer>, <think>: markup around steps


def is_step(text: str) -> bool:
    """Whether a turn's text so far holds a step: something besides whitespace and <tag> markup, so that
    "<reasoning>" alone on a line does not end a turn (and cost a verifier call)."""
    return bool(_TAG_RE.sub("", text).strip())


def cut_turn(ids: list[int], limit: int, eos, ends, decode) -> tuple[list[int], bool]:
    """(the turn: ids up to a stop (EOS, or a multi-token stop: rollout.as_stops), the first step end after
    some text, or `limit`; whether a stop ended it).

    decode(ids) -> text; a step end counts once the turn's text up to it is_step. Decoding the turn so
    far (not token by token) also reads tags split over tokens ("<", "reason", "ing", ">\n")."""
    for j, t in enumerate(ids[:limit]):
        if rollout.ends_at(ids, j, eos):
            return ids[:j + 1], True
        if t in ends and is_step(decode(ids[:j + 1])):
            return ids[:j + 1], False
    return ids[:limit], False


class StepEnd(StoppingCriteria):
    """Stops a row of `generate` where cut_turn would cut it, so a turn costs only its own tokens.

    decode: as for cut_turn; start: the context width (new tokens begin there); active (n,) bool: rows
    that stop at step ends. One generate call per object: a row is decoded only when a new step end
    appears in it, and once it holds a step it stays stopped.
    """

    def __init__(self, ends, decode, start: int, active: torch.Tensor):
        self.ends = torch.tensor(sorted(ends), dtype=torch.long, device=active.device)
        self.decode, self.start, self.active = decode, start, active
        self.checked = [-1] * len(active)  # per row: the last step end already decoded (-1: none)
        self.stopped = [False] * len(active)

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.start:]  # (n, t)
        at_end = torch.isin(new, self.ends) & self.active[:, None]  # (n, t)
        last = torch.where(at_end.any(-1), new.shape[1] - 1 - at_end.flip(-1).long().argmax(-1), -1).tolist()
        for r, j in enumerate(last):
            if j > self.checked[r] and not self.stopped[r]:  # a new step end: is the row's text a step now?
                self.checked[r] = j
                self.stopped[r] = is_step(self.decode(new[r, :j + 1].tolist()))
        return torch.tensor(self.stopped, device=input_ids.device)


def message_ids(tokenizer, text: str) -> list[int]:
    """Tokens that close the assistant's message, add `text` as a user message and open the next
    assistant message, as the chat template writes them (for Qwen: <|im_end|>, user turn, assistant)."""
    for special in tokenizer.all_special_tokens:  # a reply must not inject template tokens
        text = text.replace(special, "")
    mark = "\u2063MARK\u2063"  # invisible separator: never in a real reply
    chat = llms.render(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark},
                                        {"role": "user", "content": text}])
    return tokenizer(chat.split(mark, 1)[1], add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------
# The turn loop


@dataclass
class Conversation:
    group: int                                    # which prompt
    seq: list = field(default_factory=list)       # everything after the prompt: turns and inserted messages
    turn_of: list = field(default_factory=list)   # per token of seq: its policy turn 0, 1, ..., or -1 if inserted
    turns: list = field(default_factory=list)     # the policy's turns, as token lists
    replies: list = field(default_factory=list)   # the verifier's raw replies ("" for a failed call)
    scores: list = field(default_factory=list)    # well-formed [SCORE] values
    failed: int = 0                               # verifier calls that failed after retries
    latency: float = 0.0                          # seconds spent waiting on the verifier
    corrections: int = 0                          # replies added as user messages
    eos: bool = False                             # the latest turn ended with EOS
    stopped: bool = False                         # the verifier said STOP
    nudged: bool = False                          # the next turn is the final answer after a nudge
    truncated: bool = False                       # ended by max_turns or the token budget
    done: bool = False

    def add(self, ids: list[int], turn: int) -> None:
        self.seq += ids
        self.turn_of += [turn] * len(ids)

    def insert(self, ids: list[int]) -> None:
        """A user message: after a turn that ended with EOS, the template's own end token is not repeated."""
        self.add(ids[1:] if self.eos and ids[:1] == self.seq[-1:] else ids, -1)

    @property
    def policy_tokens(self) -> int:
        return sum(len(t) for t in self.turns)


def run_turns(model, tokenizer, prompts: list[str], questions: list[str], answers: list[str], num_chains: int, *,
           backend, max_prompt_tokens: int, max_completion_tokens: int, temperature: float, top_p: float,
           turn_tokens: int, max_turns: int, step_end: str, train_on: str, nudge: str,
           kv_cache: str = "dynamic", images: list[list] | None = None) -> rollout.Rollout:
    """B prompts x G conversations with a verifier (module docstring); one generate call per turn.

    backend(jobs, model, tokenizer) -> one reply string per Job, None where the call failed
    (verifier_backends.make). The policy's tokens over all turns stay within max_completion_tokens.
    step_end: a key of STEP_ENDS; train_on: "all" or "last_turn". images: each prompt's images (a VL
    policy), which the policy sees every turn and the verifier gets with each job.
    """
    device = next(model.parameters()).device
    eos = rollout.stops_of(model)
    ends = guidance.boundary_ids(tokenizer, STEP_ENDS[step_end]) if STEP_ENDS[step_end] else frozenset()
    decode, pad = functools.partial(tokenizer.decode, skip_special_tokens=True), tokenizer.pad_token_id
    prompt_ids, prompt_mask, visual = rollout.encode_prompts(tokenizer, prompts, max_prompt_tokens, device, images)
    prompt_rows = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)]  # B lists, unpadded
    convs = [Conversation(b) for b in range(len(prompts)) for _ in range(num_chains)]

    while live := [c for c in convs if not c.done]:
        # 1. the policy: one turn per live conversation, all in one generate call; a final turn after
        #    a nudge runs to EOS, every other turn also stops at its step end
        room = [min(turn_tokens, max_completion_tokens - c.policy_tokens) for c in live]
        ids, mask = rollout.left_pad([prompt_rows[c.group] + c.seq for c in live], pad, device)  # (n, ctx)
        steps = torch.tensor([not c.nudged for c in live], device=device)
        stop = [StepEnd(ends, decode, ids.shape[1], steps)] if ends else None
        out = rollout.generate(model, ids, mask, max_new_tokens=max(room), temperature=temperature, top_p=top_p,
                               kv_cache=kv_cache, stopping_criteria=stop,
                               visual=rollout.visual_rows(visual, [c.group for c in live])).tolist()
        for c, row, n in zip(live, out, room):
            turn, c.eos = cut_turn(row, n, eos, frozenset() if c.nudged else ends, decode)
            c.add(turn, len(c.turns))
            c.turns.append(turn)
            if c.nudged:  # the final answer after a nudge ends the conversation
                c.done, c.truncated = True, not c.eos

        # 2. the verifier: one job per conversation that just wrote a step, all sent at once
        asking = [c for c in live if not c.done]
        jobs = [Job(questions[c.group], answers[c.group], tokenizer.batch_decode(c.turns, skip_special_tokens=True),
                    vision.images_only(images[c.group]) if images else []) for c in asking]  # no videos
        t0 = time.perf_counter()
        replies = backend(jobs, model, tokenizer) if jobs else []
        waited = time.perf_counter() - t0

        # 3. what each reply means for its conversation
        for c, job, reply in zip(asking, jobs, replies, strict=True):
            c.latency += waited
            c.failed += reply is None
            c.replies.append(reply or "")
            feedback, stopped, score = parse_reply(reply or "")
            if score is not None:
                c.scores.append(score)
            no_room = c.policy_tokens >= max_completion_tokens
            if stopped:
                c.stopped = True
                if verifier_backends.answered(job.steps) or no_room:
                    c.done = True
                else:  # STOP without a final answer: ask for it, and give one more turn
                    c.nudged = True
                    c.insert(message_ids(tokenizer, nudge))
            elif len(c.turns) >= max_turns or no_room:
                c.done, c.truncated = True, not c.eos
            elif feedback:
                c.corrections += 1
                c.insert(message_ids(tokenizer, feedback))
            elif c.eos:  # the policy finished and the verifier had nothing to add
                c.done = True
            # else: no feedback (or a failed call): the policy goes on with its next step

    # the Rollout: whole conversations, left padded (N, L); trained only on the policy's own tokens
    ids, attn = rollout.left_pad([prompt_rows[c.group] + c.seq for c in convs], pad, device)
    loss_mask = torch.zeros(ids.shape, dtype=torch.float, device=device)
    info, texts = [], []
    for i, c in enumerate(convs):
        last = len(c.turns) - 1
        trained = [t >= 0 and (train_on == "all" or t == last) for t in c.turn_of]
        loss_mask[i, ids.shape[1] - len(c.seq):] = torch.tensor(trained, dtype=torch.float)
        texts.append(tokenizer.decode([t for turn in c.turns for t in turn], skip_special_tokens=True))
        info.append({"turns": len(c.turns), "stopped": c.stopped, "nudged": c.nudged,
                     "final_answer": rewards.has_final_answer(texts[-1]), "truncated": c.truncated,
                     "completion_len": c.policy_tokens, "verifier_calls": len(c.replies),
                     "verifier_failed": c.failed, "verifier_corrections": c.corrections,
                     "verifier_latency_s": c.latency,
                     "verifier_scored": len(c.scores),  # [SCORE] lines; the verifier_score reward pays 0 without
                     "verifier_hallucination_score": sum(c.scores) / len(c.scores) if c.scores else 0.5,
                     "verifier_replies": c.replies, "conversation": tokenizer.decode(c.seq)})
    group = torch.tensor([c.group for c in convs], dtype=torch.long, device=device)
    return rollout.Rollout(input_ids=ids, attention_mask=attn, loss_mask=loss_mask, group=group,
                           texts=texts, info=info, visual=rollout.visual_rows(visual, group.tolist()),
                           temperature=torch.full((len(convs),), float(temperature)))


def summary(info: list[dict]) -> dict:
    """The step's figures for metrics.jsonl: means over conversations, latency per verifier round."""
    n, calls = max(1, len(info)), sum(d["verifier_calls"] for d in info)
    scored = [d for d in info if d["verifier_scored"]]
    return {"verifier/turns": sum(d["turns"] for d in info) / n,
            "verifier/stop_rate": sum(d["stopped"] for d in info) / n,
            "verifier/final_answer_frac": sum(d["final_answer"] for d in info) / n,
            "verifier/corrections": sum(d["verifier_corrections"] for d in info) / n,
            "verifier/latency_s": sum(d["verifier_latency_s"] for d in info) / max(1, calls),
            "verifier/failed_calls": sum(d["verifier_failed"] for d in info),
            "verifier/scored_frac": len(scored) / n,  # the hallucination score is over the scored ones
            "verifier/hallucination_score": (sum(d["verifier_hallucination_score"] for d in scored)
                                             / max(1, len(scored)))}


def make_sampler(cfg, *, device: str, train_set: list[dict]):
    """`--sampler verifier`: checks the verifier_* settings and builds the backend once (an http server
    that does not answer fails the run here, before the policy is loaded), then samples conversations."""
    for key in ("verifier_turn_tokens", "verifier_max_turns", "verifier_concurrency", "verifier_max_tokens"):
        if getattr(cfg, key) < 1:
            raise config.UserError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.verifier_retries < 0 or cfg.verifier_timeout_s <= 0 or cfg.verifier_turn_timeout_s <= 0:
        raise config.UserError(f"verifier_retries must be >= 0, verifier_timeout_s and verifier_turn_timeout_s "
                               f"> 0, got {cfg.verifier_retries}, {cfg.verifier_timeout_s} and "
                               f"{cfg.verifier_turn_timeout_s}")
    backend = verifier_backends.make(cfg, device)

    def sample_verifier(model, tokenizer, batch: list[dict], step: int) -> rollout.Rollout:
        r = run_turns(model, tokenizer, rollout.prompts_of(tokenizer, cfg.system_prompt, batch),
                   [ex["question"] for ex in batch], [ex["answer"] for ex in batch], cfg.num_chains,
                   backend=backend, max_prompt_tokens=cfg.max_prompt_tokens,
                   max_completion_tokens=cfg.max_completion_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                   turn_tokens=cfg.verifier_turn_tokens, max_turns=cfg.verifier_max_turns,
                   step_end=cfg.verifier_step_end, train_on=cfg.verifier_train_on, nudge=cfg.verifier_nudge,
                   kv_cache=cfg.kv_cache, images=rollout.images_of(batch))
        r.stats = summary(r.info)  # verifier/turns, stop_rate, latency_s, failed_calls, ...
        return r
    return sample_verifier


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        verifier_backends.serve_main(sys.argv[2:])
        sys.exit()
    import config
    import builtin_tasks
    import data
    import llms
    import sft

    examples, _ = builtin_tasks.arithmetic_task(2000, 10, seed=0)
    m, tok = llms.load(llms.TINY, "cpu", tiny_corpus=[ex["question"] + "\n" + data.target_text(ex) for ex in examples])
    print("a short warm start, so that the tiny model writes equations ...")
    cfg = config.Config(system_prompt="", sft_steps=60, sft_batch_size=32, sft_learning_rate=3e-3,
                        max_completion_tokens=64, max_prompt_tokens=128, num_chains=2, verifier_turn_tokens=24,
                        verifier_max_turns=6)
    sft.warm_start(m, tok, examples, cfg)
    torch.manual_seed(0)
    batch = examples[:2]
    r = make_sampler(cfg, device="cpu", train_set=examples)(m, tok, batch, 1)
    for i, d in enumerate(r.info):
        print(f"--- chain {i} (answer {batch[r.group[i]]['answer']}): {d['turns']} turns, stopped {d['stopped']}, "
              f"hallucination score {d['verifier_hallucination_score']:.2f}\n{d['conversation']}")
    print(r.stats)
