"""This runtime at full Mixtral-8x7B geometry: a synthetic int4 pool (~25 GB) under --memory-budget 8GiB.

    python benchmarks/full_geometry.py [--dir /tmp] [--budget 8GiB] [--decode-tokens 8] [--keep] [--dense stored int8]

Writes the pool with `mixtral-offload synth` where there is room (>= 32 GB free), evicts it from the
page cache, measures each --dense format in a fresh child (mixtral_offload.benchmark; a 16-token
prompt run and a decode after an 8-token prompt), prints and saves the JSON, then deletes the pool.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import evict, save_json, sh  # noqa: E402

from mixtral_offload.benchmark import (DecodeSpec, floor_tokens_per_second, machine_info,  # noqa: E402
                                      measure_bandwidth_in_child, measure_in_child)

NEEDED = 32 << 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="parent folder for the pool (default: the first of /tmp, "
                                                      "/work, $HOME with 32 GB free)")
    parser.add_argument("--budget", default="8GiB")
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the pool afterwards")
    parser.add_argument("--dense", nargs="+", default=["stored", "int8"], choices=["stored", "int8"],
                        help="dense formats to measure, one child each (default: both)")
    args = parser.parse_args()
    candidates = [Path(args.dir)] if args.dir else [Path("/tmp"), Path("/work"), Path.home()]
    parent = next((p for p in candidates if p.exists() and shutil.disk_usage(p).free >= NEEDED), None)
    if parent is None:
        sys.exit(f"no folder among {candidates} has {NEEDED >> 30} GiB free")
    model = parent / "mixtral-8x7b-synth-int4"
    import mistral_common

    tokenizer = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(), "model": str(model),
              "free_before": shutil.disk_usage(parent).free}
    try:
        if not model.exists():
            start = time.perf_counter()
            sh([sys.executable, "-m", "mixtral_offload", "synth", str(model), "--bits", "4", "--tokenizer",
                str(tokenizer), "-q"])
            report["synth_seconds"] = time.perf_counter() - start
        report["bandwidth_gbs"] = measure_bandwidth_in_child(2)
        report["results"] = []
        for dense in args.dense:  # each from a cold page cache
            evict([model])
            spec = DecodeSpec(str(model), label=f"8x7B int4, budget {args.budget}, dense {dense}", budget=args.budget,
                              prompt_tokens=16, decode_prompt_tokens=8, decode_tokens=args.decode_tokens, repeats=1,
                              dense=dense)
            result = measure_in_child(spec)
            if result.get("active_bytes_per_token"):
                result["floor_tps"] = floor_tokens_per_second(result["active_bytes_per_token"], report["bandwidth_gbs"])
            report["results"].append(result)
        report["command"] = (f"mixtral-offload bench decode {model} --no-resident --budget {args.budget} "
                             f"--prompt-tokens 16 --decode-prompt-tokens 8 --decode-tokens {args.decode_tokens} "
                             f"--repeats 1 --json --dense DENSE")
    finally:
        if not args.keep and model.exists():
            shutil.rmtree(model)
    save_json("full_geometry.json", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
