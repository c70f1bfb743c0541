"""Many-token int8-activation kernels (prefill): a tile of rows x tokens reads each weight block once.

int8x.py's kernels pass over a row once per 4 tokens, reloading the tokens' x for every row. Here a
tile of TILE_ROWS rows x TILE_TOKENS tokens keeps its accumulators in registers: each 64-byte vector
of the tile's rows is loaded once and multiplied into every token of the tile, each token's x vector
once and multiplied into every row. The rows are first copied into the group-in-lanes order of
int8x_lanes.py (once per row tile, for every token of the call), so each int32 lane sums one group
over a super-block of 16 groups: per row, token and super-block one int->float conversion, one scale
product and one FMA, instead of one each per 64-byte load in the pool's order. The integer dots are
int8x's (`_int_dot` / `_signed_int_dot`: VNNI, AVX2 or generic).

The int4 zero-point terms sum_g s_g z_g xqsum_g are a separate short dot product per row and token
after the loop (16 groups per vector); int8 weights under VNNI are read as q + 128 (the copy flips
the sign bits) and subtract 128 sum_g s_g xqsum_g the same way. Tokens past the last whole tile go
one at a time; rows past the end repeat the last row and are not stored. Results equal int8x's (and
`int8x.reference_matmul`) within float32 rounding of a reassociated sum.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from mixtral_offload.quant.format import kernel_parts
from mixtral_offload.quant.int8x import BLOCK_BYTES, PLANES, PREFETCH_BYTES, ROWS_PER_TASK, emit_per_group_size
from mixtral_offload.quant.swiglu import silu
from mixtral_offload.quant.int8x_ir import (
    _I64, _V16F, _V16I32, _V64I8, ISA, _data_pointer, _horizontal_sum, _int_dot, _load,
    _signed_int_dot,
)
from mixtral_offload.quant.int8x_lanes import (
    SUPER_GROUPS, VNNI_INT8_ZERO, emit_copy_q4_0_rows, emit_copy_rows, quantize_lanes,
)

TILE_ROWS = 4
TILE_TOKENS = 4


class _TileOperands:
    """One tiles-kernel call's arguments in LLVM: data pointers, x's padded width and the row range."""

    def __init__(self, context, builder, sig, args):
        (self.codes, self.scales, self.zeros, self.xperm, self.dx, self.xqsum, self.out, self.buf_codes,
         self.buf_scales) = (_data_pointer(context, builder, t, a) for t, a in zip(sig.args[:9], args[:9]))
        xperm = context.make_array(sig.args[3])(context, builder, args[3])
        self.tokens, self.x_cols = cgutils.unpack_tuple(builder, xperm.shape, 2)
        out = context.make_array(sig.args[6])(context, builder, args[6])
        self.out_cols = cgutils.unpack_tuple(builder, out.shape, 2)[1]
        self.first_row, self.end_row, self.out_first, self.cols, self.group_size = args[9:14]


def _emit_tile(builder, ops, bits, group_size, isa, tile_rows, token_ids, zero_terms):
    """IR for the dot products of the tile_rows rows in the copy buffers with tokens token_ids:
    accumulator[r][t] (<16 x float>, one lane per group of the super-blocks); zero_terms: subtract
    s_g z_g xqsum_g with the copy's s z."""
    planes = PLANES[bits]
    group_bytes = group_size // planes
    vectors = group_bytes // 4  # vectors per super-block and plane
    super_bytes, super_cols = SUPER_GROUPS * group_bytes, SUPER_GROUPS * group_size
    nsuper = builder.udiv(ops.x_cols, ir.Constant(_I64, super_cols))
    padded = builder.mul(nsuper, ir.Constant(_I64, SUPER_GROUPS))
    buf_rows = [builder.gep(ops.buf_codes, [builder.mul(ir.Constant(_I64, r), builder.mul(nsuper, ir.Constant(_I64, super_bytes)))])
                for r in range(tile_rows)]
    scale_rows = [builder.gep(ops.buf_scales, [builder.mul(ir.Constant(_I64, 2 * r), padded)]) for r in range(tile_rows)]
    x_rows = [builder.gep(ops.xperm, [builder.mul(t, ops.x_cols)]) for t in token_ids]
    dx_rows = [builder.gep(ops.dx, [builder.mul(t, padded)]) for t in token_ids]
    xqsum_rows = [builder.gep(ops.xqsum, [builder.mul(t, padded)]) for t in token_ids]
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
    zero_i = ir.Constant(_V16I32, None)
    floats = [[cgutils.alloca_once_value(builder, ir.Constant(_V16F, None)) for _ in token_ids] for _ in range(tile_rows)]
    ints = [[cgutils.alloca_once(builder, _V16I32) for _ in token_ids] for _ in range(tile_rows)]

    with cgutils.for_range(builder, nsuper) as super_loop:
        sb = super_loop.index
        for row in ints:
            for acc in row:
                builder.store(zero_i, acc)
        code_at = builder.mul(sb, ir.Constant(_I64, super_bytes))
        x_at = builder.mul(sb, ir.Constant(_I64, super_cols))
        with cgutils.for_range(builder, ir.Constant(_I64, vectors)) as vector_loop:
            k = vector_loop.index
            at = builder.add(code_at, builder.mul(k, ir.Constant(_I64, BLOCK_BYTES)))
            weights = []
            for buf_row in buf_rows:
                codes = _load(builder, buf_row, at, _V64I8)
                if bits == 4:
                    weights.append((builder.and_(codes, ir.Constant(_V64I8, [15] * 64)),
                                    builder.lshr(codes, ir.Constant(_V64I8, [4] * 64))))
                else:
                    weights.append((codes,))
            x_k = builder.add(x_at, builder.mul(k, ir.Constant(_I64, planes * BLOCK_BYTES)))
            for i, x_row in enumerate(x_rows):
                xs = [_load(builder, x_row, builder.add(x_k, ir.Constant(_I64, p * BLOCK_BYTES)), _V64I8)
                      for p in range(planes)]
                for r, parts in enumerate(weights):
                    acc = builder.load(ints[r][i])
                    for part, x in zip(parts, xs):
                        if bits == 8 and isa != "vnni":
                            acc = builder.add(acc, _signed_int_dot(builder, part, x, isa))
                        else:
                            acc = _int_dot(builder, acc, part, x, isa)
                    builder.store(acc, ints[r][i])
        g0 = builder.mul(sb, ir.Constant(_I64, SUPER_GROUPS))
        s = [_load(builder, scale_row, g0, _V16F) for scale_row in scale_rows]
        sz = [_load(builder, scale_row, builder.add(g0, padded), _V16F) for scale_row in scale_rows]
        for i, (dx_row, xqsum_row) in enumerate(zip(dx_rows, xqsum_rows)):
            d = _load(builder, dx_row, g0, _V16F)
            minus_xqsum = builder.fneg(_load(builder, xqsum_row, g0, _V16F)) if zero_terms else None
            for r in range(tile_rows):
                value = builder.call(fma, [builder.sitofp(builder.load(ints[r][i]), _V16F), builder.fmul(s[r], d),
                                           builder.load(floats[r][i])])
                if zero_terms:  # - s_g z_g xqsum_g, 16 groups at once
                    value = builder.call(fma, [sz[r], minus_xqsum, value])
                builder.store(value, floats[r][i])
    return floats


