"""The other side of bench.py: TRL's GRPOTrainer on the same model, prompt, reward and settings.

Every setting of ours that TRL has is mapped here (chains, lengths, micro-batch and accumulation,
dtype, sampling, loss, clipping, optimizer, schedule, gradient checkpointing, LoRA, reference
model), so a new TRL version or a new setting is one edit in one place. The timings come from
TRL's own callbacks and two light wrappers around its sampling and log-prob methods.
"""
import os

import torch

TRL_LOSS = {"grpo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo", "dapo": "dapo", "cispo": "cispo", "gspo": "grpo"}


def run(cfg, device: str, model, tok, prompt: str, reward, warmup: int, steps: int, clock, lengths: list[int],
        workdir: str) -> tuple[list[dict], torch.nn.Module]:
    """Train warmup + steps steps; returns (the measured steps' times by phase, TRL's trained model)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from transformers import TrainerCallback

    peft_config = None
    if cfg.lora_r > 0:
        from peft import LoraConfig
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    elif cfg.beta > 0:  # TRL loads its reference model from the policy's path
        model.save_pretrained(os.path.join(workdir, "ref"))
        model.config._name_or_path = os.path.join(workdir, "ref")
    accumulation = cfg.num_chains // cfg.micro_batch_size
    args = GRPOConfig(
        output_dir=workdir, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        use_cpu=not device.startswith("cuda"), bf16=model.dtype == torch.bfloat16, seed=cfg.seed,
        max_steps=warmup + steps, per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=accumulation, num_generations=cfg.num_chains,
        max_completion_length=cfg.max_completion_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
        repetition_penalty=1.0, generation_kwargs={"min_new_tokens": cfg.max_completion_tokens},
        beta=cfg.beta, loss_type=TRL_LOSS[cfg.loss_type], scale_rewards=cfg.adv_scale,
        importance_sampling_level="sequence" if cfg.loss_type == "gspo" else "token",
        epsilon=cfg.eps_low, epsilon_high=cfg.cispo_max_weight if cfg.loss_type == "cispo" else cfg.eps_high,
        num_iterations=cfg.num_iterations,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2, max_grad_norm=cfg.max_grad_norm, warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="cosine" if cfg.lr_schedule == "cosine" else "constant_with_warmup",
        optim="adamw_bnb_8bit" if cfg.optimizer == "adamw8bit" else "adamw_torch",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=cfg.liger and device.startswith("cuda"))  # its layer kernels, as llms.prepare does ours
    dataset = Dataset.from_dict({"prompt": [prompt] * (warmup + steps) * 2})
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
