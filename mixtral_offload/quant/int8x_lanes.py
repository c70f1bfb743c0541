"""The group-in-lanes order of the prompt tiles: 16 groups of a row side by side, one per int32 lane.

In the pool's order a 64-byte load of a row's codes holds one to four groups, several int32 lanes
each, so a tile must convert and scale its integer sums after every load. The tiles instead copy a
few rows at a time into this order (in registers: 2-source shuffles, then stores into a small
buffer that every token of the prompt reuses): a super-block of SUPER_GROUPS groups becomes
group_bytes / 4 vectors, vector k holding dword k of group l in lane l. A lane then sums one group
over the whole super-block in int32, and one conversion and one scaled FMA serve 16 groups.

x is quantized straight into the same order (`quantize_lanes`), padded with zeros to whole
super-blocks; `dx` is padded likewise, so padded lanes add 0 x 0.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils

from mixtral_offload.quant.int8x import BLOCK_BYTES, PLANES, group_scale
from mixtral_offload.quant.int8x_ir import _F32, _I32, _I64, _V16F, _V16I32, _halfs_to_float, _load, _prefetch_l2

SUPER_GROUPS = 16  # groups per super-block: one per int32 lane of a 64-byte vector
LANE_BYTES = BLOCK_BYTES // SUPER_GROUPS  # 4 code bytes of a group per lane and vector
VNNI_INT8_ZERO = 128.0  # int8 codes read as q + 128 under VNNI: a zero point of 128 for every group


def padded_groups(cols: int, group_size: int) -> int:
    """Groups per row rounded up to whole super-blocks."""
    groups = cols // group_size
    return -(-groups // SUPER_GROUPS) * SUPER_GROUPS


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _quantize_lanes(x, group_size, planes, xperm, dx, xqsum):
    """Per token and group: dx = max|x| / 127, xq = round(x / dx), written in the lane order."""
    group_bytes = group_size // planes
    super_cols = SUPER_GROUPS * group_size
    for t in prange(x.shape[0]):
        for g in range(x.shape[1] // group_size):
            base = g * group_size
            scale, inv = group_scale(x, t, base, group_size)
            total = 0
            start = (g // SUPER_GROUPS) * super_cols + LANE_BYTES * (g % SUPER_GROUPS)
            # element p * group_bytes + 4 k + m (plane p, byte 4 k + m) -> vector k, plane p, lane byte m
            for p in range(planes):
                for k in range(group_bytes // LANE_BYTES):
                    source = base + p * group_bytes + LANE_BYTES * k
                    target = start + (k * planes + p) * BLOCK_BYTES
                    for m in range(LANE_BYTES):
                        q = np.int32(np.rint(x[t, source + m] * inv))
                        total += q
                        xperm[t, target + m] = q
            dx[t, g] = scale
            xqsum[t, g] = scale * np.float32(total)


def quantize_lanes(x: np.ndarray, group_size: int, bits: int):
    """(xperm int8 [T, padded cols], dx and xqsum float32 [T, padded groups]) for x [T, cols]."""
    tokens, cols = x.shape
    padded = padded_groups(cols, group_size)
    xperm = np.zeros((tokens, padded * group_size), np.int8)
    dx = np.zeros((tokens, padded), np.float32)
    xqsum = np.zeros((tokens, padded), np.float32)
    _quantize_lanes(x, group_size, PLANES[bits], xperm, dx, xqsum)
    return xperm, dx, xqsum


# --- the weights' copy into the lane order, in LLVM IR ---


def _transpose_to_lanes(builder, vectors, group_dwords):
    """The vectors of one super-block in lane order: out[k] lane l = dword k of group l.

    vectors[j] lane i holds flat dword 16 j + i, i.e. dword f % group_dwords of group f // group_dwords.
    Each stage merges two vectors with the same dwords of disjoint groups into two with twice the
    groups and half the dwords each (one 2-source shuffle per output), until each holds all 16 groups.
    """
    items = []
    for j, vector in enumerate(vectors):
        flat = range(SUPER_GROUPS * j, SUPER_GROUPS * (j + 1))
        items.append((vector, [(f // group_dwords, f % group_dwords) for f in flat]))
    while len({group for group, _ in items[0][1]}) < SUPER_GROUPS:
        merged, waiting = [], list(items)
        while waiting:
            vector_a, labels_a = waiting.pop(0)
            groups_a, dwords_a = {g for g, _ in labels_a}, sorted({d for _, d in labels_a})
            partner = next(i for i, (_, labels) in enumerate(waiting)
                           if sorted({d for _, d in labels}) == dwords_a and not groups_a & {g for g, _ in labels})
            vector_b, labels_b = waiting.pop(partner)
            both = labels_a + labels_b
            half = len(dwords_a) // 2
            for part in (dwords_a[:half], dwords_a[half:]):
                labels = sorted(label for label in both if label[1] in part)
                mask = ir.Constant(ir.VectorType(_I32, SUPER_GROUPS), [both.index(label) for label in labels])
                merged.append((builder.shuffle_vector(vector_a, vector_b, mask), labels))
        items = merged
    return [vector for vector, _ in sorted(items, key=lambda item: item[1][0][1])]


def _put(builder, pointer, offset, vector):
    target = builder.bitcast(builder.gep(pointer, [offset]), vector.type.as_pointer())
    builder.store(vector, target, align=1)


def _clear_tail(builder, buf_row, buf_scale_row, buf_sz_row, full, super_bytes, group_dwords):
    """Zero the last, partial super-block of a row's copy (codes, s, s z: padded lanes add 0); its
    (byte offset, first group)."""
    at = builder.mul(full, ir.Constant(_I64, super_bytes))
    g0 = builder.mul(full, ir.Constant(_I64, SUPER_GROUPS))
    for k in range(group_dwords):
        _put(builder, buf_row, builder.add(at, ir.Constant(_I64, k * BLOCK_BYTES)), ir.Constant(_V16I32, None))
    _put(builder, buf_scale_row, g0, ir.Constant(_V16F, None))
    _put(builder, buf_sz_row, g0, ir.Constant(_V16F, None))
    return at, g0


def emit_copy_rows(builder, parts, row_ids, row_bytes, ngroups, buf_codes, buf_scales, buf_row_bytes,
                   buf_row_groups, group_bytes, zero_point, prefetch):
    """IR copying rows row_ids of parts = (codes, scales, zeros) pointers into the lane order:
    buf_codes (i8*) row i at i * buf_row_bytes; in buf_scales (float*) at 2 i * buf_row_groups the
    scales s as float32, then s z (z from the zeros, or the constant zero_point);
    padded lanes zero. A zero_point of VNNI_INT8_ZERO also flips the codes' sign bits (int8 weights
    read as q + 128 by VNNI)."""
    codes, scales, zeros = parts
    flip_sign = zero_point == VNNI_INT8_ZERO
    group_dwords = group_bytes // LANE_BYTES
    super_bytes = SUPER_GROUPS * group_bytes
    full = builder.udiv(ngroups, ir.Constant(_I64, SUPER_GROUPS))
    tail = builder.urem(ngroups, ir.Constant(_I64, SUPER_GROUPS))
    sign = ir.Constant(_V16I32, [-0x7F7F7F80] * SUPER_GROUPS)  # 0x80808080

    put = functools.partial(_put, builder)
    for i, r in enumerate(row_ids):
        code_row = builder.gep(codes, [builder.mul(r, row_bytes)])
        scale_row = builder.mul(r, ngroups)
        buf_row = builder.gep(buf_codes, [builder.mul(ir.Constant(_I64, i), buf_row_bytes)])
        buf_scale_row = builder.gep(buf_scales, [builder.mul(ir.Constant(_I64, 2 * i), buf_row_groups)])
        buf_sz_row = builder.gep(buf_scale_row, [buf_row_groups])

        def put_scales(g, count):  # groups g..g+count of the row: s, then s z
            s = _halfs_to_float(builder, scales, builder.add(scale_row, g), count)
            if zero_point is None:
                z = _halfs_to_float(builder, zeros, builder.add(scale_row, g), count)
            else:
                z = ir.Constant(s.type, [zero_point] * count)
            for row, vector in ((buf_scale_row, s), (buf_sz_row, builder.fmul(s, z))):
                put(row, g, vector if count > 1 else builder.extract_element(vector, ir.Constant(_I32, 0)))

        with cgutils.for_range(builder, full) as loop:
            at = builder.mul(loop.index, ir.Constant(_I64, super_bytes))
            loaded = []
            for j in range(group_dwords):
                offset = builder.add(at, ir.Constant(_I64, j * BLOCK_BYTES))
                if prefetch:
                    _prefetch_l2(builder, builder.gep(code_row, [builder.add(offset, ir.Constant(_I64, prefetch))]))
                loaded.append(_load(builder, code_row, offset, _V16I32))
            for k, vector in enumerate(_transpose_to_lanes(builder, loaded, group_dwords)):
                put(buf_row, builder.add(at, ir.Constant(_I64, k * BLOCK_BYTES)),
                    builder.xor(vector, sign) if flip_sign else vector)
            put_scales(builder.mul(loop.index, ir.Constant(_I64, SUPER_GROUPS)), SUPER_GROUPS)
        with builder.if_then(builder.icmp_unsigned("!=", tail, ir.Constant(_I64, 0))):
            at, g0 = _clear_tail(builder, buf_row, buf_scale_row, buf_sz_row, full, super_bytes, group_dwords)
            with cgutils.for_range(builder, tail) as lane_loop:
                lane = lane_loop.index
                g = builder.add(g0, lane)
                put_scales(g, 1)
                for k in range(group_dwords):
                    source = builder.add(builder.mul(g, ir.Constant(_I64, group_bytes)), ir.Constant(_I64, LANE_BYTES * k))
                    dword = _load(builder, code_row, source, _I32)
                    if flip_sign:
                        dword = builder.xor(dword, ir.Constant(_I32, -0x7F7F7F80))
                    put(buf_row, builder.add(at, builder.add(builder.mul(lane, ir.Constant(_I64, LANE_BYTES)),
                                                             ir.Constant(_I64, k * BLOCK_BYTES))), dword)

Q4_0_BLOCK_BYTES = 18  # llama.cpp's Q4_0 block: float16 d, then 16 code bytes (the pool's int4 group 32)


def emit_copy_q4_0_rows(builder, raw, row_ids, ngroups, buf_codes, buf_scales, buf_row_bytes, buf_row_groups,
                        prefetch):
    """emit_copy_rows for rows of llama.cpp Q4_0 blocks at raw (i8*): a block's 16 code bytes are a pool
    int4 group of 32 (low nibbles elements 0-15, high 16-31) and w = (q - 8) d, so the codes go through
    the same transpose and the scales are d and 8 d; read in place, no repacked copy of the matrix."""
    group_bytes, group_dwords = 16, 4
    row_bytes = builder.mul(ngroups, ir.Constant(_I64, Q4_0_BLOCK_BYTES))
    super_bytes = SUPER_GROUPS * group_bytes
    full = builder.udiv(ngroups, ir.Constant(_I64, SUPER_GROUPS))
    tail = builder.urem(ngroups, ir.Constant(_I64, SUPER_GROUPS))
    v4, v8 = ir.VectorType(_I32, 4), ir.VectorType(_I32, 8)
    i16 = ir.IntType(16)
    eight = ir.Constant(_V16F, [8.0] * SUPER_GROUPS)

    put = functools.partial(_put, builder)

    def block_at(row, g):  # byte offset of block g of the row
        return builder.add(row, builder.mul(g, ir.Constant(_I64, Q4_0_BLOCK_BYTES)))

    def scale_of(row, g):  # d of block g as float
        bits = _load(builder, raw, block_at(row, g), i16)
        return builder.fpext(builder.bitcast(bits, ir.HalfType()), _F32)

    for i, r in enumerate(row_ids):
        row = builder.mul(r, row_bytes)
        buf_row = builder.gep(buf_codes, [builder.mul(ir.Constant(_I64, i), buf_row_bytes)])
        buf_scale_row = builder.gep(buf_scales, [builder.mul(ir.Constant(_I64, 2 * i), buf_row_groups)])
        buf_sz_row = builder.gep(buf_scale_row, [buf_row_groups])
        with cgutils.for_range(builder, full) as loop:
            g0 = builder.mul(loop.index, ir.Constant(_I64, SUPER_GROUPS))
            if prefetch:
                _prefetch_l2(builder, builder.gep(raw, [builder.add(block_at(row, g0), ir.Constant(_I64, prefetch))]))
            quarters = [_load(builder, raw, builder.add(block_at(row, builder.add(g0, ir.Constant(_I64, g))),
                                                        ir.Constant(_I64, 2)), v4) for g in range(SUPER_GROUPS)]
            loaded = []
            for j in range(group_dwords):  # groups 4 j .. 4 j + 3, 4 dwords each, as one 64-byte load would hold
                a = builder.shuffle_vector(quarters[4 * j], quarters[4 * j + 1], ir.Constant(v8, list(range(8))))
                b = builder.shuffle_vector(quarters[4 * j + 2], quarters[4 * j + 3], ir.Constant(v8, list(range(8))))
                loaded.append(builder.shuffle_vector(a, b, ir.Constant(_V16I32, list(range(16)))))
            at = builder.mul(loop.index, ir.Constant(_I64, super_bytes))
            for k, vector in enumerate(_transpose_to_lanes(builder, loaded, group_dwords)):
                put(buf_row, builder.add(at, ir.Constant(_I64, k * BLOCK_BYTES)), vector)
            s = ir.Constant(_V16F, None)
            for lane in range(SUPER_GROUPS):
                s = builder.insert_element(s, scale_of(row, builder.add(g0, ir.Constant(_I64, lane))), ir.Constant(_I32, lane))
            put(buf_scale_row, g0, s)
            put(buf_sz_row, g0, builder.fmul(s, eight))
        with builder.if_then(builder.icmp_unsigned("!=", tail, ir.Constant(_I64, 0))):
            at, g0 = _clear_tail(builder, buf_row, buf_scale_row, buf_sz_row, full, super_bytes, group_dwords)
            with cgutils.for_range(builder, tail) as lane_loop:
                lane = lane_loop.index
                g = builder.add(g0, lane)
                d = scale_of(row, g)
                put(buf_scale_row, g, d)
                put(buf_sz_row, g, builder.fmul(d, ir.Constant(_F32, 8.0)))
                for k in range(group_dwords):
                    source = builder.add(block_at(row, g), ir.Constant(_I64, 2 + LANE_BYTES * k))
                    put(buf_row, builder.add(at, builder.add(builder.mul(lane, ir.Constant(_I64, LANE_BYTES)),
                                                             ir.Constant(_I64, k * BLOCK_BYTES))),
                        _load(builder, raw, source, _I32))