def make_tiles_kernel(bits: int, isa: str = ISA, prefetch: int = PREFETCH_BYTES,
                      tile: tuple[int, int] = (TILE_ROWS, TILE_TOKENS), q4_0: bool = False):
    """An intrinsic tiles_dots(codes, scales, zeros, xperm, dx, xqsum, out, buf_codes, buf_scales,
    r_start, r_end, out_start, cols, G): out[t, out_start + r - r_start] = row r . x[t] for rows
    r_start <= r < r_end of a [rows, cols] matrix (flat codes/scales/zeros) and every token of
    quantize_lanes' output, in tiles of tile = (rows, tokens); buf_codes/buf_scales: a tile's rows in the
    lane order (uint8, float32). q4_0: codes are llama.cpp Q4_0 blocks (bits 4, G 32; scales and zeros
    unused), copied into the lane order in place (int8x_lanes.emit_copy_q4_0_rows)."""
    tile_rows, tile_tokens = tile
    zero_point = 8.0 if q4_0 else None if bits == 4 else (VNNI_INT8_ZERO if isa == "vnni" else 0.0)

    @intrinsic
    def tiles_dots(typingctx, codes, scales, zeros, xperm, dx, xqsum, out, buf_codes, buf_scales,
                   r_start, r_end, out_start, cols, group_size):
        signature = types.none(codes, scales, zeros, xperm, dx, xqsum, out, buf_codes, buf_scales,
                               r_start, r_end, out_start, cols, group_size)

        def codegen(context, builder, sig, args):
            ops = _TileOperands(context, builder, sig, args)
            tokens, first_row, end_row = ops.tokens, ops.first_row, ops.end_row
            row_tiles = builder.udiv(builder.add(builder.sub(end_row, first_row), ir.Constant(_I64, tile_rows - 1)),
                                     ir.Constant(_I64, tile_rows))
            full = builder.udiv(tokens, ir.Constant(_I64, tile_tokens))
            rest_start = builder.mul(full, ir.Constant(_I64, tile_tokens))

            def emit(group_size):
                group_bytes = group_size // PLANES[bits]
                ngroups = builder.udiv(ops.cols, ir.Constant(_I64, group_size))
                row_bytes = builder.mul(ngroups, ir.Constant(_I64, group_bytes))
                padded = builder.udiv(ops.x_cols, ir.Constant(_I64, group_size))

                def tile(rows, t0, count):  # rows x tokens t0..t0+count, stored where r < end
                    token_ids = [builder.add(t0, ir.Constant(_I64, k)) for k in range(count)]
                    floats = _emit_tile(builder, ops, bits, group_size, isa, tile_rows, token_ids, zero_point != 0.0)
                    values = [[_horizontal_sum(builder, builder.load(acc)) for acc in row] for row in floats]
                    for r, row_values in zip(rows, values):
                        column = builder.add(ops.out_first, builder.sub(r, first_row))
                        with builder.if_then(builder.icmp_unsigned("<", r, end_row)):
                            for t, value in zip(token_ids, row_values):
                                at = builder.add(builder.mul(t, ops.out_cols), column)
                                builder.store(value, builder.gep(ops.out, [at]))

                with cgutils.for_range(builder, row_tiles) as row_loop:
                    r0 = builder.add(first_row, builder.mul(row_loop.index, ir.Constant(_I64, tile_rows)))
                    rows = [builder.add(r0, ir.Constant(_I64, k)) for k in range(tile_rows)]
                    last = builder.sub(end_row, ir.Constant(_I64, 1))
                    row_ids = [builder.select(builder.icmp_unsigned("<", r, end_row), r, last) for r in rows]
                    buf_row_bytes = builder.mul(padded, ir.Constant(_I64, group_bytes))
                    if q4_0:
                        emit_copy_q4_0_rows(builder, ops.codes, row_ids, ngroups, ops.buf_codes, ops.buf_scales,
                                            buf_row_bytes, padded, prefetch)
                    else:
                        emit_copy_rows(builder, (ops.codes, ops.scales, ops.zeros), row_ids, row_bytes, ngroups,
                                       ops.buf_codes, ops.buf_scales, buf_row_bytes, padded, group_bytes, zero_point,
                                       prefetch)
                    with cgutils.for_range(builder, full) as token_loop:
                        tile(rows, builder.mul(token_loop.index, ir.Constant(_I64, tile_tokens)), tile_tokens)
                    with cgutils.for_range(builder, builder.sub(tokens, rest_start)) as rest_loop:
                        tile(rows, builder.add(rest_start, rest_loop.index), 1)

            if q4_0:
                emit(32)
            else:
                emit_per_group_size(builder, ops.group_size, emit)
            return context.get_dummy_value()

        return signature, codegen

    return tiles_dots


