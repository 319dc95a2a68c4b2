"""Verifier backends for verifier turns (verifier.py), and a small OpenAI-compatible server.

A backend is called once per turn with the jobs of every live conversation:

    backend(jobs: list[Job], policy, policy_tokenizer) -> list[str | None]

one reply per job, None where the call failed (counted in verifier/failed_calls; the policy then goes
on without feedback). Three kinds (`verifier_backend`):

- rules  checks the arithmetic of the latest step (whole expressions "2 + 3 * 4 = 14", chains, GSM8K's
         <<48/2=24>> notes) and the final answer; no model. It makes verifier turns cheap and testable
         on the built-in task.
- hf     a causal LM on this machine (`verifier_model`: hub name, local folder, or "policy": the
         policy itself, with its LoRA adapter switched off if it has one), optionally 8-bit; all jobs
         of a turn in one batched generate call.
- http   an OpenAI-compatible server (vLLM, SGLang, a hosted API, or `python verifier.py serve`):
         the `openai` client with its timeout and retries (exponential backoff), `concurrency`
         requests in flight, and a deadline per turn (`verifier_turn_timeout_s`: replies not in by
         then count as failed calls). The API key is read from the environment variable named by
         `verifier_api_key_env`; it is never logged. An unreachable server is an error at start-up.

    python verifier.py serve --model tiny --port 8000     # or a hub name / local folder; --port 0 picks one
"""
import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import sys
import threading
import time
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

import config
import llms
import rewards
import rollout

STOP = "###STOP###"
DEFAULT_PROMPT = """You are a careful math teacher. A student solves the problem below one step at a time, \
and you check each step as it is written.

Problem:
{question}

Reference final answer (never reveal it): {answer}

Judge only the student's latest step.
- If it contains a mistake, reply with one or two short sentences that name the mistake and give the \
correct value or a hint. Do not solve the rest of the problem.
- If every step is correct and the student has stated the final answer, reply with exactly {stop}
- If the latest step is correct but the solution is not finished, reply with nothing but the score line.
End every reply with one line: [SCORE] hallucination_detect=1 if the latest step has a mistake or an \
unsupported claim, else [SCORE] hallucination_detect=0."""


class Job(NamedTuple):
    """What a verifier judges: one conversation's problem, reference answer and policy turns so far."""
    question: str
    answer: str
    steps: list[str]

# ----------------------------------------------------------------------------------------------
# rules: a programmatic verifier for arithmetic written out in the work (the built-in task, GSM8K)
#
# A step is cut into runs of numbers, operators (+ - * / x × ÷), parentheses and "=": a word, a newline
# or other punctuation ends a run, so "6 boxes = 12" holds no equation. Each "=" of a run checks the
# expression on its left (everything since the run's start or the previous "=") against what follows it
# (up to the next "=" or the run's end): "3 * 4 = 12 + 1 = 13" checks 3 * 4 = 12 and 12 + 1 = 13, a
# running total. Values are exact fractions with the usual precedence (never Python's eval). A number
# written with d decimals is right when it is the true value rounded to d decimals ("1/3 = 0.33",
# "10 / 3 = 3"; a truncated "2/3 = 0.66" is wrong). Whatever the checker cannot read for sure is not
# checked: it must never flag a true equation ("2,5 * 2 = 5", "50% * 4 = 2", "2^3 + 1 = 9" and
# "3 / 4 = 75%" are all skipped).

_MAX_CHARS = 10_000  # of the latest step: the check is linear, this only bounds one reply's work
_MAX_TOKENS = 64     # of one side of an "=": a longer run is no equation a student writes
_MAX_NUMBER = 32     # characters of a number: a longer one is no number (and values stay small)
# markdown and LaTeX that models wrap arithmetic in: bold and code spans go, LaTeX operators become ours
_MARKUP = {"**": "", "__": "", "`": "", "\\times": "×", "\\cdot": "×", "\\div": "÷", "\\$": "$",
           "\\(": " ", "\\)": " ", "\\[": " ", "\\]": " "}
