"""GGUF block kernels beside the int4 g32 kernels in one process, one thread, best of N calls.

On a shared machine `bench kernels` medians move with whoever else runs; the fastest of N
back-to-back calls, every kernel interleaved, compares the kernels' own cost. The matrix is reused
(no rotation), so at 14336x4096 it reads mostly from DRAM (32 MiB L3 here) and at 2048 rows from L3.

    python benchmarks/gguf_cpu_time.py --rows 14336 --tokens 1 --types Q4_0,Q4_K
"""
import argparse
import time

import numba
import numpy as np
from gguf import GGMLQuantizationType

from mixtral_offload.quant import kernels
from mixtral_offload.quant.bench import random_quantized
from mixtral_offload.quant.format import QuantSpec
from mixtral_offload.quant.gguf_bench import random_gguf_matrix
from mixtral_offload.quant.gguf_kernels import gguf_matmul


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=14336)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--types", default="Q4_0,Q8_0,Q4_K,Q5_K,Q6_K,F16")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    numba.set_num_threads(1)
    shape = (args.rows, args.cols)
    x = np.random.default_rng(0).standard_normal((args.tokens, args.cols)).astype(np.float32)
    int4 = random_quantized(QuantSpec(4, 32), shape)
    calls = {f"int4 g32 {mode}": (lambda mode=mode: kernels.matmul(int4, x, activations=mode)) for mode in ("float32", "int8")}
    for name in args.types.split(","):
        m = random_gguf_matrix(GGMLQuantizationType[name], shape)
        for mode in ("float32", "int8"):
            calls[f"gguf {name} {mode}"] = lambda m=m, mode=mode: gguf_matmul(m, x, mode)
    best = {name: float("inf") for name in calls}
    for call in calls.values():
        call()  # compile or load from the cache
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    weights = args.rows * args.cols * args.tokens
    for name, seconds in best.items():
        print(f"{name:<22} {seconds * 1e3:8.3f} ms  {seconds / weights * 1e9:.4f} ns per weight and token")


if __name__ == "__main__":
    main()
