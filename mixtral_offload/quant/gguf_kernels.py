"""Numba CPU kernels on GGUF blocks as they lie in the file: matmul and a fused SwiGLU expert.

Shapes: T = tokens, R = rows (out features), C = cols (in features). Weights are GGUFMatrix [R, C];
activations are [T, C] float32. Rows are split among threads; each thread reads a row once for all
T tokens (prefill reads the weights once).

activations "float32": the row is decoded into per-task scratch as float32 weights equal to
gguf.quants.dequantize's (gguf_decode.py), dotted with x in float32 (exact up to summation order).
"int8": x is quantized per block as llama.cpp's Q8_0 / Q8_K, and the row's codes and scales go
from its blocks straight into integer dot products (gguf_int8.py, gguf_vectors.py); F32, F16 and
BF16 compute on float x in both modes, as llama.cpp does for them.

The variant (type x activations) is built once, in the table VARIANTS at import; the hot path takes
its kernel from gguf_linear_kernel / gguf_expert_kernel at load, as kernels.py's callers do.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from numba import njit, prange

from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.quant import gguf_tiles
from mixtral_offload.quant.gguf_blocks import BLOCK_TYPES, BlockType, GGUFMatrix, block_type
from mixtral_offload.quant.gguf_decode import Q4_0, Q4_K, Q5_K, Q8_0, decode_codes, decode_floats
from mixtral_offload.quant.gguf_int8 import kernel_activations, make_chunk_dot
from mixtral_offload.quant.gguf_vectors import Q4_0_UNIT, Q4_K_UNIT, Q5_K_UNIT, Q6_K_UNIT, Q8_0_UNIT
from mixtral_offload.quant.swiglu import silu
from mixtral_offload.quant.format import ACTIVATIONS
from mixtral_offload.quant.kernels import _check_activations, check_activations_mode

ROWS_PER_TASK = 32  # rows per parallel task (scratch is allocated once per task)
# int8 x: from this many tokens a row's codes are decoded once into scratch and read by every token
# (the block-reading dot builds them again for each token: 1.0-3.1x slower at 8 tokens, measured)
PREFILL_TOKENS = 4

# integer dots reading each type's blocks, and over codes decoded into scratch (prefill, and a
# Q4_0/Q8_0 row's odd last block)
_dot_q4_0, _dot_q8_0 = make_chunk_dot(32, False, Q4_0_UNIT), make_chunk_dot(32, True, Q8_0_UNIT)
_dot_q4_k, _dot_q5_k = make_chunk_dot(32, False, Q4_K_UNIT), make_chunk_dot(32, False, Q5_K_UNIT)
_dot_q6_k = make_chunk_dot(16, False, Q6_K_UNIT)
_dot_u32, _dot_u16, _dot_s32 = make_chunk_dot(32, False), make_chunk_dot(16, False), make_chunk_dot(32, True)


@njit(cache=True, fastmath=True, nogil=True)
def _float_dots(w, x, cols, acc):
    """acc[t] = w . x[t] for every token (x flat, rows of cols), 4 tokens per pass over w."""
    tokens = acc.shape[0]
    t = 0
    while t + 3 < tokens:
        xa = np.uint64(t * cols)
        xb, xc, xd = xa + np.uint64(cols), xa + np.uint64(2 * cols), xa + np.uint64(3 * cols)
        a = np.float32(0.0); b = np.float32(0.0); c = np.float32(0.0); d = np.float32(0.0)
        for k in range(cols):
            j = np.uint64(k)
            v = w[j]
            a += v * x[xa + j]; b += v * x[xb + j]; c += v * x[xc + j]; d += v * x[xd + j]
        acc[t] = a; acc[t + 1] = b; acc[t + 2] = c; acc[t + 3] = d
        t += 4
    while t < tokens:
        xa = np.uint64(t * cols)
        a = np.float32(0.0)
        for k in range(cols):
            j = np.uint64(k)
            a += w[j] * x[xa + j]
        acc[t] = a
        t += 1


@njit(cache=True, fastmath=True, nogil=True)
def _int8_dots(spec, raw, off, cols, u, scale, offset, xq, dsub, xoff, acc):
    """acc[t] = the row at raw[off] . quantized x[t] (xq, dsub, xoff flat) for every token."""
    kind, block_cols, block_bytes, sub_cols, signed = spec
    tokens = acc.shape[0]
    padded, nsub = xq.shape[0] // tokens, dsub.shape[0] // tokens
    if tokens >= PREFILL_TOKENS:
        decode_codes(kind, raw, off, cols // block_cols, u, scale, offset)
        for t in range(tokens):  # scratch past the row is zero, as is x
            if signed:
                acc[t] = _dot_s32(u, 0, scale, offset, xq, dsub, xoff, t * padded, t * nsub, padded // 64)
            elif sub_cols == 16:
                acc[t] = _dot_u16(u, 0, scale, offset, xq, dsub, xoff, t * padded, t * nsub, padded // 64)
            else:
                acc[t] = _dot_u32(u, 0, scale, offset, xq, dsub, xoff, t * padded, t * nsub, padded // 64)
        return
    units = cols // 64 if kind <= Q8_0 else cols // 256  # two blocks or one
    for t in range(tokens):
        x_at, s_at = t * padded, t * nsub
        if kind == Q4_0:
            acc[t] = _dot_q4_0(raw, off, scale, offset, xq, dsub, xoff, x_at, s_at, units)
        elif kind == Q8_0:
            acc[t] = _dot_q8_0(raw, off, scale, offset, xq, dsub, xoff, x_at, s_at, units)
        elif kind == Q4_K:
            acc[t] = _dot_q4_k(raw, off, scale, offset, xq, dsub, xoff, x_at, s_at, units)
        elif kind == Q5_K:
            acc[t] = _dot_q5_k(raw, off, scale, offset, xq, dsub, xoff, x_at, s_at, units)
        else:
            acc[t] = _dot_q6_k(raw, off, scale, offset, xq, dsub, xoff, x_at, s_at, units)
    if kind <= Q8_0 and cols % 64:  # an odd block count: the last block decoded, against zero-padded x
        last = cols // 32 - 1
        decode_codes(kind, raw, off + last * block_bytes, 1, u, scale, offset)
        for t in range(tokens):
            x_at, s_at = t * padded + 32 * last, t * nsub + last
            if signed:
                acc[t] += _dot_s32(u, 0, scale, offset, xq, dsub, xoff, x_at, s_at, 1)
            else:
                acc[t] += _dot_u32(u, 0, scale, offset, xq, dsub, xoff, x_at, s_at, 1)


@njit(cache=True, fastmath=True, nogil=True)
def _row_dots(spec, int8_x, raw, off, cols, x, xq, dsub, xoff, scratch, acc):
    """acc[t] = (the row whose bytes start at raw[off]) . x[t] for every token t (activations flat)."""
    u, scale, offset, w, wbits = scratch
    if int8_x:
        _int8_dots(spec, raw, off, cols, u, scale, offset, xq, dsub, xoff, acc)
    else:
        kind, sub_cols = spec[0], spec[3]
        decode_floats(kind, raw, off, cols, sub_cols, u, scale, offset, w, wbits)
        _float_dots(w, x, cols, acc)


@njit(cache=True, nogil=True)
def _scratch(cols):
    # zeroed: the int8 dot reads a Q4_0/Q8_0 row up to whole 64-byte vectors (x is 0 past the row)
    padded = (cols + 63) // 64 * 64
    w = np.zeros(cols, np.float32)
    return (np.zeros(padded, np.uint8), np.zeros(padded // 16, np.float32),
            np.zeros(padded // 16, np.float32), w, w.view(np.uint32))


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _matmul_kernel(spec, int8_x, raw, row_bytes, cols, x, xq, dsub, xoff, out):
    """out[T, R] = x @ W.T for the matrix whose rows of row_bytes lie in raw."""
    tokens, rows = out.shape
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        scratch = _scratch(cols)
        acc = np.empty(tokens, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            _row_dots(spec, int8_x, raw, r * row_bytes, cols, x, xq, dsub, xoff, scratch, acc)
            for t in range(tokens):
                out[t, r] = acc[t]


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _gate_up_kernel(spec, int8_x, raw1, raw3, row_bytes, cols, x, xq, dsub, xoff, h):
    """h[T, I] = silu(x @ w1.T) * (x @ w3.T), each row of w1 read beside the same row of w3."""
    tokens, rows = h.shape
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        scratch = _scratch(cols)
        gate = np.empty(tokens, np.float32)
        up = np.empty(tokens, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            _row_dots(spec, int8_x, raw1, r * row_bytes, cols, x, xq, dsub, xoff, scratch, gate)
            _row_dots(spec, int8_x, raw3, r * row_bytes, cols, x, xq, dsub, xoff, scratch, up)
            for t in range(tokens):
                h[t, r] = silu(gate[t]) * up[t]


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _dequantize_kernel(kind, sub_cols, raw, row_bytes, cols, out):
    """out[R, C] = the float32 weights of the rows of row_bytes in raw, as gguf.quants gives them."""
    rows = out.shape[0]
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        u, scale, offset, w, wbits = _scratch(cols)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            decode_floats(kind, raw, r * row_bytes, cols, sub_cols, u, scale, offset, w, wbits)
            out[r, :] = w


def gguf_dequantize(m: GGUFMatrix) -> np.ndarray:
    """W [R, C] float32, the values gguf.quants.dequantize gives (a zero's sign aside), decoded on every
    core (the numpy decoder took ~8 s of a 32-layer Mixtral's dense weights at load)."""
    out = np.empty(m.shape, np.float32)
    _dequantize_kernel(m.block_type.kind, max(m.block_type.sub_cols, 1), m.data, m.row_bytes, m.cols, out)
    return out


_NO_X = np.zeros(1, np.float32)
_NO_XQ = np.zeros(1, np.int8)


@dataclass(frozen=True)
class Variant:
    """The kernel variant for one GGUF type and activations mode: its kernel arguments, fixed once."""

    block_type: BlockType
    int8_x: bool
    spec: tuple[int, int, int, int, bool] = field(init=False)  # (kind, block cols, block bytes, sub cols, signed)

    def __post_init__(self) -> None:
        bt = self.block_type
        object.__setattr__(self, "spec", (bt.kind, bt.block_cols, bt.block_bytes, max(bt.sub_cols, 1), bt.signed_codes))

    def _operands(self, x: np.ndarray) -> tuple:
        """The kernels' activation arguments, flat: (x, xq, dsub, xoff), those of the other path unused."""
        if self.int8_x:
            return (_NO_X, *(a.reshape(-1) for a in kernel_activations(x, self.block_type)))
        return (x.reshape(-1), _NO_XQ, _NO_X, _NO_X)

    def matmul(self, m: GGUFMatrix, x: np.ndarray) -> np.ndarray:
        """y [T, R] = x [T, C] @ W.T."""
        y = np.empty((x.shape[0], m.rows), np.float32)
        _matmul_kernel(self.spec, self.int8_x, m.data, m.row_bytes, m.cols, *self._operands(x), y)
        return y

    def gate_up(self, w1: GGUFMatrix, w3: GGUFMatrix, x: np.ndarray) -> np.ndarray:
        """h [T, I] = silu(x @ w1.T) * (x @ w3.T)."""
        h = np.empty((x.shape[0], w1.rows), np.float32)
        _gate_up_kernel(self.spec, self.int8_x, w1.data, w3.data, w1.row_bytes, w1.cols,
                        *self._operands(x), h)
        return h


VARIANTS: dict[tuple, Variant] = {
    (qtype, mode): Variant(bt, int8_x=mode == "int8" and bt.quantized)
    for qtype, bt in BLOCK_TYPES.items()
    for mode in ACTIVATIONS
}


# --- kernels chosen once, at load: called with checked, contiguous float32 [T, cols], like kernels.py's ---

GGUFLinearKernel = Callable[[GGUFMatrix, np.ndarray], np.ndarray]  # (W [R, C], x [T, C]) -> [T, R]
GGUFExpertKernel = Callable[[GGUFMatrix, GGUFMatrix, GGUFMatrix, np.ndarray], np.ndarray]


def gguf_linear_kernel(qtype, activations: str) -> GGUFLinearKernel:
    """The x @ W.T kernel for weights of GGUF type `qtype` (an unknown or unsupported type is an error)."""
    check_activations_mode(activations)
    return VARIANTS[block_type(qtype).qtype, activations].matmul


def gguf_expert_kernel(w13_type, w2_type, activations: str) -> GGUFExpertKernel:
    """The SwiGLU expert kernel for w1, w3 of type w13_type and w2 of type w2_type."""
    check_activations_mode(activations)
    gate_up = VARIANTS[block_type(w13_type).qtype, activations].gate_up
    down = VARIANTS[block_type(w2_type).qtype, activations].matmul
    return functools.partial(_composed_expert, gate_up, down)


def _composed_expert(gate_up, down, w1, w3, w2, x):
    return down(w2, gate_up(w1, w3, x))


def gguf_experts_kernel(activations: str) -> GGUFExpertKernel:
    """The expert kernel for a file whose expert types vary by layer (Q4_K_M keeps some ffn_down in
    Q6_K): each (w1/w3 type, w2 type) pair's kernel is chosen once, then found by the matrices' types;
    with int8 activations, Q4_0 experts given a prompt's tokens run gguf_tiles' row x token tiles."""
    check_activations_mode(activations)
    chosen: dict[tuple, GGUFExpertKernel] = {}

    def run(w1: GGUFMatrix, w3: GGUFMatrix, w2: GGUFMatrix, x: np.ndarray) -> np.ndarray:
        if activations == "int8" and gguf_tiles.takes(w1, w3, w2, x.shape[0]):  # a prompt's tokens, Q4_0
            return gguf_tiles.expert_forward(w1, w3, w2, x)
        pair = (w1.qtype, w2.qtype)
        if pair not in chosen:
            chosen[pair] = gguf_expert_kernel(*pair, activations)
        return chosen[pair](w1, w3, w2, x)

    return run


# --- checked entry points, for callers outside the hot path (tests, benchmarks) ---


def gguf_matmul(m: GGUFMatrix, x: np.ndarray, activations: str = "float32") -> np.ndarray:
    """y = x @ W.T for x [T, cols] (-> [T, rows]) or [cols] (-> [rows]), float32."""
    check_activations_mode(activations)
    squeeze = getattr(x, "ndim", None) == 1
    x2 = _check_activations(x[None, :] if squeeze else x, m.cols, "x")
    y = gguf_linear_kernel(m.qtype, activations)(m, x2)
    return y[0] if squeeze else y


def gguf_expert_forward(w1: GGUFMatrix, w3: GGUFMatrix, w2: GGUFMatrix, x: np.ndarray,
                        activations: str = "float32") -> np.ndarray:
    """SwiGLU expert: y[T, D] = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T, w1 and w3 [I, D] of one type, w2 [D, I]."""
    check_activations_mode(activations)
    inter, hidden = w1.shape
    if w3.shape != (inter, hidden) or w2.shape != (hidden, inter):
        raise MixtralOffloadError(
            f"expert shapes must be w1, w3 [I, D] and w2 [D, I]; got {w1.shape}, {w3.shape}, {w2.shape}"
        )
    if w1.qtype != w3.qtype:
        raise MixtralOffloadError(f"w1 and w3 must share a GGUF type, got {w1.qtype.name} and {w3.qtype.name}")
    squeeze = getattr(x, "ndim", None) == 1
    x2 = _check_activations(x[None, :] if squeeze else x, hidden, "x")
    y = gguf_expert_kernel(w1.qtype, w2.qtype, activations)(w1, w3, w2, x2)
    return y[0] if squeeze else y
