"""Which kernel computes a quantized matrix or expert, chosen once at load, and checked entry points.

The hot path (the cache, the int8 dense layers) calls the kernel `linear_kernel` / `expert_kernel`
returned, with contiguous float32 [T, cols]; `matmul` and `expert_forward` check their arguments for
callers outside it (tests, benchmarks). Float-activation kernels: float_kernels.py; int8: int8x.py.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.quant import int8x
from mixtral_offload.quant.float_kernels import (BATCH_MIN_TOKENS, F16_TABLE, _dequantize_rows_kernel,
                                                 _gate_up_batched_kernel, _gate_up_kernel, _matmul_batched_kernel,
                                                 _matmul_kernel)
from mixtral_offload.quant.format import ACTIVATIONS, QuantizedMatrix, QuantSpec, kernel_parts



# --- public API ---


def _check_activations(x: np.ndarray, cols: int, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise MixtralOffloadError(f"{what} must be a numpy float32 array, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != cols:
        raise MixtralOffloadError(f"{what} must have shape [T, {cols}], got {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _group_sums(x: np.ndarray, group_size: int) -> np.ndarray:
    return x.reshape(x.shape[0], -1, group_size).sum(axis=2, dtype=np.float32)


def check_activations_mode(activations: str) -> None:
    """Refuse an activations mode other than those in ACTIVATIONS."""
    if activations not in ACTIVATIONS:
        raise MixtralOffloadError(f"activations must be one of {', '.join(ACTIVATIONS)}; got {activations!r}")


# --- kernels chosen once, at load: the hot path calls them with checked, contiguous float32 [T, cols] ---

LinearKernel = Callable[[QuantizedMatrix, np.ndarray], np.ndarray]            # (W [R, C], x [T, C]) -> [T, R]
ExpertKernel = Callable[[QuantizedMatrix, QuantizedMatrix, QuantizedMatrix, np.ndarray], np.ndarray]


def linear_kernel(spec: QuantSpec, cols: int, activations: str) -> LinearKernel:
    """The x @ W.T kernel for [rows, cols] weights in `spec`: int8 activations where the format allows."""
    check_activations_mode(activations)
    return int8x.matmul if activations == "int8" and int8x.supports(spec.bits, cols) else matmul_float


def expert_kernel(spec: QuantSpec, hidden: int, inter: int, activations: str) -> ExpertKernel:
    """The SwiGLU expert kernel for w1, w3 [inter, hidden] and w2 [hidden, inter] in `spec`."""
    check_activations_mode(activations)
    int8_in = activations == "int8" and int8x.supports(spec.bits, hidden)
    int8_out = activations == "int8" and int8x.supports(spec.bits, inter)
    if int8_in and int8_out:
        return int8x.expert_forward
    gate_up = int8x.gate_up if int8_in else gate_up_float
    down = int8x.matmul if int8_out else matmul_float
    return functools.partial(_composed_expert, gate_up, down)


def _composed_expert(gate_up, down, w1, w3, w2, x):
    return down(w2, gate_up(w1, w3, x))


def matmul_float(qm: QuantizedMatrix, x: np.ndarray) -> np.ndarray:
    """y [T, rows] = x [T, cols] @ W.T on float32 activations, exact to the dequantized weights."""
    y = np.empty((x.shape[0], qm.rows), np.float32)
    codes, scales, zeros = kernel_parts(qm)
    if x.shape[0] >= BATCH_MIN_TOKENS:
        _matmul_batched_kernel(qm.spec.bits, codes, scales, zeros, F16_TABLE, x, qm.spec.group_size, y)
    else:
        xsum = _group_sums(x, qm.spec.group_size)
        _matmul_kernel(qm.spec.bits, codes, scales, zeros, F16_TABLE, x, xsum, qm.spec.group_size, y)
    return y


def gate_up_float(w1: QuantizedMatrix, w3: QuantizedMatrix, x: np.ndarray) -> np.ndarray:
    """h [T, I] = silu(x @ w1.T) * (x @ w3.T) on float32 activations."""
    h = np.empty((x.shape[0], w1.rows), np.float32)
    c1, s1, z1 = kernel_parts(w1)
    c3, s3, z3 = kernel_parts(w3)
    if x.shape[0] >= BATCH_MIN_TOKENS:
        _gate_up_batched_kernel(w1.spec.bits, c1, s1, z1, c3, s3, z3, F16_TABLE, x, w1.spec.group_size, h)
    else:
        xsum = _group_sums(x, w1.spec.group_size)
        _gate_up_kernel(w1.spec.bits, c1, s1, z1, c3, s3, z3, F16_TABLE, x, xsum, w1.spec.group_size, h)
    return h


# --- the checked entry points, for callers outside the hot path (tests, benchmarks, users) ---


def matmul(qm: QuantizedMatrix, x: np.ndarray, activations: str = "float32") -> np.ndarray:
    """y = x @ W.T for x [T, cols] (-> [T, rows]) or [cols] (-> [rows]), float32, checked.

    activations "int8" quantizes x per group for integer dot products where the format allows it.
    """
    kernel = linear_kernel(qm.spec, qm.cols, activations)
    squeeze = getattr(x, "ndim", None) == 1
    y = kernel(qm, _check_activations(x[None, :] if squeeze else x, qm.cols, "x"))
    return y[0] if squeeze else y


def dequantize_fast(qm: QuantizedMatrix) -> np.ndarray:
    """The float32 [rows, cols] weights, by the parallel kernel (same values as quantize.dequantize)."""
    out = np.empty(qm.shape, np.float32)
    codes, scales, zeros = kernel_parts(qm)
    _dequantize_rows_kernel(qm.spec.bits, codes, scales, zeros, F16_TABLE, qm.spec.group_size, 0, out)
    return out


def expert_forward(w1: QuantizedMatrix, w3: QuantizedMatrix, w2: QuantizedMatrix, x: np.ndarray,
                   activations: str = "float32") -> np.ndarray:
    """SwiGLU expert: y[T, D] = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T, with w1, w3 [I, D] and w2 [D, I], checked."""
    inter, hidden = w1.shape
    if w3.shape != (inter, hidden) or w2.shape != (hidden, inter):
        raise MixtralOffloadError(
            f"expert shapes must be w1, w3 [I, D] and w2 [D, I]; got {w1.shape}, {w3.shape}, {w2.shape}"
        )
    if not (w1.spec == w3.spec == w2.spec):
        raise MixtralOffloadError(f"w1, w3 and w2 must share a format, got {w1.spec}, {w3.spec} and {w2.spec}")
    kernel = expert_kernel(w1.spec, hidden, inter, activations)
    squeeze = getattr(x, "ndim", None) == 1
    y = kernel(w1, w3, w2, _check_activations(x[None, :] if squeeze else x, hidden, "x"))
    return y[0] if squeeze else y
