"""The other side of bench.py: TRL's GRPOTrainer on the same model, prompt, reward and settings; and a
recipe of ours trained by TRL instead, evaluated by our evaluator before and after:

    python tools/bench_trl.py --config configs/smollm2_cpu.yaml --out_dir out/trl_smollm2 [--seed K]

That writes <out_dir>/metrics.jsonl as train.py does (eval rows at step 0 and max_steps, one train row
per step with its reward and step_time_s), so plot.py draws both. The prompts are the recipe's, in
the model's layout (few-shot examples included); the rewards are the recipe's, through rewards.py.
TRL stops a chain at EOS ids only: in the plain format a chain runs past its blank line, so its reward
reads the text up to the blank line, as our own stop cuts it, and TRL trains the tokens after it too.

Every setting of ours that TRL has is mapped here (chains, lengths, micro-batch and accumulation,
dtype, sampling, loss, clipping, optimizer, schedule, gradient checkpointing, LoRA, reference
model), so a new TRL version or a new setting is one edit in one place. TRL's GRPOTrainer has no
dynamic sampling (DAPO's filter, grpo.py) and none of our sampling ideas: with either in the recipe it
trains plain GRPO on every group, and says so. The timings come from TRL's own callbacks and two light
wrappers around its sampling and log-prob methods.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules

TRL_LOSS = {"grpo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo", "dapo": "dapo", "cispo": "cispo", "gspo": "grpo"}
# our lr_schedule as transformers names it (wsd: constant, then linear decay over lr_decay_steps)
TRL_SCHEDULE = {"constant": "constant_with_warmup", "cosine": "cosine", "wsd": "warmup_stable_decay"}


def trl_args(cfg, device: str, model, workdir: str, max_steps: int, chains_per_step: int,
             generation_kwargs: dict | None = None):
    """(GRPOConfig, peft LoraConfig or None): every setting of ours that TRL has, for max_steps steps of
    chains_per_step chains (prompts_per_step x num_chains)."""
    from trl import GRPOConfig

    peft_config = None
    if cfg.lora_r > 0:
        from peft import LoraConfig
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    elif cfg.beta > 0:  # TRL loads its reference model from the policy's path
        model.save_pretrained(os.path.join(workdir, "ref"))
        model.config._name_or_path = os.path.join(workdir, "ref")
    micro = min(cfg.micro_batch_size, chains_per_step)
    accumulation = chains_per_step // micro
    args = GRPOConfig(
        output_dir=workdir, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        use_cpu=not device.startswith("cuda"), bf16=model.dtype == torch.bfloat16, seed=cfg.seed,
        max_steps=max_steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation, num_generations=cfg.num_chains,
        max_completion_length=cfg.max_completion_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
        repetition_penalty=1.0, generation_kwargs=generation_kwargs or {},
        beta=cfg.beta, loss_type=TRL_LOSS[cfg.loss_type], scale_rewards=cfg.adv_scale,
        importance_sampling_level="sequence" if cfg.loss_type == "gspo" else "token",
        epsilon=cfg.eps_low, epsilon_high=cfg.cispo_max_weight if cfg.loss_type == "cispo" else cfg.eps_high,
        num_iterations=cfg.num_iterations,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2, max_grad_norm=cfg.max_grad_norm, warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=TRL_SCHEDULE[cfg.lr_schedule],
        lr_scheduler_kwargs={"num_decay_steps": cfg.lr_decay_steps, "decay_type": "linear"}
        if cfg.lr_schedule == "wsd" else None,
        optim="adamw_bnb_8bit" if cfg.optimizer == "adamw8bit" else "adamw_torch",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=cfg.liger and device.startswith("cuda"))  # its layer kernels, as llms.prepare does ours
    return args, peft_config


def run(cfg, device: str, model, tok, prompts: list[str], reward, warmup: int, steps: int, clock, lengths: list[int],
        workdir: str) -> tuple[list[dict], torch.nn.Module]:
    """Train warmup + steps steps; returns (the measured steps' times by phase, TRL's trained model)."""
    from datasets import Dataset
    from trl import GRPOTrainer
    from transformers import TrainerCallback

    args, peft_config = trl_args(cfg, device, model, workdir, warmup + steps, len(prompts) * cfg.num_chains,
                                 generation_kwargs={"min_new_tokens": cfg.max_completion_tokens})
    dataset = Dataset.from_dict({"prompt": prompts * (warmup + steps) * 2})
    measured = []

    class Steps(TrainerCallback):  # a step ends at on_step_end; the optimizer step sits between two events
        def on_train_begin(self, *a, **k):
            self.t0 = clock.now()

        def on_pre_optimizer_step(self, *a, **k):
            clock.start("optim")

        def on_optimizer_step(self, *a, **k):
            clock.stop("optim")

        def on_step_end(self, args, state, control, **k):
            t = clock.now()
            times = {"step": t - self.t0, **clock.take()}
            self.t0 = t
            if state.global_step > warmup:
                measured.append(times)

    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [reward(c) for c in completions],
                          args=args, train_dataset=dataset, processing_class=tok, peft_config=peft_config,
                          callbacks=[Steps()])
    trainer._generate_single_turn = clock.wrap("sample", trainer._generate_single_turn)
    trainer._get_per_token_logps_and_entropies = clock.wrap("logp", trainer._get_per_token_logps_and_entropies)
    trainer.train()
    seen = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    mean_length = sum(lengths) / len(lengths)
    if seen and abs(seen[-1] - mean_length) > 1e-3:  # TRL sampled some other way
        raise RuntimeError(f"TRL's chains have mean length {seen[-1]}, not the workload's {mean_length}")
    return measured, trainer.model


def train_recipe(argv: list[str]) -> None:
    """A recipe trained by TRL's GRPOTrainer for its max_steps (module docstring)."""
    import json
    import random
    import time

    from datasets import Dataset
    from trl import GRPOTrainer
    from transformers import TrainerCallback

    import config
    import data
    import evaluator
    import llms
    import rewards
    import rollout
    import sft

    cfg = config.load(argv)
    missing = []  # what TRL cannot run: said, not silently dropped
    if cfg.dynamic_sampling:
        missing.append("dynamic sampling")
    if cfg.sampler != "plain":
        missing.append(f"{cfg.sampler} sampling")
    if missing:
        print(f"bench_trl: TRL's GRPOTrainer has no {' and no '.join(missing)}: it trains plain GRPO on every group")
    device = llms.pick_device(cfg.device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_set, test_set = data.load(cfg)
    eval_set = evaluator.subset(test_set, cfg.eval_n, cfg.seed)
    shots = data.run_shots(cfg, train_set)
    model, tok = llms.from_config(cfg, cfg.model_name, device, shots=shots,
                                  tiny_corpus=data.tiny_corpus(train_set, cfg.system_prompt))
    if cfg.sft_steps > 0:  # the warm start train.py gives the same recipe
        sft.warm_start_cached(model, tok, train_set, cfg)
    ours = model.generation_config  # TRL samples with its own; our evaluation with ours
    plain = tok.chat_template == llms.plain_template(tok, shots)
    os.makedirs(cfg.out_dir, exist_ok=True)
    log = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w")

    def write(row: dict) -> None:
        log.write(json.dumps(row) + "\n")
        log.flush()

    def evaluate(step: int) -> None:
        model.generation_config = ours
        write({"step": step, "split": "eval", **evaluator.evaluate(model, tok, eval_set, cfg)[0]})

    def reward(prompts, completions, answer, **_):
        texts = [c.split(llms.PLAIN_STOP)[0] if plain else c for c in completions]
        scores, names, _ = rewards.score(texts, answer, [{} for _ in texts], cfg.rewards, rewards.settings(cfg))
        return rewards.total(scores, names, cfg.rewards).tolist()

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **k):
            self.dt = time.time() - self.t0

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "reward" in logs:
                write({"step": state.global_step, "split": "train", "reward": logs["reward"],
                       "completion_len": logs.get("completions/mean_length"), "step_time_s": self.dt})

    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump({**vars(cfg), "system": "trl"}, f, indent=1)
    evaluate(0)
    args, peft_config = trl_args(cfg, device, model, os.path.join(cfg.out_dir, "trl"), cfg.max_steps,
                                 cfg.prompts_per_step * cfg.num_chains)
    dataset = Dataset.from_dict({"prompt": rollout.prompts_of(tok, cfg.system_prompt, train_set),
                                 "answer": [ex["answer"] for ex in train_set]})
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tok,
                          peft_config=peft_config, callbacks=[Steps()])
    t0 = time.time()
    trainer.train()
    model = trainer.model
    evaluate(cfg.max_steps)
    write({"step": cfg.max_steps, "split": "wall", "train_s": time.time() - t0})
    print(f"done: {cfg.out_dir}/metrics.jsonl")


if __name__ == "__main__":
    import sys
    train_recipe(sys.argv[1:])
