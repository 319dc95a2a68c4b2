"""Plain sampling: masks, truncation, explicit sampling settings, and scoring that agrees with sampling."""
import pytest
import torch

import llms
import logprobs
import rollout


def test_completion_mask_stops_after_first_eos():
    comps = torch.tensor([[5, 6, 9, 7, 9], [5, 6, 7, 8, 8], [9, 1, 1, 1, 1]])
    mask, truncated = rollout.completion_mask(comps, [9])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_a_stop_of_two_tokens_ends_the_completion_at_its_second():
    # SmolLM2 in the plain format: the blank line after " 83" is "\n", "\n" (198, 198), one "\n\n" (1116) alone
    comps = torch.tensor([[5, 198, 198, 7, 2], [198, 5, 198, 1116, 2], [5, 198, 6, 7, 8], [198, 198, 198, 1, 1]])
    stops = [2, (198, 198), (1116,)]
    mask, truncated = rollout.completion_mask(comps, stops)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]
    assert [rollout.ends_at(row, j, stops) for row in comps.tolist()[:1] for j in range(5)] == [
        False, False, True, False, True]
    stop = rollout.StopSequences([(198, 198)], start=1)  # generate's early stop: new tokens from column 1
    ids = torch.tensor([[198, 198, 5], [198, 5, 198], [9, 198, 198]])  # the first row's pair spans the prompt
    assert stop(ids[:, :2], None).tolist() == [False, False, False]
    assert stop(ids, None).tolist() == [False, False, True]


def test_generation_config_is_neutral(tiny):
    model, tok = tiny
    gen = model.generation_config
    assert gen.repetition_penalty is None and gen.top_k is None and gen.top_p is None
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen.eos_token_id and tok.padding_side == "left"


def test_sample_masks_and_groups(tiny, task):
    model, tok = tiny
    questions = [ex["question"] for ex in task[0][:3]]
    prompts = [llms.chat_prompt(tok, "Solve it." * (i + 1), q) for i, q in enumerate(questions)]  # ragged
    torch.manual_seed(0)
    r = rollout.sample(model, tok, prompts, 4, max_prompt_tokens=96, max_new_tokens=10, temperature=1.0)
    n, length = r.input_ids.shape
    prompt_len = rollout.tokenize_prompts(tok, prompts, 96, "cpu")[0].shape[1]
    assert n == 12 and r.group.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and len(r.texts) == 12
    assert r.temperature.tolist() == [1.0] * 12  # what the loss takes the log-probs at
    assert r.loss_mask[:, :prompt_len].sum() == 0  # never train on the prompt
    assert torch.all(r.loss_mask <= r.attention_mask)  # never train on padding
    comp = r.loss_mask[:, prompt_len:]
    assert torch.all(comp[:, 0] == 1) and torch.all(comp[:, 1:] <= comp[:, :-1])  # one run from the start
    assert model.training  # sampling put the model back in train mode
    eos = model.generation_config.eos_token_id
    for d, ids, m in zip(r.info, r.input_ids, r.loss_mask):
        trained = ids[m.bool()].tolist()
        assert d["truncated"] == (trained[-1] not in eos)  # truncated exactly when no EOS was sampled
        assert all(t not in eos for t in trained[:-1])  # nothing is trained after an EOS


@pytest.mark.parametrize("cache", [None, "static"])
def test_scoring_matches_sampling_logprobs(tiny, task, cache):
    """Left padding, positions and temperature agree between generate and the training forward pass."""
    model, tok = tiny
    prompts = [llms.chat_prompt(tok, "", ex["question"]) for ex in task[0][:2]] + [llms.chat_prompt(tok, "", "Hi")]
    ids, mask = rollout.tokenize_prompts(tok, prompts, 96, "cpu")
    temperature = 0.7
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6, min_new_tokens=6,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                             pad_token_id=tok.pad_token_id, cache_implementation=cache)
        full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, ids.shape[1]:])], 1)
        scored = logprobs.token_logps(model, out.sequences, full_mask, ids.shape[1], temperature, chunk=4)
    model.train()
    logits = torch.stack(out.logits, 1).float() / temperature  # (n, 6, V)
    sampled = logits.log_softmax(-1).gather(-1, out.sequences[:, ids.shape[1]:, None]).squeeze(-1)
    torch.testing.assert_close(scored, sampled, atol=1e-4, rtol=1e-4)


def test_teacher_forced_trains_on_the_completion_and_eos(tiny):
    model, tok = tiny
    r = rollout.teacher_forced(tok, ["a", "longer prompt"], ["1 + 2 = 3.", "4"], 32, 16)
    for row_ids, row_mask in zip(r.input_ids, r.loss_mask):
        trained = row_ids[row_mask.bool()].tolist()
        assert trained[-1] == tok.eos_token_id
    assert r.texts == ["1 + 2 = 3.", "4"]


def test_static_sampler_samples_like_the_dynamic_one(tiny, task):
    """The fast path (static KV cache) gives the same greedy tokens, and the same samples for a seed."""
    model, tok = tiny
    prompts = [llms.chat_prompt(tok, "Solve it." * i, ex["question"]) for i, ex in enumerate(task[0][:3])]
    ids, mask = rollout.tokenize_prompts(tok, prompts, 96, "cpu")  # ragged: left padding differs per row
    ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    for temperature in (0.0, 1.0):
        out = {}
        for kv_cache in ("dynamic", "static"):
            torch.manual_seed(1)
            out[kv_cache] = rollout.generate(model, ids, mask, max_new_tokens=16, temperature=temperature,
                                            kv_cache=kv_cache, min_new_tokens=16)
        assert out["dynamic"].shape == (12, 16)
        assert torch.equal(out["dynamic"], out["static"]), temperature
    assert not torch.equal(out["static"][0], out["static"][1])  # seeded samples do differ between chains


