"""Prompt speed at Mixtral width: this runtime against llama.cpp on the same weights, warm and under limits.

    python benchmarks/width_prompt.py MODEL Q4_0.gguf [--prompts 256 1024] [--limits 3GiB] [--repeats 2]
        [--no-warm] [--systems runtime llamacpp] [--read-gib 1]

MODEL: this runtime's model, a pool directory or a GGUF file (it then reads its experts from the GGUF,
as the 32-layer geometry runs: the same file as llama.cpp's). Each run is a fresh width_child.py (one
teacher-forced prompt of N distinct token ids, timed to its logits: time to first token; then one
decode step), systems alternating within each setting: "warm" (no limit, the system's files read
through into the page cache just before, as a limited run evicts them; this runtime with every expert
on the mapped file, llama.cpp's default, which repacks Q4_0; --no-warm skips it) and per limit a cgroup
v1 memory limit with the files evicted first (mixtral_width.limited_run; this runtime with
--memory-budget = the limit, llama.cpp mmap with repack off). First dd's read rates of MODEL's expert
file (read_rates.py, --read-gib of it, cold). Per run:
prompt tok/s and its share of the int8 compute peak measured here (compute_peak.py, 2 threads),
prompt tokens per CPU-second of the child and their share of the per-CPU-second peak (what a loaded,
time-shared machine cannot inflate), bytes read during the prompt (/proc), and for this runtime under
a limit the bytes of the experts the prompt ran (one piece: its hits and misses) and the time to first
token over those bytes at dd's O_DIRECT rate; --json keeps all.
Columns: prompt tokens | setting | system | run | tok/s | of peak | tok/CPU-s | of peak | TTFT s |
prompt read GB | experts run GB | cache read GB | TTFT / (experts run / dd) | cgroup peak MiB | load.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import THREADS, python_child, run_json_child  # noqa: E402
from mixtral_width import limited_run, uptime  # noqa: E402
from read_rates import measure as measure_read_rates  # noqa: E402

from mixtral_offload.config import parse_size  # noqa: E402
from mixtral_offload.offload.runtime import PREFILL_CHUNK  # noqa: E402
from mixtral_offload.quant.compute_peak import measure_int8_peak  # noqa: E402


def macs_per_token(config: dict, layers: int) -> float:
    """Multiply-accumulates of one prompt token in this runtime's projections: attention, router, top-k experts."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    attention = hidden * (2 * hidden + 2 * config["num_key_value_heads"] * head_dim)
    experts = config["num_experts_per_tok"] * 3 * hidden * inter
    return layers * (attention + hidden * config["num_local_experts"] + experts)


