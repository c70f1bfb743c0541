"""Numba decoders of llama.cpp blocks (layouts: docs/gguf.md) into the form both GGUF kernels compute on.

A quantized block becomes codes u (uint8; Q8_0's bytes are int8) and, per sub-block of
BlockType.sub_cols columns, a float32 scale and offset with w = scale * u - offset. Every
quantized type fits that form with u >= 0 except Q8_0 (Q4_0: u = q, offset 8 d; Q6_K: u = q,
offset 32 d sc), so one integer dot (u8 x s8) serves all of them. The products scale * u and the
offsets are exact in float32, so `decode_floats` equals gguf.quants.dequantize bit for bit.

`raw` is a tensor's flat uint8 bytes and `off` a block's first byte; float16 fields are read byte
by byte through `f16` (float16 bits -> float32, kernels.F16_TABLE) since Numba has no float16.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# BlockType.kind values (gguf_blocks.BLOCK_TYPES)
Q4_0, Q8_0, Q4_K, Q5_K, Q6_K, F32, F16, BF16 = range(8)


@njit(cache=True, fastmath=True, nogil=True)
def _half(raw, o, f16):
    return f16[np.int64(raw[o]) | (np.int64(raw[o + 1]) << 8)]


@njit(cache=True, fastmath=True, nogil=True)
def _scale_min_k4(raw, o, j):
    """Sub-block j's 6-bit scale and min from a K-quant's 12 packed bytes at raw[o] (get_scale_min_k4)."""
    if j < 4:
        return np.int64(raw[o + j]) & 63, np.int64(raw[o + j + 4]) & 63
    sc = (np.int64(raw[o + j + 4]) & 15) | ((np.int64(raw[o + j - 4]) >> 6) << 4)
    m = (np.int64(raw[o + j + 4]) >> 4) | ((np.int64(raw[o + j]) >> 6) << 4)
    return sc, m


@njit(cache=True, fastmath=True, nogil=True)
def _q4_0(raw, off, nblocks, f16, u, scale, offset):
    # 18 bytes: d f16 | qs[16]: byte j holds element j (low nibble) and j + 16 (high); w = d (q - 8)
    for b in range(nblocks):
        o = off + b * 18
        d = _half(raw, o, f16)
        scale[b] = d
        offset[b] = np.float32(8.0) * d
        ub = b * 32
        for j in range(16):
            q = raw[o + 2 + j]
            u[ub + j] = q & 15
            u[ub + 16 + j] = q >> 4


@njit(cache=True, fastmath=True, nogil=True)
def _q8_0(raw, off, nblocks, f16, u, scale, offset):
    # 34 bytes: d f16 | qs int8[32]; w = d q
    for b in range(nblocks):
        o = off + b * 34
        scale[b] = _half(raw, o, f16)
        offset[b] = np.float32(0.0)
        ub = b * 32
        for j in range(32):
            u[ub + j] = raw[o + 2 + j]


@njit(cache=True, fastmath=True, nogil=True)
def _k4_scales(raw, o, f16, b, scale, offset):
    # d f16 | dmin f16 | 12 bytes of 6-bit (scale, min) for 8 sub-blocks of 32: w = d sc q - dmin m
    d = _half(raw, o, f16)
    dmin = _half(raw, o + 2, f16)
    for j in range(8):
        sc, m = _scale_min_k4(raw, o + 4, j)
        scale[8 * b + j] = d * np.float32(sc)
        offset[8 * b + j] = dmin * np.float32(m)


@njit(cache=True, fastmath=True, nogil=True)
def _q45_k(raw, off, nblocks, f16, u, scale, offset, five_bits):
    # Q4_K, 144 bytes: 16 of scales | qs[128]: bytes 32c..32c+31 hold sub-block 2c (low nibbles) and
    # 2c+1 (high). Q5_K, 176 bytes: 16 of scales | qh[32]: bit s of byte j is bit 4 of sub-block s's
    # element j | qs[128] as Q4_K.
    block_bytes = 176 if five_bits else 144
    qs = 48 if five_bits else 16
    for b in range(nblocks):
        o = off + b * block_bytes
        _k4_scales(raw, o, f16, b, scale, offset)
        for c in range(4):
            qo = o + qs + 32 * c
            ub = b * 256 + 64 * c
            for j in range(32):
                q = raw[qo + j]
                u[ub + j] = q & 15
                u[ub + 32 + j] = q >> 4
            if five_bits:
                for j in range(32):
                    h = raw[o + 16 + j] >> (2 * c)
                    u[ub + j] |= (h & 1) << 4
                    u[ub + 32 + j] |= (h & 2) << 3


@njit(cache=True, fastmath=True, nogil=True)
def _q6_k(raw, off, nblocks, f16, u, scale, offset):
    # 210 bytes: ql[128] | qh[64] | int8 scales[16] (sub-blocks of 16) | d f16; w = d sc (q - 32).
    # Half n (128 weights): ql[64n + j] low/high nibbles are elements j / j + 64, ql[64n + 32 + j]
    # elements j + 32 / j + 96; qh[32n + j] bits 0-1, 2-3, 4-5, 6-7 are their top 2 bits in that order.
    for b in range(nblocks):
        o = off + b * 210
        d = _half(raw, o + 208, f16)
        for s in range(16):
            dsc = d * np.float32(np.int8(raw[o + 192 + s]))
            scale[16 * b + s] = dsc
            offset[16 * b + s] = np.float32(32.0) * dsc
        for n in range(2):
            lo = o + 64 * n
            hi = o + 128 + 32 * n
            ub = b * 256 + 128 * n
            for j in range(32):
                a = raw[lo + j]
                c = raw[lo + 32 + j]
                h = raw[hi + j]
                u[ub + j] = (a & 15) | ((h & 3) << 4)
                u[ub + 32 + j] = (c & 15) | ((h & 12) << 2)
                u[ub + 64 + j] = (a >> 4) | (h & 48)
                u[ub + 96 + j] = (c >> 4) | ((h & 192) >> 2)


@njit(cache=True, fastmath=True, nogil=True)
def decode_codes(kind, raw, off, nblocks, f16, u, scale, offset):
    """u[: nblocks * block_cols] and scale/offset per sub-block for `nblocks` quantized blocks at raw[off]."""
    if kind == Q4_0:
        _q4_0(raw, off, nblocks, f16, u, scale, offset)
    elif kind == Q8_0:
        _q8_0(raw, off, nblocks, f16, u, scale, offset)
    elif kind == Q4_K or kind == Q5_K:
        _q45_k(raw, off, nblocks, f16, u, scale, offset, kind == Q5_K)
    else:
        _q6_k(raw, off, nblocks, f16, u, scale, offset)


@njit(cache=True, fastmath=True, nogil=True)
def decode_floats(kind, raw, off, ncols, sub_cols, f16, u, scale, offset, w, wbits):
    """w[:ncols] = the float32 weights of `ncols` columns from raw[off] (wbits: w's uint32 view)."""
    if kind == F32:
        for j in range(ncols):
            o = off + 4 * j
            wbits[j] = (np.uint32(raw[o]) | (np.uint32(raw[o + 1]) << 8) | (np.uint32(raw[o + 2]) << 16)
                        | (np.uint32(raw[o + 3]) << 24))
    elif kind == F16:
        for j in range(ncols):
            w[j] = _half(raw, off + 2 * j, f16)
    elif kind == BF16:
        for j in range(ncols):
            o = off + 2 * j
            wbits[j] = (np.uint32(raw[o]) << 16) | (np.uint32(raw[o + 1]) << 24)
    else:
        block_cols = 32 if kind <= Q8_0 else 256
        decode_codes(kind, raw, off, ncols // block_cols, f16, u, scale, offset)
        signed = u.view(np.int8)
        for s in range(ncols // sub_cols):
            sc = scale[s]
            of = offset[s]
            base = s * sub_cols
            if kind == Q8_0:
                for j in range(sub_cols):
                    w[base + j] = sc * np.float32(signed[base + j]) - of
            else:
                for j in range(sub_cols):
                    w[base + j] = sc * np.float32(u[base + j]) - of
