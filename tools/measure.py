"""How the benches measure and publish: time and peak memory per phase, bandwidth, the BENCHMARKS.md
section's heading (date, device, versions, command). bench.py, bench_head.py and gpu_check.py use it.

Peak memory is torch's allocated / reserved on GPU, and the process's peak resident memory on CPU
(VmHWM, reset through /proc/self/clear_refs). A Clock synchronises the GPU at each phase's edges.
"""
import datetime
import gc
import importlib.metadata
import os
import platform
import shlex
import time

import torch


def memory_now(device: str) -> float:
    """GB in use now: allocated by torch (GPU), or the process's resident memory (CPU)."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**30
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def memory_mark(device: str) -> tuple[float, float]:
    """(allocated, reserved) peak GB since the last mark, and a new mark. On CPU the process's peak
    resident memory (VmHWM, reset through /proc/self/clear_refs), as both."""
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return peak
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return hwm, hwm


class Clock:
    """Seconds and peak memory per named phase, with the device synchronised at each edge so GPU work
    is counted. Memory between phases (backward, loss, rewards, setup) goes to "rest"."""

    def __init__(self, device: str):
        self.device, self.cuda = device, device.startswith("cuda")
        self.totals, self.started, self.peaks, self.open = {}, {}, {}, []
        memory_mark(device)  # peaks count from here

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def mark(self):  # the peak since the last edge belongs to the phase that was running
        phase = self.open[-1] if self.open else "rest"
        alloc, reserved = memory_mark(self.device)
        old = self.peaks.get(phase, (0.0, 0.0))
        self.peaks[phase] = (max(old[0], alloc), max(old[1], reserved))

    def start(self, name: str):
        self.mark()
        self.open.append(name)
        self.started[name] = self.now()

    def stop(self, name: str):
        self.totals[name] = self.totals.get(name, 0.0) + self.now() - self.started.pop(name)
        self.mark()
        self.open.remove(name)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self.start(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(name)
        return timed

    def take(self) -> dict:
        totals, self.totals = self.totals, {}
        return totals


def bandwidth(device: str) -> float:
    """Memory bandwidth in bytes/s: a large copy reads and writes every byte once."""
    size = 2 * 2**30 if device.startswith("cuda") else 64 * 2**20  # well past any cache
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    clock = Clock(device)
    for _ in range(2):
        dst.copy_(src)
    t0, repeats = clock.now(), 10
    for _ in range(repeats):
        dst.copy_(src)
    seconds = clock.now() - t0
    del src, dst
    return 2 * size * repeats / seconds


def weight_bytes(model) -> int:
    """Bytes of all weights (tied ones once): what one decode step must read at least."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def reset_memory(device: str) -> None:
    """Free what the previous system held: compiled graphs (and their CUDA graph pools) included."""
    torch.compiler.reset()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> str:
    return ", ".join(f"{p} {importlib.metadata.version(p)}" for p in
                     ("torch", "transformers", "trl", "bitsandbytes", "peft"))


def heading(device: str, argv: list[str], cap: str = "", script: str = "tools/bench.py") -> list[str]:
    return [f"### {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} · {device_name(device)}{cap}", "",
            f"`python {script} {shlex.join(argv)}`", ""]


def publish(text: str, path: str) -> None:
    """Print a section and append it to BENCHMARKS.md (or --benchmarks_file)."""
    print(text)
    with open(path, "a") as f:
        f.write("\n" + text)
