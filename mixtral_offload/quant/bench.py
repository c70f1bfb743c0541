"""Kernel benchmark: quantized matvec ms and GB/s against this machine's measured read bandwidth,
and G multiply-accumulates/s against its measured int8 compute peak (prompt kernels are compute-bound).

Used by `mixtral-offload bench kernels [--json]`: `run_kernel_bench()` returns a dict (JSON shape
below) and `format_kernel_bench()` renders it as a text table.

    {"bandwidth_gbs": float, "bandwidth_by_threads": {threads: gbs}, "compile_s": {...},
     "int8_peak_isa": str, "int8_peak_gmacs_by_threads": {threads: gmacs},
     "results": [{"kernel": str, "bits": int, "shape": [rows, cols], "threads": int, "tokens": int,
                  "ms": float, "gbs": float, "ratio": float, "gmacs": float, "of_peak": float}, ...]}

`gbs` counts the bytes a call must read (codes + scales + zeros; dense weights for torch rows);
`ratio` divides it by the read bandwidth measured at the same thread count in the same run.
`gmacs` counts rows x cols x tokens multiply-accumulates per matrix; `of_peak` divides it by the
int8 peak (quant/compute_peak.py) measured at the same thread count in the same run.
Rows "int{b} g{G} expert" time `expert_forward` (w1, w3 [I, D], w2 [D, I]) on `expert_shapes` (D, I),
by default a Mixtral-mini expert (1024, 3584); their `shape` is [D, I] and their bytes all three matrices.
`tokens` > 1 times the batched path (prefill, or T tokens routed to one expert).
`activations` is "float32" (x as given, exact) or "int8" (x quantized per group, integer dot
products: quant/int8x.py; int4 only); the int8 rows include the time to quantize x.
With `gguf`, rows "gguf TYPE matvec" time the GGUF block kernels on the same shapes (quant/gguf_bench.py).

Every call reads a different copy of its matrices, cycling through at least ROTATION_BYTES of
them, so the weights come from DRAM as in a real decode, not from the last-level cache (a 33 MB
int4 w1 would otherwise sit partly in a 32 MiB L3 and read faster than memory allows).
"""

from __future__ import annotations

import math
import time

import numba
import numpy as np
import torch
from numba import njit, prange

from mixtral_offload.quant import int8x, kernels
from mixtral_offload.quant.compute_peak import measure_int8_peak
from mixtral_offload.quant.format import QuantizedMatrix, QuantSpec, packed_nbytes, part_layout

MIXTRAL_SHAPES = ((14336, 4096), (4096, 14336))  # w1/w3 and w2
MIXTRAL_MINI_EXPERT = (1024, 3584)  # (hidden D, intermediate I)
_BANDWIDTH_BYTES = 1 << 30
ROTATION_BYTES = 256 << 20  # well past any L3 (32 MiB here, 96 MiB on a V-cache part)


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _parallel_sum(values):
    chunks = 256
    per = values.shape[0] // chunks
    partial = np.zeros(chunks, np.float32)
    for c in prange(chunks):
        segment = values[c * per : (c + 1) * per]
        total = np.float32(0.0)
        for i in range(segment.shape[0]):
            total += segment[i]
        partial[c] = total
    return partial.sum()