_MARKUP_RE = re.compile("|".join(map(re.escape, _MARKUP)))
_BULLET_RE = re.compile(r"^[ \t]*[-*+][ \t]+", re.MULTILINE)  # "- 3 + 4 = 7": a list marker, no minus
_NOTE_RE = re.compile(r"<<([^<>=\n]{1,200})=([^<>=\n]{1,50})>>")  # GSM8K's calculator notes <<48/2=24>>
# one pass, one token per match, no nested quantifiers: a number ($ and 1,234 groups allowed), an
# operator (an "x" only outside words), a parenthesis, "=" (also "=="), spaces, or any other character
_TOKEN_RE = re.compile(r"(?P<num>\$?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?)"
                       r"|(?P<op>[-+*/×÷\u2212]|(?<![^\W\d_])x(?![^\W\d_]))|(?P<paren>[()])|(?P<eq>=+)"
                       r"|(?P<space>[^\S\n]+)|(?P<other>.)", re.DOTALL)
_OPS = {"+": "+", "-": "-", "\u2212": "-", "*": "*", "x": "*", "×": "*", "/": "/", "÷": "/"}  # as written: ours
_OPERATORS = ("+", "-", "*", "/")
# what may touch an equation's ends: anything else (a letter, %, ^, \, "10:30", "2,5") binds to its number
_SAFE_BEFORE, _SAFE_AFTER = set("([{:;\"'“‘<>#=)"), set(")]}.,;:!?\"'”’<>$")
_PERCENT_RE = re.compile(r"[ \t]*(?:[%\u2030]|per ?cent\b)", re.IGNORECASE)  # "3 / 4 = 75 %"


class _Tok(NamedTuple):
    kind: str                 # "num", "+", "-", "*", "/", "(", ")", "=", or "break" (a word, a newline, ...)
    text: str                 # as written
    start: int                # where in the (cleaned) step
    end: int
    value: Fraction | None = None


class _NotExpression(Exception):
    """Tokens that are no whole expression, or divide by zero: that equation is not checked."""


def _tokens(text: str) -> list[_Tok]:
    toks = []
    for m in _TOKEN_RE.finditer(text):
        kind, s = m.lastgroup, m.group()
        if kind == "num" and len(s) <= _MAX_NUMBER:
            toks.append(_Tok("num", s, m.start(), m.end(), Fraction(s.lstrip("$").replace(",", ""))))
        elif kind != "space":
            kind = _OPS[s] if kind == "op" else s if kind == "paren" else "=" if kind == "eq" else "break"
            toks.append(_Tok(kind, s, m.start(), m.end()))
    return toks


def _value(toks: list[_Tok]) -> Fraction:
    """The exact value of a whole expression: + - below * /, unary minus, parentheses (recursive descent,
    one pass; the depth is at most _MAX_TOKENS). Raises _NotExpression."""
    pos = 0

    def peek() -> str | None:
        return toks[pos].kind if pos < len(toks) else None

    def factor() -> Fraction:
        nonlocal pos
        kind = peek()
        pos += 1
        if kind == "num":
            return toks[pos - 1].value
        if kind == "-":
            return -factor()
        if kind == "(":
            inner = expression()
            if peek() != ")":
                raise _NotExpression
            pos += 1
            return inner
        raise _NotExpression

    def term() -> Fraction:
        nonlocal pos
        v = factor()
        while (op := peek()) in ("*", "/"):
            pos += 1
            w = factor()
            if op == "/" and w == 0:
                raise _NotExpression
            v = v * w if op == "*" else v / w
        return v

    def expression() -> Fraction:
        nonlocal pos
        v = term()
        while (op := peek()) in ("+", "-"):
            pos += 1
            v = v + term() if op == "+" else v - term()
        return v

    v = expression()
    if pos != len(toks):
        raise _NotExpression
    return v


def _binary(toks: list[_Tok]) -> bool:
    """Whether the tokens hold an operator between two operands (not just a sign)."""
    return any(t.kind in _OPERATORS and j > 0 and toks[j - 1].kind in ("num", ")") for j, t in enumerate(toks))


