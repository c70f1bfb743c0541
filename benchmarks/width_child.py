"""One system fed a fixed token sequence (teacher-forced), in this process; prints one JSON line. Run by mixtral_width.py.

    python benchmarks/width_child.py runtime MODEL_DIR [--budget 3GiB] [--exact] [--miss-bits auto [--miss-gate 0.5 [--miss-rank 1]]]
        [--routing-trace FILE]
    python benchmarks/width_child.py llamacpp MODEL.gguf [--no-repack] [--exact]
    ... [--prompt-tokens 16] [--warmup-tokens 4] [--decode-tokens 32] [--prompt-lengths 64 256] [--logits]

The sequence is BOS then distinct seeded token ids (greedy decoding of random weights repeats one
token, so every step would route to the same experts). The prompt is one forward pass (this runtime:
layer by layer in pieces, as generate() prefills); the next warmup tokens are fed one at a time untimed,
then decode-tokens one at a time timed. Bytes read: this process's /proc/self/io read_bytes over the
prompt, and per token over the timed steps. For this runtime under a budget:
hit rate (prefetch hits count as hits), misses, prefetches used and wasted, bytes the cache read, per token.
--prompt-lengths: after the decode, per length N the sequence is forgotten and N fresh distinct ids
are fed as one prompt (this runtime: as generate() prefills), timed to its logits: time to first token.
--exact: the float32 paths (runtime: --activations float32 --dense stored, dtype float32; llama.cpp:
F32 KV cache); --logits: print the logits after the prompt and after each warm-up token instead.
--miss-bits: as the CLI's; --miss-gate G and --miss-rank R replace the rule by MissRule(G, R) (cache/miss_choice.py;
benchmarks/miss_bits_width.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import THREADS  # noqa: E402
from peer_child import LlamaCppSystem, disk_read_bytes, rss  # noqa: E402

SEED = 4321
GGML_TYPE_F32 = 0


def forced_ids(vocab: int, count: int) -> list[int]:
    """BOS, then count - 1 distinct seeded ordinary token ids."""
    rng = np.random.default_rng(SEED)
    return [1] + rng.choice(np.arange(3, vocab), count - 1, replace=False).tolist()


class Runtime:
    """This runtime, loaded as a user would (--memory-budget), or on its exact float32 paths."""

    def __init__(self, args):
        import numba
        import torch

        from mixtral_offload.offload.loading import load

        numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))
        torch.set_num_threads(THREADS)
        self.torch = torch
        self.baseline = rss()
        exact = dict(dtype="float32", activations="float32", dense="stored") if args.exact else {}
        self.runtime = load(args.model, max_context=args.context, memory_budget=args.budget, miss_bits=args.miss_bits,
                            routing_trace=args.routing_trace, **exact)
        self.stats = self.runtime.cache_stats()
        if args.miss_gate is not None:
            from mixtral_offload.cache.miss_choice import MissRule

            self.runtime.model.experts.low_bit.rule = MissRule(args.miss_gate, args.miss_rank)
        self.vocab = self.runtime.args.vocab_size

    def feed(self, ids: list[int]) -> np.ndarray:
        """Logits [V] after feeding ids after what was fed before, as a prompt goes: layer by layer in
        pieces of PREFILL_CHUNK tokens (the memory plan's work buffers hold one piece)."""
        from mixtral_offload.offload.runtime import PREFILL_CHUNK

        return self.runtime._forward(ids, last_only=True, chunk=PREFILL_CHUNK)[-1].float().numpy()

    def prompt(self, ids: list[int]) -> None:
        """A new sequence: ids prefilled as generate() does (chunks of PREFILL_CHUNK)."""
        self.runtime.reset()
        self.runtime._prefill(ids)

    def counters(self) -> dict:
        if self.stats is None:
            return {}
        s = self.stats
        return {"hits": sum(s.hits), "misses": sum(s.misses), "bytes_read": s.bytes_read,
                "prefetches": s.prefetches, "prefetch_hits": s.prefetch_hits, "prefetch_waste": s.prefetch_waste,
                "low_bit": s.low_bit, "low_bit_bytes": s.low_bit_bytes, "wait_seconds": s.wait_seconds,
                "low_bit_prefetches": s.low_bit_prefetches, "low_bit_prefetch_waste": s.low_bit_prefetch_waste}

    def describe(self) -> dict:
        experts = self.runtime.model.experts
        if self.stats is None:
            return {}
        return {"expert_bytes": experts.source.block_nbytes, "slots": self.runtime.memory_plan.slots,
                "low_bit_expert_bytes": experts.low_bit.source.block_nbytes if experts.low_bit else None,
                "total_experts": self.runtime.args.num_hidden_layers * self.runtime.args.num_local_experts}


class LlamaCpp:
    """llama.cpp through llama-cpp-python (peer_child's loader), fed with llama_eval."""

    def __init__(self, args):
        exact = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False) if args.exact else {}
        self.system = LlamaCppSystem(args, n_ctx=max(512, args.context), **exact)
        self.baseline, self.llm = self.system.baseline, self.system.llm
        self.vocab = self.llm.n_vocab()
        self.llm.reset()

    def feed(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,)).copy()

    def prompt(self, ids: list[int]) -> None:
        """A new sequence: ids evaluated in one batch (n_batch 512)."""
        self.llm.reset()
        self.llm.eval(ids)

    def counters(self) -> dict:
        return {}

    def describe(self) -> dict:
        return {}


