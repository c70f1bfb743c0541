"""Q4_0 experts of a GGUF file through the int8x row x token tiles, for prompts.

A Q4_0 block is the pool's int4 format at group 32 as it stands: 16 bytes whose low nibbles are
elements 0-15 and high nibbles 16-31, and w = (q - 8) d with d float16 (quant/format.py: scale d,
zero 8). So a prompt's tokens through a Q4_0 expert run int8x_tiles' kernels (each weight block read
once per tile of tokens) instead of the GGUF row kernels (one row at a time), on rows repacked a chunk
at a time: codes copied without their scales, scales gathered. The chunk bounds the copy's memory to
a few MiB (the memory plan's slack), and the weights are the same, so only the summation order changes.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from mixtral_offload.quant.format import QuantizedMatrix, QuantSpec
from mixtral_offload.quant.gguf_blocks import GGUFMatrix
from mixtral_offload.quant.int8x import supports
from mixtral_offload.quant.int8x_lanes import quantize_lanes
from mixtral_offload.quant.int8x_tiles import _swiglu
from mixtral_offload.quant.int8x_tiles import matmul as tiles_matmul

Q4_0 = GGMLQuantizationType.Q4_0
Q4_0_SPEC = QuantSpec(bits=4, group_size=32)
Q4_0_BLOCK_BYTES = 18  # float16 d, then 16 bytes of nibbles
CHUNK_ROWS = 1024      # rows repacked at a time: 2 MiB of codes at Mixtral's 4,096 columns
# From this many tokens an expert's Q4_0 matrices run the tiles (repack included); below, the GGUF row
# kernels, which read each block straight from the slot (BENCHMARKS.md, issue 18: GGUF prompts)
TILES_MIN_TOKENS = 12


def takes(w1: GGUFMatrix, w3: GGUFMatrix, w2: GGUFMatrix, tokens: int) -> bool:
    """Whether an expert of these matrices runs the tiles for this many tokens (int8 activations)."""
    return (tokens >= TILES_MIN_TOKENS and w1.qtype == w3.qtype == w2.qtype == Q4_0
            and supports(4, w1.cols) and supports(4, w2.cols))


@njit(cache=True, nogil=True, parallel=True)
def _repack_rows(raw, row_bytes, first, count, codes, scales):
    """codes [count, cols/2] and scales [count, cols/32] (float16 bits) of rows first.. of Q4_0 bytes."""
    blocks = scales.shape[1]
    for i in prange(count):
        row = (first + i) * row_bytes
        for b in range(blocks):
            off = row + b * 18
            scales[i, b] = np.uint16(raw[off]) | (np.uint16(raw[off + 1]) << np.uint16(8))
            for j in range(16):
                codes[i, b * 16 + j] = raw[off + 2 + j]


def as_int4(m: GGUFMatrix, first: int = 0, count: int | None = None) -> QuantizedMatrix:
    """Rows first..first+count of a Q4_0 matrix as an int4 group-32 QuantizedMatrix: the same weights."""
    count = m.rows - first if count is None else count
    blocks = m.cols // 32
    codes = np.empty((count, m.cols // 2), np.uint8)
    scales = np.empty((count, blocks), np.uint16)
    _repack_rows(m.data, m.row_bytes, first, count, codes, scales)
    zeros = np.full((count, blocks), 8.0, np.float16)
    return QuantizedMatrix(Q4_0_SPEC, (count, m.cols), codes, scales.view(np.float16), zeros)


def _chunks(rows: int):
    return ((first, min(CHUNK_ROWS, rows - first)) for first in range(0, rows, CHUNK_ROWS))


def matmul(m: GGUFMatrix, x: np.ndarray) -> np.ndarray:
    """y [T, R] = x [T, C] @ W.T for a Q4_0 matrix, x quantized per group of 32 (as llama.cpp's Q8_0)."""
    quantized = quantize_lanes(x, 32, 4)
    y = np.empty((x.shape[0], m.rows), np.float32)
    for first, count in _chunks(m.rows):
        y[:, first:first + count] = tiles_matmul(as_int4(m, first, count), x, quantized)
    return y


def expert_forward(w1: GGUFMatrix, w3: GGUFMatrix, w2: GGUFMatrix, x: np.ndarray) -> np.ndarray:
    """y [T, D] = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T for Q4_0 matrices, through the tiles."""
    quantized = quantize_lanes(x, 32, 4)
    h = np.empty((x.shape[0], w1.rows), np.float32)
    for first, count in _chunks(w1.rows):
        gate = tiles_matmul(as_int4(w1, first, count), x, quantized)
        _swiglu(gate, tiles_matmul(as_int4(w3, first, count), x, quantized))
        h[:, first:first + count] = gate
    return matmul(w2, h)
