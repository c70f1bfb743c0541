"""Numba decoders of llama.cpp blocks (layouts: docs/gguf.md) into the form both GGUF kernels compute on.

A quantized block becomes codes u (uint8; Q8_0's bytes are int8) and, per sub-block of
BlockType.sub_cols columns, a float32 scale and offset with w = scale * u - offset. Every
quantized type fits that form with u >= 0 except Q8_0 (Q4_0: u = q, offset 8 d; Q6_K: u = q,
offset 32 d sc), so one integer dot (u8 x s8) serves all of them. The products scale * u and the
offsets are exact in float32, so `decode_floats` gives gguf.quants.dequantize's values exactly (a
zero may differ in sign: d * 0 there, d * 8 - 8 d here).

`raw` is a tensor's flat uint8 bytes and `off` a block's first byte. The byte-wide steps and the
float16 reads are IR (gguf_vectors.py); scales are unpacked here, per block.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mixtral_offload.quant.gguf_vectors import (
    copy32, five_bits32, half_at, make_expand, make_float_convert, nibbles16, nibbles32, six_bits32,
)

# BlockType.kind values (gguf_blocks.BLOCK_TYPES)
Q4_0, Q8_0, Q4_K, Q5_K, Q6_K, F32, F16, BF16 = range(8)

_expand_u32, _expand_u16, _expand_s32 = make_expand(32, False), make_expand(16, False), make_expand(32, True)
_from_f32, _from_f16, _from_bf16 = make_float_convert("F32"), make_float_convert("F16"), make_float_convert("BF16")


@njit(cache=True, fastmath=True, nogil=True)
def _scale_min_k4(raw, o, j):
    """Sub-block j's 6-bit scale and min from a K-quant's 12 packed bytes at raw[o] (get_scale_min_k4)."""
    if j < 4:
        return np.int64(raw[o + j]) & 63, np.int64(raw[o + j + 4]) & 63
    sc = (np.int64(raw[o + j + 4]) & 15) | ((np.int64(raw[o + j - 4]) >> 6) << 4)
    m = (np.int64(raw[o + j + 4]) >> 4) | ((np.int64(raw[o + j]) >> 6) << 4)
    return sc, m


@njit(cache=True, fastmath=True, nogil=True)
def _q4_0(raw, off, nblocks, u, scale, offset):
    # 18 bytes: d f16 | qs[16]: byte j holds element j (low nibble) and j + 16 (high); w = d (q - 8)
    for b in range(nblocks):
        o = off + b * 18
        d = half_at(raw, o)
        scale[b] = d
        offset[b] = np.float32(8.0) * d
        nibbles16(raw, u, (o + 2, b * 32, b * 32 + 16), 0)


@njit(cache=True, fastmath=True, nogil=True)
def _q8_0(raw, off, nblocks, u, scale, offset):
    # 34 bytes: d f16 | qs int8[32]; w = d q
    for b in range(nblocks):
        o = off + b * 34
        scale[b] = half_at(raw, o)
        offset[b] = np.float32(0.0)
        copy32(raw, u, (o + 2, b * 32), 0)


@njit(cache=True, fastmath=True, nogil=True)
def _q45_k(raw, off, nblocks, u, scale, offset, five_bits):
    # d f16 | dmin f16 | 12 bytes of 6-bit (scale, min) for 8 sub-blocks of 32: w = d sc q - dmin m.
    # Q4_K, 144 bytes: then qs[128]: bytes 32c..32c+31 hold sub-block 2c (low nibbles) and 2c+1
    # (high). Q5_K, 176 bytes: then qh[32]: bit s of byte j is bit 4 of sub-block s's element j; qs.
    block_bytes = 176 if five_bits else 144
    for b in range(nblocks):
        o = off + b * block_bytes
        d = half_at(raw, o)
        dmin = half_at(raw, o + 2)
        for j in range(8):
            sc, m = _scale_min_k4(raw, o + 4, j)
            scale[8 * b + j] = d * np.float32(sc)
            offset[8 * b + j] = dmin * np.float32(m)
        for c in range(4):
            lo = b * 256 + 64 * c
            if five_bits:
                five_bits32(raw, u, (o + 48 + 32 * c, o + 16, lo, lo + 32), 2 * c)
            else:
                nibbles32(raw, u, (o + 16 + 32 * c, lo, lo + 32), 0)


@njit(cache=True, fastmath=True, nogil=True)
def _q6_k(raw, off, nblocks, u, scale, offset):
    # 210 bytes: ql[128] | qh[64] | int8 scales[16] (sub-blocks of 16) | d f16; w = d sc (q - 32).
    # Half n (128 weights): ql[64n + j] low/high nibbles are elements j / j + 64, ql[64n + 32 + j]
    # elements j + 32 / j + 96; qh[32n + j] bits 0-1, 2-3, 4-5, 6-7 are their top 2 bits in that order.
    for b in range(nblocks):
        o = off + b * 210
        d = half_at(raw, o + 208)
        for s in range(16):
            dsc = d * np.float32(np.int8(raw[o + 192 + s]))
            scale[16 * b + s] = dsc
            offset[16 * b + s] = np.float32(32.0) * dsc
        for n in range(2):
            ql, out = o + 64 * n, b * 256 + 128 * n
            six_bits32(raw, u, (ql, ql + 32, o + 128 + 32 * n, out, out + 32, out + 64, out + 96), 0)


@njit(cache=True, fastmath=True, nogil=True)
def decode_codes(kind, raw, off, nblocks, u, scale, offset):
    """u[: nblocks * block_cols] and scale/offset per sub-block of nblocks quantized blocks at raw[off]."""
    if kind == Q4_0:
        _q4_0(raw, off, nblocks, u, scale, offset)
    elif kind == Q8_0:
        _q8_0(raw, off, nblocks, u, scale, offset)
    elif kind == Q4_K or kind == Q5_K:
        _q45_k(raw, off, nblocks, u, scale, offset, kind == Q5_K)
    else:
        _q6_k(raw, off, nblocks, u, scale, offset)


@njit(cache=True, fastmath=True, nogil=True)
def decode_floats(kind, raw, off, ncols, sub_cols, u, scale, offset, w, wbits):
    """w[:ncols] = the float32 weights of `ncols` columns from raw[off] (wbits: w's uint32 view)."""
    if kind >= F32:
        whole = ncols // 16 * 16
        if kind == F32:
            _from_f32(raw, off, w, whole)
        elif kind == F16:
            _from_f16(raw, off, w, whole)
        else:
            _from_bf16(raw, off, w, whole)
        for j in range(whole, ncols):  # a row's last few elements
            if kind == F32:
                o = off + 4 * j
                wbits[j] = (np.uint32(raw[o]) | (np.uint32(raw[o + 1]) << 8) | (np.uint32(raw[o + 2]) << 16)
                            | (np.uint32(raw[o + 3]) << 24))
            elif kind == F16:
                w[j] = half_at(raw, off + 2 * j)
            else:
                wbits[j] = (np.uint32(raw[off + 2 * j]) << 16) | (np.uint32(raw[off + 2 * j + 1]) << 24)
        return
    decode_codes(kind, raw, off, ncols // (32 if kind <= Q8_0 else 256), u, scale, offset)
    if kind == Q8_0:
        _expand_s32(u, scale, offset, w, ncols // 32)
    elif kind == Q6_K:
        _expand_u16(u, scale, offset, w, ncols // 16)
    else:
        _expand_u32(u, scale, offset, w, ncols // 32)
