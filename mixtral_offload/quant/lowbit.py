"""int2 and int3 code packing: 2-bit planes (and a high-bit plane for int3) that SIMD kernels decode
with one shift and one mask per plane, like int4's nibble split.

Layout of one row (cols = C, group size G, L = C / 4 bytes of 2-bit planes):

2-bit planes  per group g, G / 4 bytes; byte j (0 <= j < G/4) holds element j + p G/4 of the group in
              bits 2p..2p+1, p = 0..3. Plane p of a 64-byte stretch thus holds 64 elements a kernel
              reads against a contiguous slice of x permuted to the same order (quant/int8x.py).
int2          codes = the 2-bit planes, [rows, C / 4]: q = plane value, 0..3.
int3          codes [rows, 3 C / 8]: the planes in chunks of 64 bytes (the last chunk of a row n = L mod
              64 bytes when that is not 0), each chunk's n plane bytes followed by n / 2 high-bit bytes.
              High byte i < n/2 holds in bit p the third bit (value 4) of the code at plane position i
              of plane p, in bit 4 + p that of position i + n/2. q = plane value + 4 high bit, 0..7.
              (llama.cpp's Q3_K splits the same way: qs holds 2-bit planes, hmask the high bits.)

A kernel decodes the high bits of a 64-byte chunk by loading its 32 high bytes twice side by side and
testing bit p (first 32 positions) or 4 + p (last 32) per plane: no shuffles within a plane.
"""

from __future__ import annotations

import numpy as np
from numba import njit

CHUNK_BYTES = 64  # plane bytes per int3 chunk: one 64-byte load, 256 codes in 4 planes
PLANES = 4  # 2-bit planes per byte


def row_code_bytes(bits: int, cols: int) -> int:
    """Bytes of one row's codes in the int2/int3 layout."""
    return cols * bits // 8


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
        half = n // 2
        for i in range(half):
            byte = np.uint8(0)
            for p in range(PLANES):
                byte |= high[p, c0 + i] << np.uint8(p)
                byte |= high[p, c0 + half + i] << np.uint8(4 + p)
            out[base + n + i] = byte


# --- decoding one group (the float kernels' path) ---


@njit(cache=True, nogil=True)
def decode_group(crow, bits, group_size, g, out, at):
    """out[at : at + G] = the codes (as float32) of group g of a row whose packed codes are crow."""
    quarter = group_size // PLANES
    plane_bytes = crow.shape[0] * 8 // (bits * PLANES)
    for p in range(PLANES):
        for j in range(quarter):
            pos = g * quarter + j
            if bits == 2:
                code = (np.int64(crow[pos]) >> (2 * p)) & 3
            else:
                c0 = pos - pos % CHUNK_BYTES
                n = min(CHUNK_BYTES, plane_bytes - c0)
                base = c0 * 3 // 2
                i = pos - c0
                half = n // 2
                shift = p + 4 if i >= half else p
                code = ((np.int64(crow[base + i]) >> (2 * p)) & 3) | (
                    ((np.int64(crow[base + n + i % half]) >> shift) & 1) << 2)
            out[at + p * quarter + j] = np.float32(code)


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
        h = chunk[:, n:]
        highs.append(xp.stack([xp.concatenate([(h >> p) & 1, (h >> (4 + p)) & 1], axis=1) for p in range(PLANES)],
                              axis=1))
    return xp.concatenate(lows, axis=1), xp.concatenate(highs, axis=2)


def array_module(array):
    """numpy for a NumPy array, else torch (imported only then)."""
    if isinstance(array, np.ndarray):
        return np
    import torch

    return torch
