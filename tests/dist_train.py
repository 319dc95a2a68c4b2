"""train.py under torchrun with a fault on rank 1, for tests/test_distributed.py:

    torchrun --standalone --nproc_per_node 2 tests/dist_train.py MODE TRAIN_ARGS...

MODE: run (train.py as it is), sampler_fails (rank 1's sampler raises a UserError at step 2),
sampler_oom (rank 1's sampler runs out of memory at step 2),
flaky_reward (a reward `flaky` that raises on rank 1's chains: counted, the run goes on),
oom_once (rank 1's first loss micro-batch of 4 chains runs out of memory: both ranks retry at 2),
oom_always (rank 1 runs out of memory on every loss micro-batch: both ranks stop, rank 0 saves),
oom_at_step_2 (rank 1's loss micro-batch of step 2 runs out of memory: under --fsdp the run ends at once),
optimizer_oom (rank 1's GRPO optimizer step of step 2 runs out of memory; rank 0's has been taken),
killed_at_step_4 (rank 1 is killed with SIGKILL when it starts sampling step 4).
"""
import os
import runpy
import signal
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config  # noqa: E402
import distributed  # noqa: E402
import logprobs  # noqa: E402
import optim  # noqa: E402
import rewards  # noqa: E402
import samplers  # noqa: E402

mode, argv = sys.argv[1], sys.argv[2:]
if mode in ("sampler_fails", "sampler_oom", "killed_at_step_4"):
    make = samplers.make

    def failing_make(cfg, **kwargs):
        sample = make(cfg, **kwargs)

        def wrapped(model, tokenizer, batch, step):
            if distributed.rank() == 1 and step == 4 and mode == "killed_at_step_4":
                os.kill(os.getpid(), signal.SIGKILL)
            if distributed.rank() == 1 and step == 2 and mode == "sampler_oom":
                raise torch.OutOfMemoryError("CUDA out of memory (rank 1's test fault)")
            if distributed.rank() == 1 and step == 2 and mode == "sampler_fails":
                raise config.UserError("the verifier server stopped answering (rank 1's test fault)")
            return sample(model, tokenizer, batch, step)
        return wrapped
    samplers.make = failing_make
elif mode == "flaky_reward":
    def flaky(completion, answer, **kwargs):
        if distributed.rank() == 1:
            raise ValueError("rank 1's test fault")
        return 1.0
    rewards.REWARDS["flaky"] = flaky
elif mode in ("oom_once", "oom_always", "oom_at_step_2"):
    token_logps, failed, calls = logprobs.token_logps, [], []

    def tight(model, input_ids, *args, **kwargs):  # GRPO's micro-batches (the warm start's batches are larger)
        calls.append(input_ids.shape[0] <= 4)
        at = {"oom_always": True, "oom_once": not failed, "oom_at_step_2": sum(calls) == 2}[mode]
        if distributed.rank() == 1 and input_ids.shape[0] <= 4 and at:
            failed.append(input_ids.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory (rank 1's test fault)")
        return token_logps(model, input_ids, *args, **kwargs)
    logprobs.token_logps = tight
elif mode == "optimizer_oom":
    make_optimizer = optim.make_optimizer

    def tight_optimizer(model, cfg):
        optimizer, scheduler = make_optimizer(model, cfg)
        step, calls = optimizer.step, []

        def tight_step(*args, **kwargs):
            calls.append(1)
            if distributed.rank() == 1 and len(calls) == 2:
                raise torch.OutOfMemoryError("CUDA out of memory (rank 1's test fault)")
            return step(*args, **kwargs)
        optimizer.step = tight_step
        return optimizer, scheduler
    optim.make_optimizer = tight_optimizer
sys.argv = [os.path.join(ROOT, "train.py"), *argv]
runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