def _written(toks: list[_Tok]) -> str:
    """The tokens as the student wrote them, spaced: "(2 + 3) x 4", "-3"."""
    out = ""
    for j, t in enumerate(toks):
        hug = j == 0 or toks[j - 1].kind == "(" or t.kind == ")" or (
            toks[j - 1].kind == "-" and (j == 1 or toks[j - 2].kind not in ("num", ")")))  # after a sign
        out += t.text if hug else " " + t.text
    return out


def _show(x: Fraction) -> str:
    """Rounded to 6 decimals, in integers only (no float overflow): 1240, 2.5, 0.333333, -3."""
    n = round(x * 10 ** 6)
    whole, part = divmod(abs(n), 10 ** 6)
    return "-" * (n < 0) + f"{whole}.{part:06d}".rstrip("0").rstrip(".")


def _decimals(tok: _Tok) -> int:
    return len(tok.text.partition(".")[2])


def _close(value: Fraction, claim: Fraction, decimals: int | None) -> bool:
    """Right when equal, or (decimals given) when claim is value rounded to that many decimals."""
    if decimals is None:
        return value == claim
    return abs(value - claim) * 2 * 10 ** decimals <= 1


def _left_side(seg: list[_Tok], text: str, opens_run: bool) -> list[_Tok] | None:
    """What an "=" checks on its left: seg (the tokens since the run's start or the previous "=") after its
    last unmatched parenthesis ("(3 + 4 = 7)", "1) 3 + 4 = 7"); None when that cannot be read for sure."""
    stack, cut = [], 0
    for j, t in enumerate(seg):
        if t.kind == "(":
            stack.append(j)
        elif t.kind == ")" and stack:
            stack.pop()
        elif t.kind == ")":
            cut = j + 1
    seg = seg[stack[-1] + 1 if stack else cut:]
    if not seg or len(seg) > _MAX_TOKENS or (opens_run and not _binary(seg)):
        return None  # an "=" with a bare number first on its left ("Step 1 = 7") is a label, not arithmetic
    if seg[0].start > 0 and not text[seg[0].start - 1].isspace():
        before = text[seg[0].start - 1]
        between_digits = before in ".,:" and seg[0].start > 1 and text[seg[0].start - 2].isdigit()
        if before not in _SAFE_BEFORE or between_digits:  # "a2 + 1", "2^3 + 1", "10:30 + 2", "2,5 * 2"
            return None
    if seg[0].kind == "-" and (len(seg) < 2 or seg[0].end != seg[1].start):  # a sign touches its number
        return None
    return seg


def _right_side(seg: list[_Tok], text: str, ends_run: bool) -> list[_Tok] | None:
    """What an "=" claims: seg (up to the next "=" or the run's end) before its first unmatched parenthesis;
    None when that cannot be read for sure ("= 75%", "= 12:30", "= 3x")."""
    stack, cut = [], len(seg)
    for j, t in enumerate(seg):
        if t.kind == "(":
            stack.append(j)
        elif t.kind == ")" and stack:
            stack.pop()
        elif t.kind == ")":
            cut = j
            break
    if stack and cut == len(seg):
        cut = stack[0]
    whole, seg = cut == len(seg), seg[:cut]
    if not seg or len(seg) > _MAX_TOKENS:
        return None
    if ends_run and whole:  # what follows the run must not bind to its last number
        end = seg[-1].end
        if _PERCENT_RE.match(text, end):
            return None
        if end < len(text) and not text[end].isspace():
            before_digit = text[end] in ".,:" and end + 1 < len(text) and text[end + 1].isdigit()
            if text[end] not in _SAFE_AFTER or before_digit:
                return None
    return seg


def _check(left: list[_Tok], right: list[_Tok]) -> tuple[bool, str]:
    """(checked, the message if wrong): left's value against right, as a number (with rounding), as an
    expression, or as a running total whose first number is left's value ("3 * 4 = 12 + 1")."""
    try:
        value, claim = _value(left), _value(right)
    except _NotExpression:
        return False, ""
    sign = right[0].kind == "-" and len(right) == 2
    if [t.kind for t in right[sign:]] == ["num"]:
        right_ok = _close(value, claim, _decimals(right[-1]))
    else:
        right_ok = _close(value, claim, None)
        if right[0].kind == "num" and len(right) > 1 and right[1].kind in _OPERATORS:
            right_ok = right_ok or _close(value, right[0].value, _decimals(right[0]))
    return True, "" if right_ok else f"{_written(left)} = {_show(value)}, not {_written(right)}"


