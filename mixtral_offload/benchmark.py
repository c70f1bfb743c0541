"""Decode and prompt speed of this runtime, one configuration per fresh child process.

Used by `mixtral-offload bench decode` and by benchmarks/run_all.py. `measure_in_child(spec)` runs
`python -m mixtral_offload.benchmark SPEC_JSON` and returns its result dict with the child's peak
RSS (from the kernel's rusage at exit, so it counts the load, the prompt and the decode; the calling
process must stay small, as a child's ru_maxrss starts at its parent's RSS; `peak_rss_hwm` is the
child's own VmHWM as a cross-check):

    {"label": str, "model": str, "budget": int|None, "experts_fraction": float|None, "threads": int,
     "decode_tps": float, "decode_tps_runs": [float], "prompt_tps": float, "prompt_tps_runs": [float],
     "decode_prompt_tokens": int, "decode_tokens": int, "prompt_tokens": int,
     "baseline_rss": int, "peak_rss": int, "slots": int|None, "total_experts": int,
     "hit_rate": float|None, "cache_bytes_per_token": float|None, "disk_bytes_per_token": float,
     "misses_per_token", "prefetches_per_token", "prefetch_hits_per_token", "prefetch_waste_per_token",
     "low_bit_bytes_per_token" (reads of the pool's low-bit copy, --miss-bits): float|None,
     "active_bytes_per_token": int, "load_seconds": float, "exit_code": int,
     "peak_rss_hwm": int, "floor_tps": float, "prompt_macs_per_token": int, "prompt_ceiling_tps": float,
     "routing_trace": str|None}

Speeds are medians over `repeats`; cache figures come from the decode phase of the last repeat
(the cache is warm from the earlier ones, as in a long chat), per forward pass of that phase
(the 16-token prompt's pass included). `hit_rate` counts prefetch hits as hits: the bytes per
token say what the prefetches cost. `disk_bytes_per_token` is the
child's /proc/self/io read_bytes over that phase: zero when the files sit in the page cache.
`prompt_ceiling_tps` is the compute ceiling of prompt speed: the measured int8 multiply-accumulate
peak (quant/compute_peak.py, report key `int8_peak_gmacs`) over the multiply-accumulates of one
prompt token's projections (attention, router and top_k experts in every layer; no attention scores).
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROMPT_SEED = 1234


@dataclass
class DecodeSpec:
    """One configuration to measure."""

    model: str
    label: str = ""
    budget: str | int | None = None        # bytes or '2GiB'
    experts_fraction: float | None = None  # instead of budget: a budget whose cache holds this fraction
    prompt_tokens: int = 256               # the prompt-speed run
    decode_prompt_tokens: int = 16         # the prompt before the decode-speed run
    decode_tokens: int = 64
    repeats: int = 3
    threads: int = 2
    dtype: str = "auto"
    policy: str = "density"                # the load default (cache/policies.py DEFAULT_POLICY)
    prefetch: bool = True
    activations: str = "int8"              # the CPU kernels' input: int8 or float32 (see load())
    dense: str = "auto"                    # attention/output weights: auto, stored or int8 (see load())
    routing_trace: str | None = None       # route by this trace file (offload/trace_routing.py)
    miss_bits: str = "auto"                # which misses read the pool's low-bit copy (see load())


def machine_info() -> dict:
    """CPU model, core count, the CPU flags that matter to the kernels, RAM and the load average."""
    info = {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    try:
        text = Path("/proc/cpuinfo").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu_model"] = fields.get("model name", "?")
        flags = set(fields.get("flags", "").split())
        info["cpu_flags"] = sorted(flags & {"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni",
                                            "avx512_bf16", "amx_tile", "sse4_2"})
    except OSError:
        pass
    try:
        import psutil

        info["ram_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    return info


def child_env(threads: int) -> dict[str, str]:
    """Environment for a child that should use `threads` threads in Numba, OpenMP and torch.

    The OpenMP wait settings this package gives itself are left out: a peer runs with its own defaults
    (a child of this runtime sets them again when it imports the package).
    """
    from . import OPENMP_SET_HERE

    env = {name: value for name, value in os.environ.items() if name not in OPENMP_SET_HERE}
    for name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    return env


def run_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str, int]:
    """Run argv; return (exit code, stdout, stderr, peak RSS in bytes of that child from wait4's rusage)."""
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        err = errors.read()
    return proc.returncode, out, err, usage.ru_maxrss * 1024


def measure_in_child(spec: DecodeSpec) -> dict:
    """Measure spec in a fresh `python -m mixtral_offload.benchmark` child; see the module docstring."""
    argv = [sys.executable, "-m", "mixtral_offload.benchmark", json.dumps(dataclasses.asdict(spec))]
    code, out, err, peak = run_child(argv, env=child_env(spec.threads))
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        last = err.strip().splitlines()[-1] if err.strip() else ""
        return {"label": spec.label, "model": spec.model, "exit_code": code, "peak_rss": peak,
                "error": f"child exited with {code}: {last}"}
    result = json.loads(lines[-1])
    result.update(peak_rss=peak, exit_code=code)
    return result


def measure_bandwidth_in_child(threads: int) -> float:
    """Read bandwidth in GB/s at `threads` (quant.bench's 1 GiB sum), measured in a child process.

    A child, so that this process stays small: a child's ru_maxrss starts from the RSS of the
    process that spawned it, and a 1 GiB array here would show up as every child's peak.
    """
    return _measure_in_child("from mixtral_offload.quant.bench import _threads, measure_read_bandwidth as m\n"
                             "with _threads(int(sys.argv[1])): print(m(int(sys.argv[1])))", threads)


def measure_peak_in_child(threads: int) -> float:
    """The int8 multiply-accumulate peak in G/s at `threads` (quant.compute_peak), in a child process
    (Numba's compiler stays out of this process, as the bandwidth probe's array does)."""
    return _measure_in_child("from mixtral_offload.quant.compute_peak import measure_int8_peak as m\n"
                             "print(m(int(sys.argv[1])))", threads)


def _measure_in_child(code: str, threads: int) -> float:
    """The last number `code` prints, run as `python -c` with sys imported and `threads` as argv[1]."""
    out = subprocess.run([sys.executable, "-c", "import sys\n" + code, str(threads)], env=child_env(threads),
                         check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def prompt_macs_per_token(args) -> int:
    """Multiply-accumulates of one prompt token's projections: attention, router and top_k experts per layer."""
    attention = args.hidden_size * args.head_dim * (2 * args.num_attention_heads + 2 * args.num_key_value_heads)
    experts = args.num_experts_per_tok * 3 * args.hidden_size * args.intermediate_size
    return args.num_hidden_layers * (attention + args.hidden_size * args.num_local_experts + experts)


def floor_tokens_per_second(active_bytes_per_token: int, bandwidth_gbs: float) -> float:
    """The bandwidth floor as a speed: tokens/s if every active byte were read once at full bandwidth."""
    return bandwidth_gbs * 1e9 / active_bytes_per_token


def decode_report(specs: list[DecodeSpec], bandwidth_gbs: float | None = None, log=None) -> dict:
    """Measure every spec in its own child; add the bandwidth floor, the machine and the load average."""
    machine = machine_info()
    if bandwidth_gbs is None:
        bandwidth_gbs = measure_bandwidth_in_child(specs[0].threads if specs else 2)
    peak_gmacs = measure_peak_in_child(specs[0].threads if specs else 2)
    results = []
    for spec in specs:
        if log:
            log(f"measuring {spec.label or spec.model} ...")
        result = measure_in_child(spec)
        if result.get("active_bytes_per_token"):
            result["floor_tps"] = floor_tokens_per_second(result["active_bytes_per_token"], bandwidth_gbs)
        if result.get("prompt_macs_per_token"):
            result["prompt_ceiling_tps"] = peak_gmacs * 1e9 / result["prompt_macs_per_token"]
        results.append(result)
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine, "bandwidth_gbs": bandwidth_gbs,
            "int8_peak_gmacs": peak_gmacs, "results": results}


def format_decode_report(report: dict) -> str:
    """A text table of decode_report()'s result."""
    from .config import format_size

    m = report["machine"]
    lines = [f"{report['date']}  {m.get('cpu_model', '?')} x{m['cpus']}  read bandwidth "
             f"{report['bandwidth_gbs']:.1f} GB/s  int8 peak {report['int8_peak_gmacs']:.0f} G MAC/s  "
             f"load average {m['load_average'][0]:.2f} -> "
             f"{m['load_average_after'][0]:.2f}",
             f"{'configuration':<18} {'decode tok/s':>12} {'prompt tok/s':>12} {'ceiling':>8} {'floor tok/s':>11} "
             f"{'peak RSS':>10} {'budget':>10} {'slots':>9} {'hit rate':>8} {'read/token':>10}"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"{r['label']:<18} failed: {r['error']}")
            continue
        slots = f"{r['slots']}/{r['total_experts']}" if r.get("slots") is not None else "all"
        lines.append(
            f"{r['label']:<18} {r['decode_tps']:>12.2f} {r['prompt_tps']:>12.1f} "
            f"{r.get('prompt_ceiling_tps', 0):>8.1f} {r.get('floor_tps', 0):>11.1f} "
            f"{format_size(r['peak_rss']):>10} {format_size(r['budget']) if r['budget'] else '-':>10} {slots:>9} "
            f"{'-' if r['hit_rate'] is None else format(r['hit_rate'], '.2f'):>8} "
            f"{'-' if r['cache_bytes_per_token'] is None else format_size(r['cache_bytes_per_token']):>10}")
    return "\n".join(lines)


# -- the child's side ---------------------------------------------------------------------------
def prompt_ids(vocab: int, count: int) -> list[int]:
    """BOS then deterministic pseudo-random ordinary token ids."""
    import numpy as np

    rng = np.random.default_rng(PROMPT_SEED)
    return [1] + rng.integers(3, min(vocab, 32000), count - 1).tolist()


def _disk_read_bytes() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _active_bytes(args, source, itemsize: int, dense_format: str = "stored") -> int:
    """Bytes one decode step must read: every dense weight but the embedding table (int8 where
    `--dense int8` holds it so), plus top_k experts per layer."""
    from .offload.memory_plan import dense_nbytes

    dense = dense_nbytes(args, itemsize, quantized=dense_format == "int8")
    if not args.tie_word_embeddings:  # a step gathers one row of the table, not the table
        dense -= itemsize * args.vocab_size * args.hidden_size
    return dense + args.num_hidden_layers * args.num_experts_per_tok * source.block_nbytes


def run_spec(spec: DecodeSpec) -> dict:
    """Measure spec in this process (the child's side of measure_in_child)."""
    import numba
    import torch

    from .offload.loading import load
    from .quant.linear import QuantizedLinear
    from .offload.memory_plan import current_rss

    numba.set_num_threads(min(spec.threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(spec.threads)
    path = Path(spec.model)
    max_context = max(spec.prompt_tokens, spec.decode_prompt_tokens + spec.decode_tokens + 1) + 8
    baseline = current_rss()
    start = time.perf_counter()
    runtime = load(path, dtype=spec.dtype, max_context=max_context, memory_budget=spec.budget,
                   experts_fraction=spec.experts_fraction, policy=spec.policy, prefetch=spec.prefetch,
                   activations=spec.activations, dense=spec.dense, miss_bits=spec.miss_bits,
                   routing_trace=spec.routing_trace)
    budget = runtime.memory_plan.budget if runtime.memory_plan else None
    load_seconds = time.perf_counter() - start
    runtime.tokenizer.eos_id = -1  # a fixed number of tokens: a random model may pick </s> at any step
    vocab = runtime.args.vocab_size
    decode_prompt = prompt_ids(vocab, spec.decode_prompt_tokens)
    long_prompt = prompt_ids(vocab, spec.prompt_tokens)
    stats = runtime.cache_stats()
    decode_runs, prompt_runs, cache = [], [], {}
    list(runtime.generate(decode_prompt[:4], max_new_tokens=2))  # untimed: first kernel calls, thread start
    for _ in range(spec.repeats):
        runtime.reset()
        before = (sum(stats.hits), sum(stats.misses), stats.bytes_read, stats.prefetches, stats.prefetch_hits,
                  stats.prefetch_waste, stats.low_bit_bytes) if stats else None
        disk_before = _disk_read_bytes()
        records = list(runtime.generate(decode_prompt, max_new_tokens=spec.decode_tokens + 1))
        steps = records[-1].index  # forwards timed after the first token
        decode_runs.append(steps / (records[-1].elapsed_seconds - records[-1].prompt_seconds))
        cache = {"disk_bytes_per_token": (_disk_read_bytes() - disk_before) / steps}
        if stats:  # counts include the prompt's forward; hit rate and bytes are per decode step
            hits, misses, nbytes = (sum(stats.hits) - before[0], sum(stats.misses) - before[1],
                                    stats.bytes_read - before[2])
            cache.update(hit_rate=hits / max(1, hits + misses), cache_bytes_per_token=nbytes / (steps + 1),
                         misses_per_token=misses / (steps + 1),
                         prefetches_per_token=(stats.prefetches - before[3]) / (steps + 1),
                         prefetch_hits_per_token=(stats.prefetch_hits - before[4]) / (steps + 1),
                         prefetch_waste_per_token=(stats.prefetch_waste - before[5]) / (steps + 1),
                         low_bit_bytes_per_token=(stats.low_bit_bytes - before[6]) / (steps + 1))
        runtime.reset()
        record = next(iter(runtime.generate(long_prompt, max_new_tokens=1)))
        prompt_runs.append(spec.prompt_tokens / record.prompt_seconds)
    source = runtime.model.experts.source  # a converted model's pool
    dense_held = "int8" if isinstance(runtime.model.layers[0].wq, QuantizedLinear) else "stored"  # what auto chose
    itemsize = torch.empty((), dtype=runtime.model.dtype).element_size()
    return {
        "label": spec.label, "model": str(path), "experts_fraction": spec.experts_fraction,
        "budget": budget,
        "threads": spec.threads, "policy": spec.policy if stats else None, "activations": spec.activations, "dense": dense_held,
        "routing_trace": spec.routing_trace,
        "decode_tps": statistics.median(decode_runs), "decode_tps_runs": decode_runs,
        "prompt_tps": statistics.median(prompt_runs), "prompt_tps_runs": prompt_runs,
        "decode_prompt_tokens": spec.decode_prompt_tokens, "decode_tokens": spec.decode_tokens,
        "prompt_tokens": spec.prompt_tokens, "baseline_rss": baseline, "load_seconds": load_seconds,
        "prompt_macs_per_token": prompt_macs_per_token(runtime.args),
        "slots": runtime.memory_plan.slots if runtime.memory_plan else None,
        "total_experts": runtime.args.num_hidden_layers * runtime.args.num_local_experts,
        "hit_rate": cache.get("hit_rate"), "cache_bytes_per_token": cache.get("cache_bytes_per_token"),
        "disk_bytes_per_token": cache["disk_bytes_per_token"],
        **{k: cache.get(k) for k in ("misses_per_token", "prefetches_per_token", "prefetch_hits_per_token",
                                     "prefetch_waste_per_token", "low_bit_bytes_per_token")},
        "active_bytes_per_token": _active_bytes(runtime.args, source, itemsize, dense_held),
        "peak_rss_hwm": _peak_rss_hwm(),
    }


def _peak_rss_hwm() -> int:
    """This process's VmHWM (peak RSS since exec) in bytes: a cross-check of the parent's wait4 figure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    from .errors import MixtralOffloadError

    try:
        result = run_spec(DecodeSpec(**json.loads(sys.argv[1])))
    except MixtralOffloadError as exc:  # the parent reports the last line of stderr
        sys.exit(f"error: {exc}")
    print(json.dumps(result), flush=True)