def per_token(after: dict, before: dict, steps: int) -> dict:
    """Cache counters over the timed steps, per token, and the demand-miss floor beside the bytes read."""
    if not after:
        return {}
    d = {k: after[k] - before[k] for k in after}
    return {"hit_rate": d["hits"] / max(1, d["hits"] + d["misses"]), "misses_per_token": d["misses"] / steps,
            "cache_bytes_per_token": d["bytes_read"] / steps, "prefetches_per_token": d["prefetches"] / steps,
            "prefetch_hits_per_token": d["prefetch_hits"] / steps,
            "prefetch_waste_per_token": d["prefetch_waste"] / steps, "low_bit_per_token": d["low_bit"] / steps,
            "low_bit_bytes_per_token": d["low_bit_bytes"] / steps,
            "low_bit_prefetches_per_token": d["low_bit_prefetches"] / steps,
            "low_bit_prefetch_waste_per_token": d["low_bit_prefetch_waste"] / steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=["runtime", "llamacpp"])
    parser.add_argument("model")
    parser.add_argument("--budget", default=None)
    parser.add_argument("--no-repack", action="store_true")
    parser.add_argument("--miss-bits", default="auto")
    parser.add_argument("--miss-gate", type=float, default=None)
    parser.add_argument("--miss-rank", type=int, default=2)
    parser.add_argument("--no-mmap", action="store_true")
    parser.add_argument("--exact", action="store_true")
    parser.add_argument("--routing-trace", default=None, help="runtime: route by this trace (bench decode's option)")
    parser.add_argument("--logits", action="store_true")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--warmup-tokens", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prompt-lengths", type=int, nargs="*", default=[])
    args = parser.parse_args()
    args.context = max([args.prompt_tokens + args.warmup_tokens + args.decode_tokens, *args.prompt_lengths]) + 8

    refused: tuple = ()  # llama.cpp's child never imports mixtral_offload (it sets OpenMP waits on import)
    if args.system == "runtime":
        from mixtral_offload.errors import MixtralOffloadError

        refused = (MixtralOffloadError,)
    start = time.perf_counter()
    try:
        system = (Runtime if args.system == "runtime" else LlamaCpp)(args)
    except refused as exc:  # e.g. a budget below the minimum: one line for the parent's table
        sys.exit(f"error: {exc}")
    load_seconds = time.perf_counter() - start
    ids = forced_ids(system.vocab, args.prompt_tokens + args.warmup_tokens + args.decode_tokens)
    prompt, warmup = ids[:args.prompt_tokens], ids[args.prompt_tokens:args.prompt_tokens + args.warmup_tokens]
    start, cpu_start, disk_start = time.perf_counter(), time.process_time(), disk_read_bytes()
    logits = [system.feed(prompt)]
    prompt_seconds, prompt_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    prompt_disk_bytes = disk_read_bytes() - disk_start
    prompt_counters = system.counters()  # what the prompt's pass read (each expert once, ideally)
    logits += [system.feed([token]) for token in warmup]
    if args.logits:
        print(json.dumps({"logits": np.stack(logits).tolist()}))
        return
    timed = ids[args.prompt_tokens + args.warmup_tokens:]
    disk_before, counters_before = disk_read_bytes(), system.counters()
    step_seconds = []
    for token in timed:
        start = time.perf_counter()
        system.feed([token])
        step_seconds.append(time.perf_counter() - start)
    seconds = sum(step_seconds)
    steps = len(timed)
    result = {"decode_tps": steps / seconds, "decode_tokens": steps, "prompt_tokens": args.prompt_tokens,
              "warmup_tokens": args.warmup_tokens, "load_seconds": load_seconds, "prompt_seconds": prompt_seconds,
              "prompt_cpu_seconds": prompt_cpu_seconds, "prompt_counters": prompt_counters,
              "prompt_disk_bytes": prompt_disk_bytes,
              "slowest_step_seconds": max(step_seconds), "baseline_rss": system.baseline, "peak_rss_hwm": rss("VmHWM"),
              "disk_bytes_per_token": (disk_read_bytes() - disk_before) / steps}
    result.update(per_token(system.counters(), counters_before, steps))
    for length in args.prompt_lengths:
        start = time.perf_counter()
        system.prompt(forced_ids(system.vocab, length))
        result[f"prompt{length}_tps"] = length / (time.perf_counter() - start)
    result.update(system.describe())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