def measure_read_bandwidth(threads: int, repeats: int = 5) -> float:
    """GB/s of a Numba parallel sum over 1 GiB of float32 (median of `repeats`).

    A version of the sum with the int8-x kernels' software prefetch read no faster (28-35 GB/s
    against 31-36 here), so this plain one stands for the machine's read bandwidth.
    """
    values = np.ones(_BANDWIDTH_BYTES // 4, np.float32)
    with _threads(threads):
        _parallel_sum(values)
        seconds = _median_seconds(lambda: _parallel_sum(values), repeats)
    return values.nbytes / seconds / 1e9


def random_quantized(spec: QuantSpec, shape: tuple[int, int], seed: int = 0) -> QuantizedMatrix:
    """A matrix with random codes and plausible scales (quantizing real weights costs time, not speed)."""
    rng = np.random.default_rng(seed)
    parts = {}
    for name, (dtype, part_shape) in part_layout(spec, shape).items():
        if name == "codes":
            parts[name] = rng.integers(0, 256, part_shape, dtype=np.uint8).view(dtype)
        elif name == "scales":
            parts[name] = (rng.random(part_shape, dtype=np.float32) * 1e-3 + 1e-3).astype(dtype)
        else:
            parts[name] = (rng.random(part_shape, dtype=np.float32) * 15).astype(dtype)
    return QuantizedMatrix.from_parts(spec, shape, parts)


def run_kernel_bench(
    threads: tuple[int, ...] = (1, 2),
    bits: tuple[int, ...] = (4, 8),
    group_size: int = 64,
    tokens: tuple[int, ...] = (1,),
    repeats: int = 15,
    torch_dense: bool = True,
    json: bool = False,
    expert_shapes: tuple[tuple[int, int], ...] = (MIXTRAL_MINI_EXPERT,),
    matrix_shapes: tuple[tuple[int, int], ...] = MIXTRAL_SHAPES,
    gguf: bool = False,
) -> dict:
    """Time the matvec kernels on Mixtral's expert shapes; see the module docstring for the result.

    `json` is accepted for the CLI's convenience; the result is the same plain dict either way.
    """
    compile_s = _first_call_seconds()
    bandwidth = {t: measure_read_bandwidth(t) for t in threads}
    peak = {t: measure_int8_peak(t) for t in threads}
    results = []
    for shape in matrix_shapes:
        rows, cols = shape
        x_all = np.random.default_rng(1).standard_normal((max(tokens), cols)).astype(np.float32)
        for b in bits:
            spec = QuantSpec(b, group_size)
            copies = [random_quantized(spec, shape, seed) for seed in range(_copies(packed_nbytes(spec, shape)))]
            for activations in _activation_modes(b, cols):
                for t in threads:
                    for n in tokens:
                        x = x_all[:n]
                        seconds = _rotating_median(
                            lambda qm: kernels.matmul(qm, x, activations=activations), copies, repeats, t)
                        name = f"int{b} g{group_size} " + ("matvec" if n == 1 else f"matmul T={n}")
                        name += " int8-x" if activations == "int8" else ""
                        results.append(_row(name, b, shape, t, n, seconds, copies[0].nbytes, bandwidth[t],
                                            activations, rows * cols * n, peak[t]))
            del copies
        if torch_dense:
            for dtype, b in ((torch.float32, 32), (torch.bfloat16, 16)):
                w = torch.randn(shape, dtype=dtype)
                copies = [w]  # 117 MB (bf16) or more: past the L3 on its own
                for t in threads:
                    for n in tokens:
                        x = torch.from_numpy(x_all[:n]).to(dtype)
                        seconds = _rotating_median(lambda m: torch.matmul(x, m.T), copies, repeats, t)
                        name = f"torch {str(dtype).removeprefix('torch.')} dense"
                        nbytes = w.numel() * w.element_size()
                        results.append(_row(name, b, shape, t, n, seconds, nbytes, bandwidth[t],
                                            str(dtype).removeprefix("torch."), rows * cols * n, peak[t]))
                del w, copies
    for hidden, inter in expert_shapes:
        x_all = np.random.default_rng(2).standard_normal((max(tokens), hidden)).astype(np.float32)
        for b in bits:
            spec = QuantSpec(b, group_size)
            expert_bytes = 2 * packed_nbytes(spec, (inter, hidden)) + packed_nbytes(spec, (hidden, inter))
            experts = [(random_quantized(spec, (inter, hidden), 3 * i + 1), random_quantized(spec, (inter, hidden), 3 * i + 2),
                        random_quantized(spec, (hidden, inter), 3 * i + 3)) for i in range(_copies(expert_bytes))]
            nbytes = sum(m.nbytes for m in experts[0])
            for activations in _activation_modes(b, hidden):
                for t in threads:
                    for n in tokens:
                        x = x_all[:n]
                        seconds = _rotating_median(
                            lambda e: kernels.expert_forward(*e, x, activations=activations), experts, repeats, t)
                        name = f"int{b} g{group_size} expert" + (" int8-x" if activations == "int8" else "")
                        results.append(_row(name, b, (hidden, inter), t, n, seconds, nbytes, bandwidth[t],
                                            activations, 3 * hidden * inter * n, peak[t]))
            del experts
    if gguf:
        from mixtral_offload.quant.gguf_bench import run_gguf_bench  # it builds on this module's helpers

        results += run_gguf_bench(threads, tokens, repeats, bandwidth, peak, matrix_shapes)
    return {
        "bandwidth_gbs": max(bandwidth.values()),
        "bandwidth_by_threads": {str(t): round(v, 2) for t, v in bandwidth.items()},
        "compile_s": compile_s,
        "int8_peak_isa": int8x.ISA,
        "int8_peak_gmacs_by_threads": {str(t): round(v, 1) for t, v in peak.items()},
        "results": results,
    }


def format_kernel_bench(result: dict) -> str:
    """A text table of run_kernel_bench()'s result."""
    lines = [
        "memory read bandwidth: "
        + ", ".join(f"{gbs:.1f} GB/s at {t} thread(s)" for t, gbs in result["bandwidth_by_threads"].items()),
        f"int8 multiply-accumulate peak ({result['int8_peak_isa']}): "
        + ", ".join(f"{g:.0f} G/s at {t} thread(s)" for t, g in result["int8_peak_gmacs_by_threads"].items()),
        "first call (compile or cache load): "
        + ", ".join(f"{name} {s:.2f} s" for name, s in result["compile_s"].items()),
        f"{'kernel':<28} {'shape':>12} {'T':>3} {'thr':>3} {'ms':>8} {'GB/s':>7} {'of bw':>6} {'GMAC/s':>7} {'of peak':>7}",
    ]
    for r in result["results"]:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        lines.append(
            f"{r['kernel']:<28} {shape:>12} {r['tokens']:>3} {r['threads']:>3} {r['ms']:>8.2f} "
            f"{r['gbs']:>7.1f} {r['ratio']:>6.0%} {r['gmacs']:>7.1f} {r['of_peak']:>7.0%}"
        )
    return "\n".join(lines)


def _row(kernel, bits, shape, threads, tokens, seconds, nbytes, bandwidth, activations, macs, peak):
    gbs = nbytes / seconds / 1e9
    gmacs = macs / seconds / 1e9
    return {
        "kernel": kernel, "bits": bits, "shape": list(shape), "threads": threads, "tokens": tokens,
        "activations": activations, "ms": round(seconds * 1e3, 3), "gbs": round(gbs, 2),
        "ratio": round(gbs / bandwidth, 3), "gmacs": round(gmacs, 2), "of_peak": round(gmacs / peak, 3),
    }


def _copies(nbytes: int) -> int:
    """How many copies of nbytes of weights make up ROTATION_BYTES (at least 2)."""
    return max(2, math.ceil(ROTATION_BYTES / nbytes))


def _activation_modes(bits: int, cols: int) -> tuple[str, ...]:
    return ("float32", "int8") if int8x.supports(bits, cols) else ("float32",)


def _rotating_median(fn, operands: list, repeats: int, threads: int) -> float:
    """Median seconds of fn(operand), each call on the next operand, after one untimed call."""
    with _threads(threads):
        fn(operands[-1])
        times = []
        for i in range(max(repeats, 1)):
            operand = operands[i % len(operands)]
            start = time.perf_counter()
            fn(operand)
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def _first_call_seconds() -> dict[str, float]:
    """Seconds of each kernel family's first call in this process: a compile, or a load from Numba's cache."""
    out = {}
    for b in (4, 8):
        qm = random_quantized(QuantSpec(b, 64), (8, 128))
        x = np.ones((1, 128), np.float32)
        start = time.perf_counter()
        kernels.matmul(qm, x)
        out[f"int{b} matvec"] = round(time.perf_counter() - start, 3)
    qm = random_quantized(QuantSpec(4, 64), (8, 128))
    start = time.perf_counter()
    kernels.matmul(qm, np.ones((1, 128), np.float32), activations="int8")
    out["int4 matvec int8-x"] = round(time.perf_counter() - start, 3)
    return out


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class _threads:
    """Set Numba's and torch's thread counts for a block, then restore them."""

    def __init__(self, count: int):
        self.count = count

    def __enter__(self):
        self.saved = (numba.get_num_threads(), torch.get_num_threads())
        numba.set_num_threads(min(self.count, numba.config.NUMBA_NUM_THREADS))
        torch.set_num_threads(self.count)

    def __exit__(self, *exc):
        numba.set_num_threads(self.saved[0])
        torch.set_num_threads(self.saved[1])
