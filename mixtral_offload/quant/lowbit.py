"""int2 and int3 code packing: 2-bit planes (and high-bit masks for int3) that SIMD kernels decode
with one shift and one mask per plane, like int4's nibble split.

Layout of one row (cols = C, group size G, L = C / 4 bytes of 2-bit planes):

2-bit planes  per group g, G / 4 bytes; byte j (0 <= j < G/4) holds element j + p G/4 of the group in
              bits 2p..2p+1, p = 0..3. Plane p of a 64-byte stretch thus holds 64 elements a kernel
              reads against a contiguous slice of x permuted to the same order (quant/int8x.py).
int2          codes = the 2-bit planes, [rows, C / 4]: q = plane value, 0..3.
int3          codes [rows, 3 C / 8]: the planes in chunks of 64 bytes (the last chunk of a row n = L mod
              64 bytes when that is not 0), each chunk's n plane bytes followed by n / 2 bytes of high
              bits: 4 masks of n / 8 bytes, mask p bit i (little-endian: bit i % 8 of byte i // 8) the
              third bit (value 4) of the code at position i of plane p. q = plane value + 4 high bit, 0..7.
              (llama.cpp's Q3_K splits the same way: qs holds 2-bit planes, hmask the high bits.)

A kernel reads a full chunk's mask p as one 64-bit mask register and adds 4 to plane p's bytes
under it (AVX-512BW: kmovq, then a masked add): no shuffles, no per-plane shifts.
"""

from __future__ import annotations

import numpy as np
from numba import njit

CHUNK_BYTES = 64  # plane bytes per int3 chunk: one 64-byte load, 256 codes in 4 planes
PLANES = 4  # 2-bit planes per byte


# --- packing (the quantizer's last step, one row at a time) ---


@njit(cache=True, nogil=True)
def pack_row(q, bits, group_size, out):
    """Pack codes q [C] (float32 holding integers 0..2^bits - 1) of one row into out [C bits / 8]."""
    cols = q.shape[0]
    quarter = group_size // PLANES
    plane_bytes = cols // PLANES
    low = np.zeros(plane_bytes, np.uint8)
    high = np.zeros((PLANES, plane_bytes), np.uint8)
    for g in range(cols // group_size):
        for p in range(PLANES):
            for j in range(quarter):
                code = np.uint8(q[g * group_size + p * quarter + j])
                at = g * quarter + j
                low[at] |= (code & np.uint8(3)) << np.uint8(2 * p)
                high[p, at] = code >> np.uint8(2)
    if bits == 2:
        out[:] = low
        return
    for c0 in range(0, plane_bytes, CHUNK_BYTES):
        n = min(CHUNK_BYTES, plane_bytes - c0)
        base = c0 * 3 // 2  # each earlier chunk took 64 plane bytes and 32 high bytes
        out[base : base + n] = low[c0 : c0 + n]
        out[base + n : base + n + n // 2] = 0
        for p in range(PLANES):
            for i in range(n):
                out[base + n + p * (n // 8) + i // 8] |= high[p, c0 + i] << np.uint8(i % 8)


# --- decoding one group (the float kernels' path) ---


@njit(cache=True, nogil=True)
def decode_group(crow, bits, group_size, g, out, at):
    """out[at : at + G] = the codes (as float32) of group g of a row whose packed codes are crow."""
    quarter = np.uint64(group_size // PLANES)
    pos0 = np.uint64(g) * quarter  # a group's plane bytes never straddle a chunk: G / 4 divides 64
    first = np.uint64(at)
    if bits == 2:
        for p in range(PLANES):
            shift = np.uint8(2 * p)
            o = first + np.uint64(p) * quarter
            for j in range(quarter):
                u = np.uint64(j)
                out[o + u] = np.float32((crow[pos0 + u] >> shift) & np.uint8(3))
        return
    plane_bytes = np.uint64(crow.shape[0] * 2 // 3)
    c0 = pos0 - pos0 % np.uint64(CHUNK_BYTES)
    n = min(np.uint64(CHUNK_BYTES), plane_bytes - c0)
    base = c0 * np.uint64(3) // np.uint64(2)
    i0 = pos0 - c0  # the group's first position in its chunk
    for p in range(PLANES):
        shift = np.uint8(2 * p)
        o = first + np.uint64(p) * quarter
        mask = base + n + np.uint64(p) * (n // np.uint64(8))
        for j in range(quarter):
            i = i0 + np.uint64(j)
            high = (crow[mask + i // np.uint64(8)] >> np.uint8(i % np.uint64(8))) & np.uint8(1)
            out[o + np.uint64(j)] = np.float32(((crow[base + i] >> shift) & np.uint8(3)) | (high << np.uint8(2)))


# --- the reference: plain array operations, for NumPy arrays and for torch tensors on any device ---


def unpack_lowbit(codes, bits: int, group_size: int):
    """[rows, C bits / 8] packed codes -> [rows, C] uint8 codes (numpy in, numpy out; torch in, torch out)."""
    xp = array_module(codes)
    rows = codes.shape[0]
    cols = codes.shape[1] * 8 // bits
    if bits == 2:
        plane_bytes = codes
    else:
        plane_bytes, high = _split_int3_chunks(codes, xp)
    planes = xp.stack([(plane_bytes >> (2 * p)) & 3 for p in range(PLANES)], axis=1)  # [rows, 4, L]
    if bits == 3:
        planes = planes | (high << 2)
    # plane byte g*G/4 + j of plane p is element p*G/4 + j of group g
    grouped = planes.reshape(rows, PLANES, cols // group_size, group_size // PLANES)
    return grouped.swapaxes(1, 2).reshape(rows, cols)


def _split_int3_chunks(codes, xp):
    """int3 codes -> (plane bytes [rows, L], high bits [rows, 4, L] as 0/1), chunk by chunk."""
    plane_bytes = codes.shape[1] * 2 // 3
    lows, highs = [], []
    for c0 in range(0, plane_bytes, CHUNK_BYTES):
        n = min(CHUNK_BYTES, plane_bytes - c0)
        chunk = codes[:, c0 * 3 // 2 : c0 * 3 // 2 + n + n // 2]
        lows.append(chunk[:, :n])
        masks = chunk[:, n:].reshape(codes.shape[0], PLANES, n // 8)
        bits = xp.stack([(masks >> k) & 1 for k in range(8)], axis=3)  # [rows, 4, n/8, 8]: bit k of byte
        highs.append(bits.reshape(codes.shape[0], PLANES, n))
    return xp.concatenate(lows, axis=1), xp.concatenate(highs, axis=2)


def array_module(array):
    """numpy for a NumPy array, else torch (imported only then)."""
    if isinstance(array, np.ndarray):
        return np
    import torch

    return torch
