"""--miss-bits at Mixtral width under a hard memory limit: decode speed and bytes per token by miss rule.

    python benchmarks/miss_bits_width.py MODEL_DIR [--limit 3GiB] [--repeats 2] [--modes off most ...] [--json OUT]

MODEL_DIR: a Mixtral-width pool with a low-bit copy (`mixtral-offload synth DIR --layers 8 --miss-bits 2`).
Each run is a fresh width_child.py in a cgroup v1 memory cgroup of the limit (page cache charged), the
model's files evicted first (mixtral_width.limited_run), the same teacher-forced token ids; the modes
alternate within each repeat. Per mode: decode tok/s, disk bytes per token (/proc io), the cache's reads
per token of the full copy (on demand and prefetched) and of the low-bit copy (on demand and read ahead),
and plain int4's demand-miss floor for comparison (the off mode, which --modes must include).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import python_child  # noqa: E402
from mixtral_width import demand_floor, limited_run, load_change, uptime  # noqa: E402

from mixtral_offload.config import parse_size  # noqa: E402

MODES = {"off": ("plain int4 (off)", ["--miss-bits", "off"]), "auto": ("auto (rank 2, gate < 0.4)", ["--miss-bits", "auto"]),
         "most": ("most (any rank, gate < 0.8)", ["--miss-bits", "most"]),
         "every": ("every miss (bound)", ["--miss-gate", "inf", "--miss-rank", "1"]),
         "rank2": ("rank 2, any gate", ["--miss-gate", "0.5"]),
         "gate0.6": ("any rank, gate < 0.6", ["--miss-gate", "0.6", "--miss-rank", "1"]),
         "gate0.55": ("any rank, gate < 0.55", ["--miss-gate", "0.55", "--miss-rank", "1"]),
         "gate0.7": ("any rank, gate < 0.7", ["--miss-gate", "0.7", "--miss-rank", "1"])}


def gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.3f}"


def table(runs: list[dict], floor: float | None) -> str:
    lines = ["| mode | run | decode tok/s | disk GB/token | full copy: demand + prefetch GB/token | low-bit: demand + "
             "read ahead GB/token | cache reads / plain int4 floor | low-bit misses/token | hit rate | load before -> after |",
             "|---" * 10 + "|"]
    for r in runs:
        load = load_change(r)
        if "decode_tps" not in r:
            lines.append(f"| {r['name']} | {r['repeat']} | {r.get('error', 'failed')[:60]} | | | | | | | {load} |")
            continue
        cache = r["cache_bytes_per_token"] + r["low_bit_bytes_per_token"]
        full_ahead = r["prefetches_per_token"] * r["expert_bytes"]
        low_ahead = r["low_bit_prefetches_per_token"] * (r["low_bit_expert_bytes"] or 0)
        lines.append(f"| {r['name']} | {r['repeat']} | {r['decode_tps']:.3f} | {gb(r['disk_bytes_per_token'])} | "
                     f"{gb(r['cache_bytes_per_token'] - full_ahead)} + {gb(full_ahead)} | "
                     f"{gb(r['low_bit_bytes_per_token'] - low_ahead)} + {gb(low_ahead)} | "
                     f"{cache / floor:.2f} | {r['low_bit_per_token']:.2f} | {r['hit_rate']:.2f} | {load} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--limit", default="3GiB")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["off", "auto", "most"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    limit = parse_size(args.limit)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "uptime_start": uptime(), "argv": sys.argv[1:], "runs": []}
    for repeat in range(args.repeats):
        for name, extra in (MODES[mode] for mode in args.modes):
            argv = python_child("width_child.py", "runtime", str(args.model), "--budget", str(limit),
                                "--decode-tokens", str(args.decode_tokens), *extra)
            report["runs"].append({"repeat": repeat + 1, **limited_run(name, argv, limit, [args.model])})
            if args.json:
                args.json.write_text(json.dumps(report, indent=2))
    plain = [r for r in report["runs"] if r["name"] == "plain int4 (off)" and "decode_tps" in r]
    floor = report["plain_int4_floor"] = demand_floor(plain[0]) if plain else None
    report["uptime_end"] = uptime()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"plain int4 demand-miss floor: {gb(floor)} GB/token")
    print(table(report["runs"], floor or float("nan")))


if __name__ == "__main__":
    main()