def equation_errors(step: str) -> tuple[list[str], bool]:
    """(one "<expr> = <value>, not <claimed>" per wrong equation of the step, whether it had any equation
    that could be checked). GSM8K's calculator notes <<48/2=24>> are checked as equations of their own;
    the text around them is read without them ("48/2 = <<48/2=24>>24" also checks 48/2 = 24)."""
    text = _BULLET_RE.sub("", _MARKUP_RE.sub(lambda m: _MARKUP[m.group()], step[:_MAX_CHARS]))
    notes = [f"{a}={b}" for a, b in _NOTE_RE.findall(text)]
    text = "\n".join([_NOTE_RE.sub("", text)] + notes)
    toks = _tokens(text) + [_Tok("break", "", len(text), len(text))]
    wrong, checked, run = [], False, []
    for tok in toks:
        if tok.kind != "break":
            run.append(tok)
            continue
        segs = [[]]  # the run cut at its "=" signs
        for t in run:
            if t.kind == "=":
                segs.append([])
            else:
                segs[-1].append(t)
        for i in range(1, len(segs)):
            left = _left_side(segs[i - 1], text, opens_run=i == 1)
            right = _right_side(segs[i], text, ends_run=i == len(segs) - 1)
            if left is not None and right is not None:
                ok, message = _check(left, right)
                checked = checked or ok
                if message and message not in wrong:  # a note and its text make the same error once
                    wrong.append(message)
        run = []
    return wrong, checked


def rules_reply(answer: str, steps: list[str]) -> str:
    """Check every equation of the latest step (equation_errors); then, once the work states a final
    answer, that answer.

    A wrong equation gets its correct value; a wrong final answer is flagged (the reference is not
    given away); right work with a final answer gets STOP; a right step without one gets only a
    score (the policy goes on unprompted); a step without any equation gets an empty reply.
    """
    latest, work = (steps[-1] if steps else ""), "".join(steps)
    wrong, checked = equation_errors(latest)
    if wrong:  # short replies: every inserted token lengthens every later turn and the trained sequence
        return "; ".join(wrong) + ".\n[SCORE] hallucination_detect=1"
    if rewards.has_final_answer(work):
        if rewards.is_correct(work, answer):
            return f"{STOP}\n[SCORE] hallucination_detect=0"
        return "Your final answer is wrong.\n[SCORE] hallucination_detect=1"
    return "[SCORE] hallucination_detect=0" if checked else ""


class RulesVerifier:
    def __call__(self, jobs, policy=None, policy_tokenizer=None) -> list[str]:
        return [rules_reply(job.answer, job.steps) for job in jobs]


# ----------------------------------------------------------------------------------------------
# What a model verifier reads: our system prompt template, then the policy's steps


def load_prompt(prompt: str) -> str:
    """The template: DEFAULT_PROMPT for "", a file's text for an existing path, else `prompt`."""
    if os.path.isfile(prompt):
        with open(prompt) as f:
            prompt = f.read()
    prompt = prompt or DEFAULT_PROMPT
    try:
        prompt.format(question="", answer="", stop="")
    except (KeyError, IndexError, ValueError) as e:
        raise config.UserError(f"verifier_prompt may use the fields {{question}}, {{answer}} and {{stop}} only "
                               f"(write a literal brace as {{{{ or }}}}); it has {type(e).__name__}: {e}") from None
    return prompt


def messages(template: str, job) -> list[dict]:
    steps = "\n".join(f"Step {k}: {s.strip()}" for k, s in enumerate(job.steps, 1))
    return [{"role": "system", "content": template.format(question=job.question, answer=job.answer,
                                                          stop=STOP)},
            {"role": "user", "content": f"The student's steps so far:\n{steps}\n\nJudge step {len(job.steps)}."}]