def test_static_sampler_compiles_its_decode_step_a_bounded_number_of_times(tiny, task, monkeypatch):
    """On GPU, HF compiles the static sampler's decode step (CUDA graphs). Prompt widths and chain counts
    change from step to step (and between plain, guided and eval calls): that must not recompile every
    call, or the compile time would eat the gain. Here the GPU-only compile path is forced on CPU, with a
    backend that only counts the graphs dynamo hands it (CUDA graph recording itself is not covered)."""
    import copy

    from transformers import CompileConfig

    model, tok = tiny
    model = copy.deepcopy(model)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    torch._dynamo.reset()
    monkeypatch.setattr(type(model), "_valid_auto_compile_criteria", lambda self, kwargs, config: True)
    model.generation_config.compile_config = CompileConfig(backend=counting_backend, mode=None)
    new_graphs = []
    for i, (questions, chains) in enumerate([(4, 2), (4, 2), (4, 2), (3, 4), (4, 2), (2, 2)]):
        prompts = [llms.chat_prompt(tok, "Solve it. " * (3 * i), ex["question"]) for ex in task[0][i:i + questions]]
        before = len(graphs)
        rollout.sample(model, tok, prompts, chains, max_prompt_tokens=96, max_new_tokens=8, temperature=1.0,
                       kv_cache="static")
        new_graphs.append(len(graphs) - before)
    torch._dynamo.reset()
    assert new_graphs[0] >= 1  # the forced path really compiles
    # each new kind of change recompiles once (dynamo then marks that size dynamic), after that none do:
    # the last two calls bring a new prompt width and a new chain count, and compile nothing
    assert sum(new_graphs) < len(new_graphs) and new_graphs[-2:] == [0, 0], new_graphs


def test_a_frozen_output_projection_runs_as_one_matmul_not_one_per_chain(tiny):
    """With a frozen head (LoRA), a sliced input used to send torch's matmul down its batched path, which
    expands the weight once per chain (7 GB at Qwen2.5's vocab for 16 chains on CPU). Sampling's prefill
    and the log-prob chunks both slice; both must stay on one mm."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    model, _ = tiny
    head = copy.deepcopy(model).get_output_embeddings().requires_grad_(False)  # the hook comes along
    hidden = torch.randn(16, 150, head.in_features)
    ids = torch.randint(head.out_features, (16, 150))
    for run in (lambda: head(hidden[:, -1:, :]),  # what generate does at the prefill
                lambda: logprobs.head_logps(hidden, head, ids, 1, 1.0, 64)):  # the chunks
        with Ops() as ops, torch.no_grad():
            run()
        assert "bmm" not in ops.seen and ({"mm", "addmm"} & ops.seen), ops.seen


def test_truncated_prompts_are_the_ones_tokenize_prompts_cuts(tiny):
    _, tok = tiny
    prompts = ["What is 1 + 1?", "What is 2 + 2? " * 20]
    cut = [n > 16 for n in rollout.prompt_lengths(tok, prompts)]
    assert cut == [False, True]
    ids, mask = rollout.tokenize_prompts(tok, prompts, 16, "cpu")
    assert mask.sum(1).tolist()[1] == 16 and mask.sum(1).tolist()[0] < 16


def toy_rollout(width: int, temperature: list[float] | None) -> rollout.Rollout:
    n = 2
    return rollout.Rollout(input_ids=torch.ones(n, width, dtype=torch.long), attention_mask=torch.ones(n, width),
                           loss_mask=torch.ones(n, width), group=torch.zeros(n, dtype=torch.long),
                           texts=["a", "b"], info=[{}, {}],
                           temperature=None if temperature is None else torch.tensor(temperature))


def test_concat_keeps_each_chains_sampling_temperature():
    joined = rollout.concat([(toy_rollout(3, [0.5, 0.75]), [1]), (toy_rollout(5, [1.0, 2.0]), [0, 1])],
                            torch.zeros(3, dtype=torch.long), 0)
    assert joined.temperature.tolist() == [0.75, 1.0, 2.0]
    assert rollout.concat([(toy_rollout(3, None), [0, 1])], torch.zeros(2, dtype=torch.long), 0).temperature is None
    with pytest.raises(ValueError, match="some parts carry their chains' sampling temperatures and some do not"):
        rollout.concat([(toy_rollout(3, None), [0]), (toy_rollout(3, [1.0, 1.0]), [0])],
                       torch.zeros(2, dtype=torch.long), 0)


def test_chains_of_one_prompt_share_its_prefill_and_sample_what_each_alone_would(tiny, task, monkeypatch):
    model, tok = tiny
    prompts = [llms.chat_prompt(tok, "Solve it." * (i + 1), ex["question"]) for i, ex in enumerate(task[0][:2])]
    ids, mask = rollout.tokenize_prompts(tok, prompts, 96, "cpu")
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)  # 2 prompts x 3 chains, left padded
    cache = rollout.prefilled_cache(model, ids, mask)
    assert cache.get_seq_length() == ids.shape[1] - 1 and cache.layers[0].keys.shape[0] == 6
    assert rollout.prefilled_cache(model, ids[::3], mask[::3]) is None  # no two rows share a prompt
    shared = rollout.generate(model, ids, mask, max_new_tokens=12, temperature=0.0)
    calls = []
    monkeypatch.setattr(rollout, "prefilled_cache", lambda *a: calls.append(1))  # each row's own prefill
    alone = rollout.generate(model, ids, mask, max_new_tokens=12, temperature=0.0)
    assert calls and torch.equal(shared, alone)
