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
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

import equations
import answers
import config
import llms
import rewards
import rollout
import vision

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
    """What a verifier judges: one conversation's problem, reference answer, policy turns so far, and
    the problem's images (PIL, a VL policy's)."""
    question: str
    answer: str
    steps: list[str]
    images: tuple | list = ()  # empty for a text problem; never a shared mutable default

# ----------------------------------------------------------------------------------------------
# rules: a programmatic verifier for the arithmetic of the work (equations.py) and its final answer


def answered(steps: list[str]) -> bool:
    """The policy's turns so far state a final answer: the work as a whole (rewards.has_final_answer), or its
    latest turn is a bare number, a second try after "Your final answer is wrong." ("Reply with just the
    number." recipes)."""
    return bool(steps) and (rewards.has_final_answer("".join(steps)) or rewards.has_final_answer(steps[-1]))


def rules_reply(answer: str, steps: list[str]) -> str:
    """Check every equation of the latest step (equations.equation_errors); then, once the work states a final
    answer, that answer.

    A wrong equation gets its correct value; a wrong final answer is flagged (the reference is not
    given away); right work with a final answer gets STOP; a right step without one gets only a
    score (the policy goes on unprompted); a step without any equation gets an empty reply.
    """
    latest, work = (steps[-1] if steps else ""), "".join(steps)
    wrong, checked = equations.equation_errors(latest)
    if wrong:  # short replies: every inserted token lengthens every later turn and the trained sequence
        return "; ".join(wrong) + ".\n[SCORE] hallucination_detect=1"
    if answered(steps):
        if answers.is_correct(work, answer):
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


def messages(template: str, job, image_part=None) -> list[dict]:
    """The verifier's chat for a job; with image_part (image -> a content part), the problem's images
    come first in the user message."""
    steps = "\n".join(f"Step {k}: {s.strip()}" for k, s in enumerate(job.steps, 1))
    user = f"The student's steps so far:\n{steps}\n\nJudge step {len(job.steps)}."
    if job.images and image_part is not None:
        user = [image_part(image) for image in job.images] + [{"type": "text", "text": user}]
    return [{"role": "system", "content": template.format(question=job.question, answer=job.answer,
                                                          stop=STOP)},
            {"role": "user", "content": user}]


def hf_chat(model, tokenizer, chats: list[list[dict]], max_tokens: int, temperature: float,
            images: list[list] | None = None) -> list[str]:
    """One batched generate call: the assistant's reply to each chat (list of role/content messages);
    images: each chat's, in the order of its image parts (a VL verifier)."""
    prompts = [llms.render(tokenizer, chat) for chat in chats]
    context = getattr(model.config.get_text_config(), "max_position_embeddings", 32768)  # a VL model: its LM's
    room = context - max_tokens  # long prompts keep their end
    ids, mask, visual = rollout.encode_prompts(tokenizer, prompts, room, next(model.parameters()).device, images)
    out = rollout.generate(model, ids, mask, max_new_tokens=max_tokens, temperature=temperature, visual=visual)
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
        sees = vision.is_vl(tok) and any(job.images for job in jobs)  # a text verifier reads the text alone
        chats = [messages(self.template, job, (lambda image: {"type": "image"}) if sees else None) for job in jobs]
        with off:
            return hf_chat(model, tok, chats, self.max_tokens, self.temperature,
                           [list(job.images) for job in jobs] if sees else None)


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
        chats = [messages(self.template, job, lambda image: {"type": "image_url", "image_url": {
            "url": vision.data_url(image)}}) for job in jobs]  # OpenAI's image part: a base64 data URL
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
                           load_8bit=cfg.verifier_8bit, model_cache=cfg.model_cache,  # a GGUF verifier too
                           chat_template_kwargs=cfg.chat_template_kwargs)
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
        import builtin_tasks
        import data
        corpus = [ex["question"] + "\n" + data.target_text(ex) for ex in builtin_tasks.arithmetic_task(1000, 10, seed=0)[0]]
    model, tokenizer = llms.load(args.model, device, dtype=args.dtype, tiny_corpus=corpus, load_8bit=args.load_8bit)
    model.eval().requires_grad_(False)
    server = serve(model, tokenizer, args.model, args.port)
    print(f"serving {args.model} at http://127.0.0.1:{server.server_address[1]}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()