def model_config(model: Path) -> dict:
    """config.json of a pool directory, or the model arguments of a GGUF file."""
    if model.is_dir():
        return json.loads((model / "config.json").read_text())
    from mixtral_offload.offload.store.gguf import GGUFModel

    return dataclasses.asdict(GGUFModel.open(model).args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="this runtime's pool directory, or a GGUF file")
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--prompts", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--limits", nargs="*", default=["3GiB"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-warm", action="store_true", help="only the limits")
    parser.add_argument("--systems", nargs="+", choices=["runtime", "llamacpp"], default=["runtime", "llamacpp"])
    parser.add_argument("--read-gib", type=float, default=1.0, help="bytes of MODEL's expert file dd reads")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    config = model_config(args.model)
    macs = macs_per_token(config, config["num_hidden_layers"])
    rates = measure_read_rates(args.model, int(args.read_gib * 2**30), [])
    peak = measure_int8_peak(THREADS) * 1e9
    core_peak = measure_int8_peak(1, clock=time.process_time) * 1e9
    print(f"compute peak {peak / 1e9:.0f} G MAC/s at {THREADS} threads, {core_peak / 1e9:.0f} per CPU-second "
          f"({uptime()}); {macs / 1e9:.2f} G MAC per prompt token; dd over {rates['bytes'] / 1e9:.1f} GB, cold: "
          f"buffered {rates['dd_buffered_gbs']:.2f} GB/s, O_DIRECT {rates['dd_direct_gbs']:.2f} GB/s",
          file=sys.stderr, flush=True)
    runs = []
    for tokens in args.prompts:
        token_args = ["--prompt-tokens", str(tokens), "--warmup-tokens", "0", "--decode-tokens", "1"]
        for setting in ([] if args.no_warm else ["warm"]) + args.limits:
            budget = [] if setting == "warm" else ["--budget", str(parse_size(setting))]
            systems = [("this runtime", python_child("width_child.py", "runtime", str(args.model), *budget,
                                                     *token_args), [args.model]),
                       ("llama.cpp", python_child("width_child.py", "llamacpp", str(args.gguf), *token_args,
                                                  *([] if setting == "warm" else ["--no-repack"])), [args.gguf])]
            systems = [system for system, key in zip(systems, ["runtime", "llamacpp"]) if key in args.systems]
            for repeat in range(args.repeats):
                for name, argv, files in systems:
                    if setting == "warm":
                        read_through(files)  # a limited run before evicted them: warm means in the page cache
                        before = uptime()
                        result = run_json_child(argv)
                        result.update(name=name, uptime_before=before, uptime_after=uptime())
                    else:
                        result = limited_run(name, argv, parse_size(setting), files)
                    result.update(setting=setting, repeat=repeat + 1, tokens=tokens)
                    if "prompt_seconds" in result:
                        rate, cpu_rate = tokens / result["prompt_seconds"], tokens / result["prompt_cpu_seconds"]
                        result.update(prompt_tps=rate, of_peak=rate * macs / peak, prompt_tps_per_cpu=cpu_rate,
                                      of_core_peak=cpu_rate * macs / core_peak)
                    counters = result.get("prompt_counters") or {}
                    if counters and tokens <= PREFILL_CHUNK:  # one piece: each expert it ran is one hit or miss
                        result["experts_run_bytes"] = (counters["hits"] + counters["misses"]) * result["expert_bytes"]
                    runs.append(result)
                    print(row(result, rates["dd_direct_gbs"] * 1e9), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"peak_gmacs": peak / 1e9, "core_peak_gmacs": core_peak / 1e9,
                                         "macs_per_token": macs, "read_rates": rates, "runs": runs}, indent=2))


def read_through(paths: list[Path]) -> None:
    """Read every regular file at paths (a file, or a directory's files) once, into the page cache."""
    for path in paths:
        for file in ([path] if path.is_file() else sorted(path.iterdir())):
            if file.is_file():
                with open(file, "rb", buffering=0) as stream:
                    while stream.read(16 << 20):
                        pass


def gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def row(r: dict, dd_rate: float) -> str:
    load = f"{r['uptime_before'].split('average:')[-1].split(',')[0].strip()} -> " \
           f"{r['uptime_after'].split('average:')[-1].split(',')[0].strip()}"
    if "prompt_tps" not in r:
        why = "OOM-killed" if r.get("oom_killed") else str(r.get("error", "failed"))[:80]
        return f"| {r['tokens']} | {r['setting']} | {r['name']} | {r['repeat']} | {why} |" + " - |" * 10 + f" {load} |"
    peak = f"{r['max_usage'] / 2**20:.0f}" if "max_usage" in r else "-"
    needed = r.get("experts_run_bytes")
    over_dd = "-" if not needed else f"{r['prompt_seconds'] / (needed / dd_rate):.2f}"
    return (f"| {r['tokens']} | {r['setting']} | {r['name']} | {r['repeat']} | {r['prompt_tps']:.1f} | "
            f"{r['of_peak']:.0%} | {r['prompt_tps_per_cpu']:.1f} | {r['of_core_peak']:.0%} | "
            f"{r['prompt_seconds']:.2f} | {gb(r.get('prompt_disk_bytes'))} | {gb(needed)} | "
            f"{gb((r.get('prompt_counters') or {}).get('bytes_read'))} | {over_dd} | {peak} | {load} |")


if __name__ == "__main__":
    main()