def hf_chat(model, tokenizer, chats: list[list[dict]], max_tokens: int, temperature: float) -> list[str]:
    """One batched generate call: the assistant's reply to each chat (list of role/content messages)."""
    prompts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    room = getattr(model.config, "max_position_embeddings", 32768) - max_tokens  # long prompts keep their end
    ids, mask = rollout.tokenize_prompts(tokenizer, prompts, room, next(model.parameters()).device)
    out = rollout.generate(model, ids, mask, max_new_tokens=max_tokens, temperature=temperature)
    return tokenizer.batch_decode(out, skip_special_tokens=True)  # padding after EOS is a special token


# ----------------------------------------------------------------------------------------------
# hf and http


class HFVerifier:
    """A local causal LM; model None means the policy (its LoRA adapter switched off, if any)."""

    def __init__(self, model, tokenizer, template: str, max_tokens: int, temperature: float):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_tokens, self.temperature = max_tokens, temperature

    def __call__(self, jobs, policy, policy_tokenizer) -> list[str]:
        model, tok = (self.model, self.tokenizer) if self.model is not None else (policy, policy_tokenizer)
        off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with off:
            return hf_chat(model, tok, [messages(self.template, job) for job in jobs], self.max_tokens,
                           self.temperature)


class HTTPVerifier:
    """An OpenAI-compatible server. A call waits at most turn_timeout_s for all its replies, whatever the
    server does: replies not in by then are None (failed calls), their requests finish in the background."""

    def __init__(self, base_url: str, model: str, api_key_env: str, timeout_s: float, retries: int,
                 concurrency: int, template: str, max_tokens: int, temperature: float, *, turn_timeout_s: float):
        import openai  # only this backend needs it

        self.key = os.environ.get(api_key_env, "") if api_key_env else ""
        # the openai client retries timeouts, connection errors, 408/409/429 and 5xx with exponential backoff
        self.client = openai.OpenAI(base_url=base_url, api_key=self.key or "none", timeout=timeout_s,
                                    max_retries=retries)
        self.model, self.template, self.max_tokens, self.temperature = model, template, max_tokens, temperature
        self.concurrency, self.turn_timeout_s, self.reported = concurrency, turn_timeout_s, set()
        try:  # start-up check: the server answers at all (a 404 for /models still proves it is up)
            served = [m.id for m in self.client.with_options(max_retries=0, timeout=min(timeout_s, 10.0)).models.list()]
            if served and model not in served:
                print(f"warning: the verifier server at {base_url} lists the models {served[:5]}, not "
                      f"{model!r} (verifier_model): its requests may fail", file=sys.stderr)
        except openai.APIConnectionError as e:  # also the timeout error
            raise config.UserError(f"the verifier server at {base_url} is unreachable ({type(e).__name__}): "
                                   f"start it (python verifier.py serve --model X --port P serves a local model) "
                                   f"or fix verifier_base_url") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise config.UserError(f"the verifier server at {base_url} refused the API key (status "
                                   f"{e.status_code}): put the key in the environment variable {api_key_env!r} "
                                   f"(verifier_api_key_env)") from None
        except openai.APIStatusError:
            pass

    def ask(self, chat: list[dict]) -> str | None:
        try:
            reply = self.client.chat.completions.create(model=self.model, messages=chat, max_tokens=self.max_tokens,
                                                        temperature=self.temperature)
            content = reply.choices[0].message.content
            if not isinstance(content, str):
                raise ValueError(f"malformed reply: {str(reply)[:200]}")
            return content
        except Exception as e:  # after the client's retries: this turn goes on without feedback
            kind = type(e).__name__
            if kind not in self.reported:  # each kind of failure is printed once; all are counted
                self.reported.add(kind)
                message = str(e)[:300].replace(self.key, "***") if self.key else str(e)[:300]
                print(f"verifier call failed ({kind}: {message}); the turn goes on without feedback "
                      f"(counted in verifier/failed_calls, reported once per kind)", file=sys.stderr)
            return None

    def __call__(self, jobs, policy=None, policy_tokenizer=None) -> list[str | None]:
        chats = [messages(self.template, job) for job in jobs]
        pool = concurrent.futures.ThreadPoolExecutor(max(1, min(self.concurrency, len(chats))))
        futures = [pool.submit(self.ask, chat) for chat in chats]
        # the turn's deadline: without it a hanging server costs (retries + 1) x timeout per round of
        # `concurrency` requests; requests not yet sent are cancelled, those in flight end in the background
        done, late = concurrent.futures.wait(futures, timeout=self.turn_timeout_s)
        pool.shutdown(wait=False, cancel_futures=True)
        if late and "turn deadline" not in self.reported:
            self.reported.add("turn deadline")
            print(f"verifier turn deadline: {len(late)} of {len(futures)} replies were not in after "
                  f"{self.turn_timeout_s:g} s (verifier_turn_timeout_s); the turn goes on without them "
                  f"(counted in verifier/failed_calls, reported once)", file=sys.stderr)
        return [f.result() if f in done else None for f in futures]


