"""This runtime against llama.cpp on the same weights at full Mixtral width, each under a hard memory limit.

    python benchmarks/mixtral_width.py [--layers 8] [--limits 3GiB 5GiB none] [--repeats 3] [--json OUT]
        [--prompt-lengths 64 256] [--gguf A.gguf B.gguf] [--routing-trace FILE|synthetic]

One command: `mixtral-offload synth` writes an int4 g64 pool at Mixtral-8x7B width (hidden 4096,
intermediate 14336, 8 experts top-2, 32/8 heads) with --layers layers, to_gguf.py writes the same
weights as a Q4_0 GGUF. First the exactness check: a small synth model and its F32 GGUF must give
llama.cpp logits equal to this runtime's --activations float32 --dense stored within 1e-4 (max
|difference| over max |logit|, after the prompt and each of 4 more tokens). Then the read rates of
the pool (read_rates.py: dd and BlockReader). Then per limit, systems alternating, each run a fresh
child in a cgroup v1 memory cgroup whose hard limit counts the page cache (cgroup_limit.py), the
model files evicted from the page cache first, all fed the same distinct token ids (width_child.py):
this runtime with --memory-budget = the limit, llama.cpp with mmap and repack off. Limit `none`: no
cgroup, no budget, the files read once before each run (warm page cache), and llama.cpp's default
(it repacks Q4_0/Q4_K into anonymous memory) joins the rotation; under a limit it thrashed for over
10 minutes and is not run. After each decode, prompt tok/s of fresh prompts of --prompt-lengths
tokens (time to first token). --gguf runs every system on each given GGUF instead of the pool and
its Q4_0 copy. Every run is printed; --json keeps all.
Needs root, a v1 memory controller, llama-cpp-python, gguf and sentencepiece (benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cgroup_limit  # noqa: E402
from common import evict, python_child, run_json_child, sh  # noqa: E402
from read_rates import format_rates, measure as measure_read_rates  # noqa: E402

from mixtral_offload.benchmark import machine_info  # noqa: E402
from mixtral_offload.config import parse_size  # noqa: E402
from mixtral_offload.cache.traces import synthetic_trace  # noqa: E402

SMALL = ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4", "--kv-heads", "2"]
EXACT_TOLERANCE = 1e-4
RUN_TIMEOUT = 1800  # default seconds a limited run may take before it is killed (a thrashing peer)
SYNTHETIC_TOKENS = 512  # tokens of a --routing-trace synthetic trace (positions wrap around it)
SYNTHETIC_RECALL = 0.6  # the demo model's measured prefetch recall (docs/cache.md)


def tokenizer_path() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def synth(model: Path, geometry: list[str]) -> None:
    if not model.exists():
        sh([sys.executable, "-m", "mixtral_offload", "synth", str(model), *geometry, "--tokenizer",
            str(tokenizer_path()), "-q"])


def gguf(model: Path, out: Path, qtype: str) -> None:
    if not out.exists():
        sh(python_child("to_gguf.py", str(model), str(out), "--type", qtype))


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def exactness(root: Path) -> dict:
    """Max relative difference of llama.cpp's logits on the F32 GGUF and this runtime's exact paths."""
    model, f32 = root / "small-int4", root / "small-f32.gguf"
    synth(model, SMALL)
    gguf(model, f32, "f32")
    logits = {}
    for system, path in (("runtime", model), ("llamacpp", f32)):
        result = run_json_child(python_child("width_child.py", system, str(path), "--exact", "--logits"))
        if "logits" not in result:
            return {"ok": False, "error": f"{system}: {result.get('error')}"}
        logits[system] = np.array(result["logits"])
    a, b = logits["runtime"], logits["llamacpp"]
    relative = float(np.abs(a - b).max() / np.abs(a).max())
    return {"ok": relative <= EXACT_TOLERANCE, "max_relative_difference": relative, "positions": len(a),
            "logit_scale": float(np.abs(a).max()), "model": " ".join(SMALL)}


def warm(paths: list[Path]) -> None:
    """Read every file under paths once, so a run without a limit starts with them in the page cache."""
    for root in paths:
        for file in [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]:
            with open(file, "rb", buffering=0) as handle:
                while handle.read(1 << 24):
                    pass


def limited_run(name: str, argv: list[str], limit: int | None, files: list[Path],
                timeout: int = RUN_TIMEOUT) -> dict:
    """argv in a fresh memory cgroup of `limit` bytes, files evicted first; its JSON plus cgroup figures.
    limit None: no cgroup, files read into the page cache first."""
    (warm if limit is None else evict)(files)
    before = uptime()
    where = "no limit, warm page cache" if limit is None else f"under {limit / 2**30:.1f} GiB"
    print(f"  {name} {where} ... ({before})", file=sys.stderr, flush=True)
    command = ["timeout", "-s", "KILL", str(timeout), *argv]
    start = time.perf_counter()
    if limit is None:
        result = run_json_child(command)
    else:
        cgroup = cgroup_limit.MemoryLimit(limit)
        try:
            result = run_json_child(cgroup.wrap(command))
            result.update(cgroup.usage())
        finally:
            cgroup.close()
    result.update(name=name, wall_seconds=time.perf_counter() - start, uptime_before=before, uptime_after=uptime(),
                  command=" ".join(map(str, argv)),
                  oom_killed=result.get("oom_kills", 0) > 0 and result["exit_code"] != 0)
    print("  " + format_run(result), file=sys.stderr, flush=True)
    return result


def routing_trace(spec: str, layers: int, root: Path) -> Path:
    """The trace file to route by: spec itself, or for 'synthetic' a calibrated synthetic trace of the model's
    layers (8 experts, top-2, next-layer guesses of recall SYNTHETIC_RECALL) written under root."""
    if spec != "synthetic":
        return Path(spec)
    path = root / f"synthetic-{layers}L-trace.npz"
    synthetic_trace(SYNTHETIC_TOKENS, num_layers=layers, seed=0, predict_recall=SYNTHETIC_RECALL).save(path)
    return path


def speed_runs(model: Path, q4: Path, limits: list[str], repeats: int, token_args: list[str],
               trace: Path | None = None, timeout: int = RUN_TIMEOUT) -> list[dict]:
    runtime_files, gguf_files = [model], [q4]
    runs = []
    for text in limits:
        limit = None if text == "none" else parse_size(text)
        budget = [] if limit is None else ["--budget", str(limit)]
        systems = [("this runtime", python_child("width_child.py", "runtime", str(model), *budget, *token_args),
                    runtime_files)]
        if trace is not None:  # the same run routed by the trace (llama.cpp's router cannot be replaced)
            systems.append(("this runtime, routing trace", systems[0][1] + ["--routing-trace", str(trace)],
                            runtime_files))
        systems += [("llama.cpp mmap, repack off", python_child("width_child.py", "llamacpp", str(q4), "--no-repack",
                                                               *token_args), gguf_files)]
        if limit is None:
            systems.append(("llama.cpp default", python_child("width_child.py", "llamacpp", str(q4), *token_args),
                            gguf_files))
        for repeat in range(repeats):
            for name, argv, files in systems:
                runs.append({"limit_name": text, "repeat": repeat + 1, "file": q4.name,
                             **limited_run(name, argv, limit, files, timeout)})
    return runs


def gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def demand_floor(r: dict) -> float | None:
    """Bytes per token of the experts a token needed that were not resident before it: its misses and the
    prefetches it used (a prefetch hit counts as a hit, but its read was needed), times the expert's bytes."""
    if r.get("expert_bytes") is None:
        return None
    return (r["misses_per_token"] + r["prefetch_hits_per_token"]) * r["expert_bytes"]