_tiles_int4, _tiles_int8 = make_tiles_kernel(4), make_tiles_kernel(8)


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _matmul_kernel(bits, codes, scales, zeros, xperm, dx, xqsum, group_size, out):
    """out[t, r] = row r . x[t]; a parallel task takes ROWS_PER_TASK rows (flat matrix views inside)."""
    rows, groups = scales.shape
    padded = dx.shape[1]
    cols = np.uint64(groups * group_size)
    group = np.uint64(group_size)
    cflat, sflat, zflat = codes.reshape(codes.size), scales.reshape(scales.size), zeros.reshape(zeros.size)
    buf_bytes = TILE_ROWS * padded * group_size * bits // 8
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        first = np.uint64(task * ROWS_PER_TASK)
        end = np.uint64(min(rows, (task + 1) * ROWS_PER_TASK))
        buf_codes = np.empty(buf_bytes, np.uint8)
        buf_scales = np.empty(2 * TILE_ROWS * padded, np.float32)
        if bits == 4:
            _tiles_int4(cflat, sflat, zflat, xperm, dx, xqsum, out, buf_codes, buf_scales, first, end, first, cols, group)
        else:
            _tiles_int8(cflat, sflat, zflat, xperm, dx, xqsum, out, buf_codes, buf_scales, first, end, first, cols, group)


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _swiglu(gate, up):
    """gate[t, r] = silu(gate[t, r]) * up[t, r], in place."""
    for t in prange(gate.shape[0]):
        for r in range(gate.shape[1]):
            gate[t, r] = silu(gate[t, r]) * up[t, r]


def matmul(qm, x: np.ndarray, quantized=None) -> np.ndarray:
    """y [T, rows] = x [T, cols] @ W.T in tiles (int8x.supports(...) must hold); `quantized`: x's
    quantize_lanes output when the caller has it already."""
    xperm, dx, xqsum = quantized or quantize_lanes(x, qm.spec.group_size, qm.spec.bits)
    y = np.empty((x.shape[0], qm.rows), np.float32)
    _matmul_kernel(qm.spec.bits, *kernel_parts(qm), xperm, dx, xqsum, qm.spec.group_size, y)
    return y


def gate_up(w1, w3, x: np.ndarray) -> np.ndarray:
    """h [T, I] = silu(x @ w1.T) * (x @ w3.T), x quantized once for both."""
    quantized = quantize_lanes(x, w1.spec.group_size, w1.spec.bits)
    h = matmul(w1, x, quantized)
    _swiglu(h, matmul(w3, x, quantized))
    return h
