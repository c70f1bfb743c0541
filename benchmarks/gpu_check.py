"""The Mixtral-width model with its experts on a GPU under a VRAM budget: device-slot formats and the miss choice.

    python benchmarks/gpu_check.py MODEL_DIR [--device cuda] [--budget 6GiB] [--table OUT.md] [--json OUT.json]
    python benchmarks/gpu_check.py --child MODEL_DIR FORMAT MISSES ...   (one row, run by the parent)

Run by scripts/gpu_check.sh. One fresh child per row, the pool evicted from the page cache first, the
same teacher-forced distinct token ids as width_child.py (a 16-token prompt, 4 untimed tokens, then
timed ones). Rows: device slots holding the pool's blocks (`dequantize`) or NF4 (`nf4`, bitsandbytes),
each with the cache's measured copy-vs-CPU choice for a miss (`choice`: a miss may be computed by the
CPU kernels where it lies, when that measured cheaper than copying it to the device) or with every
miss copied (`copy`). `--device cpu` is the dry run of all but the GPU (RAM slots; nf4 rows refused).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import evict, python_child, run_json_child  # noqa: E402
from width_child import forced_ids  # noqa: E402

ROWS = (("dequantize", "choice"), ("dequantize", "copy"), ("nf4", "choice"), ("nf4", "copy"))
ROW_TIMEOUT = 150  # seconds one row may take before it is killed
MIN_ROW_SECONDS = 30  # a row is not started with less time than this before the deadline


def gbs(nbytes: float, seconds: float) -> float | None:
    return nbytes / seconds / 1e9 if seconds > 0 else None


def measure(model: str, device_format: str, misses: str, device: str, budget: str, tokens: int) -> dict:
    """One row in this process: load, feed the forced ids, return speeds and what the cache did."""
    import torch

    from mixtral_offload.offload.loading import load

    start = time.perf_counter()
    runtime = load(model, device=device, device_format=device_format, memory_budget=budget,
                   max_context=16 + 4 + tokens + 8)
    load_seconds = time.perf_counter() - start
    cache = runtime.model.experts
    if misses == "copy":
        cache.costs = None  # no measured choice: every miss is copied into a slot
    ids = forced_ids(runtime.args.vocab_size, 16 + 4 + tokens)
    start = time.perf_counter()
    runtime._forward(ids[:16], last_only=True)
    prompt_seconds = time.perf_counter() - start
    for token in ids[16:20]:
        runtime._forward([token], last_only=True)
    s = cache.stats
    before = (sum(s.hits), sum(s.misses), s.direct, s.bytes_read, s.read_seconds)
    start = time.perf_counter()
    for token in ids[20:]:
        runtime._forward([token], last_only=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    hits, missed, direct, nbytes, read_seconds = (after - b for after, b in zip(
        (sum(s.hits), sum(s.misses), s.direct, s.bytes_read, s.read_seconds), before))
    costs = cache.costs
    return {"decode_tps": tokens / seconds, "prompt_seconds": prompt_seconds, "load_seconds": load_seconds,
            "slots": runtime.memory_plan.slots,
            "total_experts": runtime.args.num_hidden_layers * runtime.args.num_local_experts,
            "hit_rate": hits / max(1, hits + missed), "misses_per_token": missed / tokens,
            "cpu_misses_per_token": direct / tokens, "fill_gbs": gbs(nbytes, read_seconds),
            "measured_fill_gbs": gbs(1, costs.fill) if costs and costs.fill else None,
            "measured_cpu_gbs": gbs(1, costs.direct) if costs and costs.direct else None,
            "peak_vram": torch.cuda.max_memory_reserved() if device == "cuda" else None}


def cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[dict], header: str) -> str:
    """The one table scripts/gpu_check.sh writes."""
    out = [header, "", "| slots hold | miss | decode tok/s | prompt s | slots | hit rate | misses/token | "
           "on CPU/token | fill GB/s | measured copy GB/s | measured CPU GB/s | peak VRAM GiB | load s |",
           "|---" * 13 + "|"]
    for r in rows:
        if "decode_tps" not in r:
            why = r.get("error", "failed").split(" | ")[-1].replace("|", "/")[:200]  # the last line of stderr
            out.append(f"| {r['format']} | {r['misses']} | {why} |" + " |" * 10)
            continue
        vram = None if r["peak_vram"] is None else r["peak_vram"] / 2**30
        out.append(f"| {r['format']} | {r['misses']} | {r['decode_tps']:.2f} | {r['prompt_seconds']:.2f} | "
                   f"{r['slots']}/{r['total_experts']} | {r['hit_rate']:.2f} | {r['misses_per_token']:.2f} | "
                   f"{r['cpu_misses_per_token']:.2f} | {cell(r['fill_gbs'], '.2f')} | "
                   f"{cell(r['measured_fill_gbs'], '.2f')} | {cell(r['measured_cpu_gbs'], '.2f')} | "
                   f"{cell(vram, '.2f')} | {r['load_seconds']:.1f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--child", nargs=2, metavar=("FORMAT", "MISSES"), default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--budget", default="6GiB")
    parser.add_argument("--tokens", type=int, default=16, help="timed decode tokens per row")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of each row")
    parser.add_argument("--deadline", type=float, default=360.0, help="seconds all rows may take: a row is killed at it, "
                        "and not started with less than MIN_ROW_SECONDS left")
    parser.add_argument("--tests", default="", help="the CUDA tests' summary line, put above the table")
    parser.add_argument("--table", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.child:
        from mixtral_offload.errors import MixtralOffloadError

        try:
            print(json.dumps(measure(args.model, *args.child, args.device, args.budget, args.tokens)))
        except MixtralOffloadError as exc:  # the row says why in one line
            sys.exit(f"error: {exc}")
        return
    start, rows = time.perf_counter(), []
    for device_format, misses in ROWS:
        row = {"format": device_format, "misses": misses}
        left = args.deadline - (time.perf_counter() - start)
        if left < MIN_ROW_SECONDS:
            rows.append({**row, "error": "skipped: past the deadline"})
            continue
        evict([Path(args.model)])
        argv = python_child("gpu_check.py", args.model, "--child", device_format, misses, "--device", args.device,
                            "--budget", args.budget, "--tokens", str(args.tokens))
        limit = str(int(min(ROW_TIMEOUT, left)))
        result = run_json_child(["timeout", "-s", "KILL", limit, *argv], threads=args.threads)
        rows.append({**row, **result})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    header = (f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {gpu}, --device {args.device}, budget {args.budget}, "
              f"{args.threads} CPU threads, {args.model}, {args.tokens} timed tokens per row. {args.tests}".strip())
    text = table(rows, header)
    print(text)
    if args.table:
        args.table.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
