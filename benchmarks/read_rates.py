"""Read rates of an expert pool from a cold page cache: dd (buffered, O_DIRECT) and cache/reader.py's BlockReader.

    python benchmarks/read_rates.py MODEL_DIR [--gib 2] [--in-flight 1 2 4]

BlockReader reads whole experts one after another into one page-aligned buffer, each expert as
three extents (w1, w3, w2 with their scales), w1 first, pieces of 4 MiB with several in flight.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import evict  # noqa: E402

from mixtral_offload.cache.reader import PAGE, BlockReader, aligned_buffer  # noqa: E402
from mixtral_offload.offload.store.pool import MATRICES, POOL_NAME, ExpertPool  # noqa: E402

DD_BLOCK = 16 << 20


def dd_rate(file: Path, nbytes: int, direct: bool) -> float:
    """GB/s of `dd` reading the first nbytes of file sequentially into /dev/null, from a cold page cache."""
    evict([file])
    argv = ["dd", f"if={file}", "of=/dev/null", f"bs={DD_BLOCK}", f"count={max(1, nbytes // DD_BLOCK)}"]
    err = subprocess.run(argv + (["iflag=direct"] if direct else []), capture_output=True, text=True, check=True).stderr
    match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", err)
    return int(match.group(1)) / float(match.group(2)) / 1e9


def expert_extents(pool: ExpertPool, layer: int, expert: int) -> list[tuple[int, int, int]]:
    """(file offset, bytes, buffer offset) of each matrix of one expert with its scales (and zeros), w1 first."""
    base, extents = pool.blocks[(layer, expert)].offset, []
    for matrix in MATRICES:
        parts = [slot for slot in pool.slots if slot.matrix == matrix]
        start, end = parts[0].offset, parts[-1].offset + parts[-1].nbytes
        extents.append((base + start, end - start, start))
    return extents


def reader_rate(model_dir: Path, nbytes: int, in_flight: int, direct: bool) -> dict:
    """GB/s of BlockReader reading experts in (layer, expert) order until nbytes, from a cold page cache."""
    evict([model_dir / POOL_NAME])
    pool = ExpertPool.open(model_dir)
    buffer = aligned_buffer(-(-pool.block_nbytes // PAGE) * PAGE)
    read, fd = 0, os.open(model_dir / POOL_NAME, os.O_RDONLY)
    with BlockReader(fd, in_flight=in_flight, direct=direct) as reader:
        start = time.perf_counter()
        for key in sorted(pool.blocks):
            read += reader.read(expert_extents(pool, *key), buffer)
            if read >= nbytes:
                break
        seconds = time.perf_counter() - start
        direct_share = reader.direct_bytes / max(1, read)
    os.close(fd)
    pool.close()
    return {"in_flight": in_flight, "direct": direct, "bytes": read, "gbs": read / seconds / 1e9,
            "direct_share": direct_share}


def measure(model_dir: Path, nbytes: int, in_flight: list[int]) -> dict:
    """dd buffered and O_DIRECT, then BlockReader at each in_flight, buffered and O_DIRECT (a pool's
    directory; a single file, such as a GGUF, gets the dd figures only)."""
    pool_file = model_dir if model_dir.is_file() else model_dir / POOL_NAME
    in_flight = [] if model_dir.is_file() else in_flight
    nbytes = min(nbytes, pool_file.stat().st_size)
    result = {"bytes": nbytes, "dd_buffered_gbs": dd_rate(pool_file, nbytes, False),
              "dd_direct_gbs": dd_rate(pool_file, nbytes, True), "reader": []}
    for count in in_flight:
        for direct in (False, True):
            result["reader"].append(reader_rate(model_dir, nbytes, count, direct))
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def format_rates(rates: dict) -> str:
    lines = [f"read rates over {rates['bytes'] / 1e9:.1f} GB of the pool, cold page cache: dd buffered "
             f"{rates['dd_buffered_gbs']:.2f} GB/s, dd O_DIRECT {rates['dd_direct_gbs']:.2f} GB/s",
             "| BlockReader reads in flight | buffered GB/s | O_DIRECT GB/s (share of bytes direct) |", "|---|---|---|"]
    for count in sorted({r["in_flight"] for r in rates["reader"]}):
        rows = {r["direct"]: r for r in rates["reader"] if r["in_flight"] == count}
        lines.append(f"| {count} | {rows[False]['gbs']:.2f} | {rows[True]['gbs']:.2f} ({rows[True]['direct_share']:.2f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--gib", type=float, default=2.0, help="bytes of the pool each measurement reads")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    rates = measure(args.model_dir, int(args.gib * 2**30), args.in_flight)
    print(format_rates(rates))
    print(json.dumps(rates))


if __name__ == "__main__":
    main()