def failure(r: dict) -> str:
    """Why a run gave no speed: OOM-killed, killed at --run-timeout, or its error."""
    if r.get("oom_killed"):
        return f"OOM-killed after {r['wall_seconds']:.0f} s"
    if r.get("exit_code") in (137, -9):
        return f"killed at the run timeout ({r['wall_seconds']:.0f} s)"
    return r.get("error", "failed")[:80]


def format_run(r: dict) -> str:
    if "decode_tps" not in r:
        why = failure(r)
        return f"{r['name']}: {why} (cgroup peak {r.get('max_usage', 0) / 2**20:.0f} MiB)"
    hit = f", hit rate {r['hit_rate']:.2f}, demand-miss floor {gb(demand_floor(r))} GB/token" \
        if r.get("hit_rate") is not None else ""
    return (f"{r['name']}: {r['decode_tps']:.3f} tok/s, {prompt_speeds(r)}read {gb(r['disk_bytes_per_token'])} "
            f"GB/token{hit}, cgroup peak {r.get('max_usage', 0) / 2**20:.0f} MiB, "
            f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB")


def prompt_speeds(r: dict) -> str:
    """'prompt 64: 9.10 tok/s, ' for every prompt length measured."""
    return "".join(f"prompt {k[6:-4]}: {v:.2f} tok/s, " for k, v in r.items() if k.startswith("prompt") and
                   k.endswith("_tps"))


def load_change(r: dict) -> str:
    """The 1-minute load average before and after a run, from its `uptime` lines."""
    return " -> ".join(r[key].split("average:")[-1].split(",")[0].strip() for key in ("uptime_before", "uptime_after"))


def table(runs: list[dict]) -> str:
    lengths = sorted({int(k[6:-4]) for r in runs for k in r if k.startswith("prompt") and k.endswith("_tps")})
    out = ["| file | limit | system | run | decode tok/s | " + "".join(f"prompt {n} tok/s | " for n in lengths) +
           "read GB/token | demand-miss floor GB/token | hit rate | cache read GB/token | cgroup peak MiB | "
           "peak RSS MiB | load before -> after |", "|---" * (12 + len(lengths)) + "|"]
    for r in runs:
        load = load_change(r)
        head = f"| {r.get('file', '')} | {r['limit_name']} | {r['name']} | {r['repeat']} | "
        peaks = f"{r.get('max_usage', 0) / 2**20:.0f} | {r.get('peak_rss', 0) / 2**20:.0f}"
        if "decode_tps" not in r:
            why = failure(r)
            out.append(head + f"{why} | " + "- | " * (len(lengths) + 4) + f"{peaks} | {load} |")
            continue
        hit = "-" if r.get("hit_rate") is None else f"{r['hit_rate']:.2f}"
        prompts = "".join(f"{r[f'prompt{n}_tps']:.2f} | " if f"prompt{n}_tps" in r else "- | " for n in lengths)
        out.append(head + f"{r['decode_tps']:.3f} | {prompts}{gb(r['disk_bytes_per_token'])} | "
                   f"{gb(demand_floor(r))} | {hit} | {gb(r.get('cache_bytes_per_token'))} | {peaks} | {load} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--limits", nargs="+", default=["3GiB", "5GiB"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--warmup-tokens", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prompt-lengths", type=int, nargs="*", default=[64, 256])
    parser.add_argument("--read-gib", type=float, default=2.0, help="bytes of the pool each read-rate figure reads")
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("BENCH_DIR", "/tmp/mixtral-offload-bench")))
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--delete", action="store_true", help="delete the pool and the GGUF afterwards")
    parser.add_argument("--routing-trace", default=None, metavar="FILE|synthetic",
                        help="also run this runtime routed by a routing trace (bench decode --routing-trace); "
                             "'synthetic': a calibrated synthetic trace of the model's layers")
    parser.add_argument("--run-timeout", type=int, default=RUN_TIMEOUT,
                        help="seconds a run may take before it is killed (listed as killed)")
    parser.add_argument("--tables", type=Path, default=None, help="only print the tables of a saved --json file")
    parser.add_argument("--gguf", type=Path, nargs="+", default=[],
                        help="run every system on each of these GGUF files (this runtime reads its experts from "
                             "them) instead of the pool and its Q4_0 copy")
    args = parser.parse_args()
    if args.tables:
        saved = json.loads(args.tables.read_text())
        print(format_rates(saved["read_rates"]) + "\n\n" + table(saved["runs"]))
        return
    if not cgroup_limit.available():
        sys.exit("no writable cgroup v1 memory controller (run as root on a v1 host)")
    args.dir.mkdir(parents=True, exist_ok=True)
    model = args.dir / f"mixtral-width-{args.layers}L-int4"
    q4 = args.dir / f"mixtral-width-{args.layers}L-q4_0.gguf"
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(), "uptime_start": uptime(),
              "argv": sys.argv[1:]}
    check = report["exactness"] = exactness(args.dir)
    print(f"exactness: {json.dumps(check)}", file=sys.stderr, flush=True)
    if not check["ok"]:
        sys.exit(f"exactness check failed: {check}")
    try:
        if args.gguf:  # both systems run the GGUF files: no pool is written
            report.update(gguf_bytes={str(g): g.stat().st_size for g in args.gguf})
        else:
            synth(model, ["--layers", str(args.layers)])
            gguf(model, q4, "q4_0")
            report.update(pool_bytes=(model / "experts.pool").stat().st_size, gguf_bytes=q4.stat().st_size)
        report["read_rates"] = measure_read_rates(args.gguf[0] if args.gguf else model, int(args.read_gib * 2**30), [1, 2, 4])
        print(format_rates(report["read_rates"]), file=sys.stderr, flush=True)
        token_args = ["--prompt-tokens", str(args.prompt_tokens), "--warmup-tokens", str(args.warmup_tokens),
                      "--decode-tokens", str(args.decode_tokens), "--prompt-lengths", *map(str, args.prompt_lengths)]
        trace = routing_trace(args.routing_trace, args.layers, args.dir) if args.routing_trace else None
        report["routing_trace"] = str(trace) if trace else None
        report["runs"] = []
        for runtime_model, peer_model in [(g, g) for g in args.gguf] or [(model, q4)]:
            report["runs"] += speed_runs(runtime_model, peer_model, args.limits, args.repeats, token_args,
                                         trace, args.run_timeout)
            if args.json:  # kept after each file, so a later failure loses nothing measured
                args.json.write_text(json.dumps(report, indent=2))
    finally:
        if args.delete:
            shutil.rmtree(model, ignore_errors=True)
            q4.unlink(missing_ok=True)
    report["uptime_end"] = uptime()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(format_rates(report["read_rates"]))
    print(table(report["runs"]))


if __name__ == "__main__":
    main()
