"""torch's intra-op threads beside the Numba kernels: one resident load, prompts and decode steps
alternating between torch thread counts in one process; one JSON line per run.

    python benchmarks/torch_threads_ab.py MODEL_DIR [--counts 2 1] [--rounds 3] [--prompt-tokens 256]
        [--decode-tokens 16] [--busy 1]

Each run: torch.set_num_threads(count), a fresh sequence of prompt-tokens (as generate() prefills),
then decode-tokens one at a time. Wall and CPU seconds (time.process_time) of each part, the load, and
the wall milliseconds per call of RMSNorm and RoPE inside the prompt.
Numba keeps THREADS threads throughout. --busy N: N spinning processes share the cores during the
timed runs (another program on a user's machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import THREADS  # noqa: E402
from width_child import forced_ids  # noqa: E402


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def timing_calls(module, names: list[str]) -> dict[str, list[float]]:
    """Wrap module's functions `names` so that each call's wall seconds are appended to the returned lists."""
    seconds: dict[str, list[float]] = {name: [] for name in names}

    def wrapped(name, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            seconds[name].append(time.perf_counter() - start)
            return result
        return call

    for name in names:
        setattr(module, name, wrapped(name, getattr(module, name)))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--counts", type=int, nargs="+", default=[THREADS, 1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--busy", type=int, default=0)
    args = parser.parse_args()

    import numba
    import torch

    from mixtral_offload.offload import model
    from mixtral_offload.offload.loading import load

    numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))
    runtime = load(args.model, max_context=args.prompt_tokens + args.decode_tokens + 8)
    ids = forced_ids(runtime.args.vocab_size, args.prompt_tokens + args.decode_tokens)
    prompt, steps = ids[:args.prompt_tokens], ids[args.prompt_tokens:]
    torch.set_num_threads(THREADS)
    runtime.reset()
    runtime._prefill(prompt)  # compiles the kernels and touches the pool once, untimed
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        runs(runtime, prompt, steps, args, timing_calls(model, ["rms_norm", "apply_rope"]))
    finally:
        for process in busy:
            process.kill()
            process.wait()


def runs(runtime, prompt: list[int], steps: list[int], args, calls: dict[str, list[float]]) -> None:
    """rounds x counts runs, alternating the counts; one JSON line each."""
    import numba
    import torch

    for rnd in range(args.rounds):
        for count in args.counts:
            torch.set_num_threads(count)
            runtime.reset()
            load_avg = os.getloadavg()[0]
            for seconds in calls.values():
                seconds.clear()
            p_wall, p_cpu = timed(lambda: runtime._prefill(prompt))
            per_call = {f"{name}_ms": 1e3 * sum(seconds) / len(seconds) for name, seconds in calls.items()}
            d_wall, d_cpu = timed(lambda: [runtime._forward([t]) for t in steps])
            print(json.dumps({"round": rnd, "torch_threads": count,
                              "numba_threads": numba.get_num_threads(), "busy": args.busy, "load": load_avg,
                              "prompt_tps": len(prompt) / p_wall, "prompt_cpu_per_token": p_cpu / len(prompt),
                              "prompt_wall": p_wall, "prompt_cpu": p_cpu, "decode_tps": len(steps) / d_wall,
                              "decode_cpu_per_token": d_cpu / len(steps), **per_call}), flush=True)


if __name__ == "__main__":
    main()
