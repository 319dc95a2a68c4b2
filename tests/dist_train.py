"""train.py under torchrun with a fault on rank 1, for tests/test_distributed.py:

    torchrun --standalone --nproc_per_node 2 tests/dist_train.py MODE TRAIN_ARGS...

MODE: run (train.py as it is), sampler_fails (rank 1's sampler raises a UserError at step 2),
flaky_reward (a reward `flaky` that raises on rank 1's chains: counted, the run goes on).
"""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config  # noqa: E402
import distributed  # noqa: E402
import rewards  # noqa: E402
import samplers  # noqa: E402

mode, argv = sys.argv[1], sys.argv[2:]
if mode == "sampler_fails":
    make = samplers.make

    def failing_make(cfg, **kwargs):
        sample = make(cfg, **kwargs)

        def wrapped(model, tokenizer, batch, step):
            if distributed.rank() == 1 and step == 2:
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
sys.argv = [os.path.join(ROOT, "train.py"), *argv]
runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
