"""Q4_0 experts of a GGUF file through the int8x row x token tiles, for prompts.

A Q4_0 block is the pool's int4 format at group 32 as it stands: 16 bytes whose low nibbles are
elements 0-15 and high nibbles 16-31, and w = (q - 8) d with d float16 (quant/format.py: scale d,
zero 8). So a prompt's tokens through a Q4_0 expert run int8x_tiles' kernels (each weight block read
once per tile of tokens) instead of the GGUF row kernels (one row at a time): the tiles' copy of a few
rows into the lane order reads the blocks where they lie (int8x_lanes.emit_copy_q4_0_rows). The weights
are the same, so only the summation order differs from the pool's kernels on those weights.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from mixtral_offload.quant.gguf_blocks import GGUFMatrix
from mixtral_offload.quant.int8x import ROWS_PER_TASK, supports
from mixtral_offload.quant.int8x import TILES_MIN_TOKENS as TILES_MIN_TOKENS_BY_BITS
from mixtral_offload.quant.int8x_lanes import quantize_lanes
from mixtral_offload.quant.int8x_tiles import TILE_ROWS, _swiglu, make_tiles_kernel

Q4_0 = GGMLQuantizationType.Q4_0
GROUP = 32  # a Q4_0 block: the group of x's int8 scale too, as llama.cpp's Q8_0
# From this many tokens an expert's Q4_0 matrices run the tiles, as a pool's int4 does; one token keeps
# the GGUF row kernels. At Mixtral's expert shapes, rows against tiles: 1 token 5.2 / 5.5 ms, 2: 8.3 / 6.8,
# 4: 18.3 / 7.9, 64: 158 / 47, 256: 619 / 174 (BENCHMARKS.md, issue 18)
TILES_MIN_TOKENS = TILES_MIN_TOKENS_BY_BITS[4]

_tiles_q4_0 = make_tiles_kernel(4, q4_0=True)
_UNUSED = np.zeros(1, np.uint16)  # the tiles' scales and zeros arguments: Q4_0's d lives in its blocks


def takes(w1: GGUFMatrix, w3: GGUFMatrix, w2: GGUFMatrix, tokens: int) -> bool:
    """Whether an expert of these matrices runs the tiles for this many tokens (int8 activations)."""
    return (tokens >= TILES_MIN_TOKENS and w1.qtype == w3.qtype == w2.qtype == Q4_0
            and supports(4, w1.cols) and supports(4, w2.cols))


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _matmul_kernel(raw, rows, cols, xperm, dx, xqsum, out):
    """out[t, r] = row r . x[t] for the Q4_0 rows in raw; a parallel task takes ROWS_PER_TASK rows."""
    padded = dx.shape[1]
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        first = np.uint64(task * ROWS_PER_TASK)
        end = np.uint64(min(rows, (task + 1) * ROWS_PER_TASK))
        buf_codes = np.empty(TILE_ROWS * padded * GROUP // 2, np.uint8)
        buf_scales = np.empty(2 * TILE_ROWS * padded, np.float32)
        _tiles_q4_0(raw, _UNUSED, _UNUSED, xperm, dx, xqsum, out, buf_codes, buf_scales, first, end, first,
                    np.uint64(cols), np.uint64(GROUP))


def matmul(m: GGUFMatrix, x: np.ndarray, quantized=None) -> np.ndarray:
    """y [T, R] = x [T, C] @ W.T for a Q4_0 matrix, x quantized per group of 32 (`quantized`: quantize_lanes'
    output for x when the caller has it)."""
    xperm, dx, xqsum = quantized or quantize_lanes(x, GROUP, 4)
    y = np.empty((x.shape[0], m.rows), np.float32)
    _matmul_kernel(m.data, m.rows, m.cols, xperm, dx, xqsum, y)
    return y


def expert_forward(w1: GGUFMatrix, w3: GGUFMatrix, w2: GGUFMatrix, x: np.ndarray) -> np.ndarray:
    """y [T, D] = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T for Q4_0 matrices, through the tiles."""
    quantized = quantize_lanes(x, GROUP, 4)
    h = matmul(w1, x, quantized)
    _swiglu(h, matmul(w3, x, quantized))
    return matmul(w2, h)
