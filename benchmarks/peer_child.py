"""One peer system measured in this process; prints one JSON line. Run by run_all.py, one child per configuration.

    python benchmarks/peer_child.py transformers HF_DIR --dtype bfloat16 [--offload-cpu-bytes N --offload-dir D]
    python benchmarks/peer_child.py llamacpp MODEL.gguf [--no-repack] [--no-mmap]
    ... [--decode-tokens 64] [--decode-prompt-tokens 16] [--prompt-tokens 256] [--repeats 3] [--check-tokens N]

The protocol is mixtral_offload.benchmark's: an untimed warm-up, then per repeat a decode run (greedy,
a fixed number of tokens after a short prompt; tokens/s over the steps after the first token) and a
prompt run (time to the first token of a long prompt). Disk bytes per token are this process's
/proc/self/io read_bytes over the decode run. --check-tokens instead prints the greedy tokens and
the logits after the prompt, for the correctness check.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import THREADS, prompt_ids  # noqa: E402


def rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def disk_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


class TransformersSystem:
    def __init__(self, args):
        import torch
        from transformers import MixtralForCausalLM

        torch.set_num_threads(THREADS)
        self.torch = torch
        self.baseline = rss()
        dtype = getattr(torch, args.dtype)
        kwargs = {}
        if args.offload_cpu_bytes:  # accelerate: what does not fit in max_memory goes to disk
            kwargs = dict(device_map="auto", max_memory={"cpu": args.offload_cpu_bytes},
                          offload_folder=args.offload_dir or str(Path(args.model).parent / "offload"))
        self.model = MixtralForCausalLM.from_pretrained(args.model, dtype=dtype, **kwargs).eval()
        if args.offload_cpu_bytes:
            placement = getattr(self.model, "hf_device_map", {})
            self.placement = {where: list(placement.values()).count(where) for where in set(placement.values())}

    def run(self, ids: list[int], new_tokens: int):
        """(tokens, seconds to the first token, seconds of the remaining steps)."""
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            def __init__(self):
                self.times, self.tokens = [], []

            def put(self, value):
                self.times.append(time.perf_counter())
                self.tokens.append(value)

            def end(self):
                pass

        clock = Clock()
        x = self.torch.tensor([ids])
        with self.torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(x, attention_mask=self.torch.ones_like(x), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0,
                                      eos_token_id=None)
        tokens = out[0, len(ids):].tolist()
        return tokens, clock.times[1] - start, clock.times[-1] - clock.times[1]

    def last_logits(self, ids: list[int]) -> list[float]:
        with self.torch.inference_mode():
            return self.model(self.torch.tensor([ids])).logits[0, -1].float().tolist()


class LlamaCppSystem:
    def __init__(self, args, n_ctx: int = 512, **llama_kwargs):
        import llama_cpp

        self.baseline = rss()
        if args.no_repack:  # keep Q4_0 in the mapped file instead of repacking it into anonymous memory
            defaults = llama_cpp.llama_model_default_params

            def params():
                p = defaults()
                p.use_extra_bufts = False
                return p

            llama_cpp.llama_model_default_params = params
            import llama_cpp.llama as llama_module

            llama_module.llama_cpp.llama_model_default_params = params
        self.llm = llama_cpp.Llama(model_path=args.model, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=THREADS,
                                   n_threads_batch=THREADS, use_mmap=not args.no_mmap, use_mlock=False,
                                   verbose=False, **llama_kwargs)
        self.np = __import__("numpy")

    def run(self, ids: list[int], new_tokens: int):
        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        tokens, first = [], None
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(int(token))
            if first is None:
                first = time.perf_counter()
            if len(tokens) == new_tokens:
                break
        return tokens, first - start, time.perf_counter() - first

    def last_logits(self, ids: list[int]) -> list[float]:
        self.llm.reset()
        self.llm.eval(ids)  # without logits_all the last row's logits stay in the context, not in llm.scores
        vocab = self.llm.n_vocab()
        return self.np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(vocab,)).astype(float).tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=["transformers", "llamacpp"])
    parser.add_argument("model")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--offload-cpu-bytes", type=int, default=0)
    parser.add_argument("--offload-dir", default=None)
    parser.add_argument("--no-repack", action="store_true")
    parser.add_argument("--no-mmap", action="store_true")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--decode-prompt-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-tokens", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    system = (TransformersSystem if args.system == "transformers" else LlamaCppSystem)(args)
    load_seconds = time.perf_counter() - start
    decode_prompt, long_prompt = prompt_ids(args.decode_prompt_tokens), prompt_ids(args.prompt_tokens)
    if args.check_tokens:
        tokens, _, _ = system.run(decode_prompt, args.check_tokens)
        print(json.dumps({"tokens": tokens, "logits": system.last_logits(decode_prompt)}))
        return
    system.run(decode_prompt[:4], 2)  # untimed warm-up
    decode_runs, prompt_runs = [], []
    for _ in range(args.repeats):
        disk_before = disk_read_bytes()
        tokens, _, seconds = system.run(decode_prompt, args.decode_tokens + 1)
        decode_runs.append(args.decode_tokens / seconds)
        disk_per_token = (disk_read_bytes() - disk_before) / (args.decode_tokens + 1)
        _, first_seconds, _ = system.run(long_prompt, 1)
        prompt_runs.append(args.prompt_tokens / first_seconds)
    print(json.dumps({
        "decode_tps": statistics.median(decode_runs), "decode_tps_runs": decode_runs,
        "prompt_tps": statistics.median(prompt_runs), "prompt_tps_runs": prompt_runs,
        "decode_tokens": args.decode_tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
        "baseline_rss": system.baseline, "load_seconds": load_seconds, "disk_bytes_per_token": disk_per_token,
        "peak_rss_hwm": rss("VmHWM"), "placement": getattr(system, "placement", None), "first_tokens": tokens[:8],
    }))


if __name__ == "__main__":
    main()