def make(cfg, device: str):
    """The backend cfg.verifier_backend names (rules, hf, http) with its verifier_* settings; http checks
    at once that its server answers."""
    if cfg.verifier_backend == "rules":
        return RulesVerifier()
    template = load_prompt(cfg.verifier_prompt)
    if cfg.verifier_backend == "hf":
        if cfg.verifier_model == "policy":
            return HFVerifier(None, None, template, cfg.verifier_max_tokens, cfg.verifier_temperature)
        vm, vt = llms.load(cfg.verifier_model, device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                           load_8bit=cfg.verifier_8bit)
        vm.eval().requires_grad_(False)
        return HFVerifier(vm, vt, template, cfg.verifier_max_tokens, cfg.verifier_temperature)
    if cfg.verifier_backend == "http":
        return HTTPVerifier(cfg.verifier_base_url, cfg.verifier_model, cfg.verifier_api_key_env, cfg.verifier_timeout_s,
                            cfg.verifier_retries, cfg.verifier_concurrency, template, cfg.verifier_max_tokens,
                            cfg.verifier_temperature, turn_timeout_s=cfg.verifier_turn_timeout_s)
    raise config.UserError(f"verifier_backend must be rules, hf or http, got {cfg.verifier_backend!r}")


# ----------------------------------------------------------------------------------------------
# python verifier.py serve: a local HF model as an OpenAI-compatible /v1/chat/completions endpoint


def serve(model, tokenizer, name: str, port: int) -> ThreadingHTTPServer:
    """A server on 127.0.0.1:port (0 = a free port, see .server_address); requests run one at a time."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/").endswith("/models"):
                return self.send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            self.send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self.send(404, {"error": {"message": f"no route {self.path}"}})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                chat = [{"role": str(m["role"]), "content": str(m["content"])} for m in req["messages"]]
                max_tokens, temperature = int(req.get("max_tokens") or 128), float(req.get("temperature") or 0.0)
            except (ValueError, KeyError, TypeError) as e:
                return self.send(400, {"error": {"message": f"bad request: {type(e).__name__}: {e}"}})
            with lock:
                text = hf_chat(model, tokenizer, [chat], max_tokens, temperature)[0]
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            self.send(200, {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion",
                            "created": int(time.time()), "model": req.get("model", name), "choices": [choice]})

        def log_message(self, *args):  # quiet: one line per request would drown the training log
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


def serve_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python verifier.py serve", description=serve.__doc__)
    parser.add_argument("--model", required=True, help='hub name, local folder, or "tiny" (built in, untrained)')
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--load_8bit", action="store_true")
    args = parser.parse_args(argv)
    device = llms.pick_device(args.device)
    corpus = None
    if args.model == llms.TINY:  # its tokenizer trains on the built-in task's text
        import data
        corpus = [ex["question"] + "\n" + data.target_text(ex) for ex in data.arithmetic_task(1000, 10, seed=0)[0]]
    model, tokenizer = llms.load(args.model, device, dtype=args.dtype, tiny_corpus=corpus, load_8bit=args.load_8bit)
    model.eval().requires_grad_(False)
    server = serve(model, tokenizer, args.model, args.port)
    print(f"serving {args.model} at http://127.0.0.1:{server.server_address[1]}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()
