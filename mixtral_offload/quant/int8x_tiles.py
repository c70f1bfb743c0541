"""Many-token int8-activation kernels (prefill): a tile of rows x tokens reads each weight block once.

int8x.py's kernels pass over a row once per 4 tokens, reloading the tokens' x for every row and
summing the zero-point terms block by block. Here a tile of TILE_ROWS rows x TILE_TOKENS tokens keeps
its accumulators in registers: each 64-byte block of the tile's rows is loaded once and multiplied
into every token of the tile, each token's x block once and multiplied into every row. Per row,
token and block what remains is the integer dot (int8x's `_int_dot` / `_signed_int_dot`, in the
same three instruction sets), one int->float conversion, one scale product and one FMA. The int4
zero-point terms sum_g s_g z_g xqsum_g are a separate short dot product per row and token after the
block loop (16 groups per vector), and int8 weights under VNNI start their accumulator at
-128 sum xq (once per token and block), so a block costs one `vpdpbusd` per row and token.

Tokens past the last whole tile go one at a time; rows past the end repeat the last row and are not
stored. Results equal int8x's (and `int8x.reference_matmul`) within float32 rounding of a
reassociated sum.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from mixtral_offload.quant.format import kernel_parts
from mixtral_offload.quant.int8x import (
    BLOCK_BYTES, BLOCK_COLS, PREFETCH_BYTES, ROWS_PER_TASK, emit_per_group_size, quantize_activations, silu,
)
from mixtral_offload.quant.int8x_ir import (
    _F32, _I32, _I64, _V16F, _V16I32, _V64I8, ISA, _halfs_to_float, _horizontal_sum, _int_dot, _load, _Operands,
    _prefetch_l2, _signed_int_dot,
)

TILE_ROWS = 4
TILE_TOKENS = 4
ZERO_TERM_WIDTH = 16  # groups per vector in the int4 zero-point dot product


def _emit_tile(builder, ops, bits, group_size, isa, row_ids, token_ids, prefetch):
    """IR for the dot products of rows row_ids with tokens token_ids: values[r][t] (float32)."""
    block_cols, cols = BLOCK_COLS[bits], ops.cols
    group_bytes = group_size // 2 if bits == 4 else group_size  # code bytes per group
    groups_per_block = max(1, BLOCK_BYTES // group_bytes)
    expand = ir.Constant(ir.VectorType(_I32, 16), [(4 * lane) // group_bytes for lane in range(16)])
    small = ir.VectorType(_F32, groups_per_block)
    nblocks = builder.udiv(cols, ir.Constant(_I64, block_cols))
    ngroups = builder.udiv(cols, ir.Constant(_I64, group_size))
    row_bytes = builder.udiv(cols, ir.Constant(_I64, 8 // bits))
    code_offs = [builder.mul(r, row_bytes) for r in row_ids]
    scale_offs = [builder.mul(r, ngroups) for r in row_ids]
    x_rows = [builder.gep(ops.xperm, [builder.mul(t, cols)]) for t in token_ids]
    dx_rows = [builder.gep(ops.dx, [builder.mul(t, ngroups)]) for t in token_ids]
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
    zero_i = ir.Constant(_V16I32, None)
    bias = ir.Constant(_V64I8, [0x80] * 64)
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(_V16F, None)) for _ in token_ids] for _ in row_ids]

    with cgutils.for_range(builder, nblocks) as loop:
        b = loop.index
        code_at = builder.mul(b, ir.Constant(_I64, BLOCK_BYTES))
        g0 = builder.udiv(code_at, ir.Constant(_I64, group_bytes))
        x_off = builder.mul(b, ir.Constant(_I64, block_cols))
        weights = []
        for code_off, scale_off in zip(code_offs, scale_offs):
            at = builder.add(code_off, code_at)
            if prefetch:
                _prefetch_l2(builder, builder.gep(ops.codes, [builder.add(at, ir.Constant(_I64, prefetch))]))
            codes_b = _load(builder, ops.codes, at, _V64I8)
            s = _halfs_to_float(builder, ops.scales, builder.add(scale_off, g0), groups_per_block)
            if bits == 4:
                parts = (builder.and_(codes_b, ir.Constant(_V64I8, [15] * 64)),
                         builder.lshr(codes_b, ir.Constant(_V64I8, [4] * 64)))
            else:  # VNNI reads q + 128 as u8 (see int8x), the other forms take q as it is
                parts = (builder.xor(codes_b, bias) if isa == "vnni" else codes_b,)
            weights.append((parts, builder.shuffle_vector(s, ir.Constant(small, ir.Undefined), expand)))
        for i, (x_row, dx_row) in enumerate(zip(x_rows, dx_rows)):
            xs = [_load(builder, x_row, x_off, _V64I8)]
            if bits == 4:
                xs.append(_load(builder, x_row, builder.add(x_off, ir.Constant(_I64, BLOCK_BYTES)), _V64I8))
            d = builder.shuffle_vector(_load(builder, dx_row, g0, small), ir.Constant(small, ir.Undefined), expand)
            if bits == 8 and isa == "vnni":  # -128 sum xq per lane: the accumulator's start for every row
                start = builder.sub(zero_i, _int_dot(builder, zero_i, bias, xs[0], isa))
            for r, (parts, s_lanes) in enumerate(weights):
                if bits == 4:
                    ints = _int_dot(builder, _int_dot(builder, zero_i, parts[0], xs[0], isa), parts[1], xs[1], isa)
                elif isa == "vnni":
                    ints = _int_dot(builder, start, parts[0], xs[0], isa)
                else:
                    ints = _signed_int_dot(builder, parts[0], xs[0], isa)
                acc = accs[r][i]
                value = builder.call(fma, [builder.sitofp(ints, _V16F), builder.fmul(s_lanes, d), builder.load(acc)])
                builder.store(value, acc)
    values = [[_horizontal_sum(builder, builder.load(acc)) for acc in row] for row in accs]
    if bits == 4:
        zero_terms = _emit_zero_terms(builder, ops, scale_offs, token_ids, ngroups)
        values = [[builder.fsub(v, z) for v, z in zip(vs, zs)] for vs, zs in zip(values, zero_terms)]
    return values


def _emit_zero_terms(builder, ops, scale_offs, token_ids, ngroups):
    """IR for sum_g s_g z_g xqsum[t, g] per row and token: ZERO_TERM_WIDTH groups a step, then one."""
    xqsum_rows = [builder.gep(ops.xqsum, [builder.mul(t, ngroups)]) for t in token_ids]
    totals = [[ir.Constant(_F32, 0.0) for _ in token_ids] for _ in scale_offs]
    wide = builder.mul(builder.udiv(ngroups, ir.Constant(_I64, ZERO_TERM_WIDTH)), ir.Constant(_I64, ZERO_TERM_WIDTH))
    for width, start, end in ((ZERO_TERM_WIDTH, ir.Constant(_I64, 0), wide), (1, wide, ngroups)):
        vector = ir.VectorType(_F32, width)
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(vector, None)) for _ in token_ids] for _ in scale_offs]
        steps = builder.udiv(builder.sub(end, start), ir.Constant(_I64, width))
        with cgutils.for_range(builder, steps) as loop:
            g = builder.add(start, builder.mul(loop.index, ir.Constant(_I64, width)))
            sz = [builder.fmul(_halfs_to_float(builder, ops.scales, builder.add(off, g), width),
                               _halfs_to_float(builder, ops.zeros, builder.add(off, g), width)) for off in scale_offs]
            for i, xqsum_row in enumerate(xqsum_rows):
                xs = _load(builder, xqsum_row, g, vector)
                for r, row_sz in enumerate(sz):
                    builder.store(builder.fadd(builder.load(accs[r][i]), builder.fmul(row_sz, xs)), accs[r][i])
        totals = [[builder.fadd(total, _horizontal_sum(builder, builder.load(acc))) for total, acc in zip(trow, arow)]
                  for trow, arow in zip(totals, accs)]
    return totals


def make_tiles_kernel(bits: int, isa: str = ISA, prefetch: int = PREFETCH_BYTES,
                      tile: tuple[int, int] = (TILE_ROWS, TILE_TOKENS)):
    """An intrinsic with int8x.make_rows_kernel's signature and result, computed in tiles of
    tile = (rows, tokens) (rows r_start..r_end, every token of xperm)."""
    tile_rows, tile_tokens = tile

    @intrinsic
    def tiles_dots(typingctx, codes, scales, zeros, xperm, dx, xqsum, out, r_start, r_end, out_start, group_size):
        signature = types.none(codes, scales, zeros, xperm, dx, xqsum, out, r_start, r_end, out_start, group_size)

        def codegen(context, builder, sig, args):
            ops = _Operands(context, builder, sig, args)
            tokens, first_row, end_row = ops.tokens, ops.first_row, ops.end_row
            row_tiles = builder.udiv(builder.add(builder.sub(end_row, first_row), ir.Constant(_I64, tile_rows - 1)),
                                     ir.Constant(_I64, tile_rows))
            full = builder.udiv(tokens, ir.Constant(_I64, tile_tokens))
            rest_start = builder.mul(full, ir.Constant(_I64, tile_tokens))

            def tile(group_size, rows, row_ids, t0, count):  # rows x tokens t0..t0+count, stored where r < end
                token_ids = [builder.add(t0, ir.Constant(_I64, k)) for k in range(count)]
                values = _emit_tile(builder, ops, bits, group_size, isa, row_ids, token_ids, prefetch)
                for r, row_values in zip(rows, values):
                    column = builder.add(ops.out_first, builder.sub(r, first_row))
                    with builder.if_then(builder.icmp_unsigned("<", r, end_row)):
                        for t, value in zip(token_ids, row_values):
                            at = builder.add(builder.mul(t, ops.out_cols), column)
                            builder.store(value, builder.gep(ops.out, [at]))

            def emit(group_size):
                with cgutils.for_range(builder, row_tiles) as row_loop:
                    r0 = builder.add(first_row, builder.mul(row_loop.index, ir.Constant(_I64, tile_rows)))
                    rows = [builder.add(r0, ir.Constant(_I64, k)) for k in range(tile_rows)]
                    last = builder.sub(end_row, ir.Constant(_I64, 1))
                    row_ids = [builder.select(builder.icmp_unsigned("<", r, end_row), r, last) for r in rows]
                    with cgutils.for_range(builder, full) as token_loop:
                        tile(group_size, rows, row_ids, builder.mul(token_loop.index, ir.Constant(_I64, tile_tokens)),
                             tile_tokens)
                    with cgutils.for_range(builder, builder.sub(tokens, rest_start)) as rest_loop:
                        tile(group_size, rows, row_ids, builder.add(rest_start, rest_loop.index), 1)

            emit_per_group_size(builder, ops.group_size, emit)
            return context.get_dummy_value()

        return signature, codegen

    return tiles_dots


_tiles_int4, _tiles_int8 = make_tiles_kernel(4), make_tiles_kernel(8)


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _matmul_kernel(bits, codes, scales, zeros, xperm, dx, xqsum, group_size, out):
    """out[t, r] = row r . x[t]; a parallel task takes ROWS_PER_TASK rows (flat matrix views inside)."""
    rows = scales.shape[0]
    group = np.uint64(group_size)
    cflat, sflat, zflat = codes.reshape(codes.size), scales.reshape(scales.size), zeros.reshape(zeros.size)
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        first = np.uint64(task * ROWS_PER_TASK)
        end = np.uint64(min(rows, (task + 1) * ROWS_PER_TASK))
        if bits == 4:
            _tiles_int4(cflat, sflat, zflat, xperm, dx, xqsum, out, first, end, first, group)
        else:
            _tiles_int8(cflat, sflat, zflat, xperm, dx, xqsum, out, first, end, first, group)


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _swiglu(gate, up):
    """gate[t, r] = silu(gate[t, r]) * up[t, r], in place."""
    for t in prange(gate.shape[0]):
        for r in range(gate.shape[1]):
            gate[t, r] = silu(gate[t, r]) * up[t, r]


def matmul(qm, x: np.ndarray, quantized=None) -> np.ndarray:
    """y [T, rows] = x [T, cols] @ W.T in tiles (int8x.supports(...) must hold); `quantized`: x's
    quantize_activations output when the caller has it already."""
    xperm, dx, xqsum = quantized or quantize_activations(x, qm.spec.group_size, qm.spec.bits)
    y = np.empty((x.shape[0], qm.rows), np.float32)
    _matmul_kernel(qm.spec.bits, *kernel_parts(qm), xperm, dx, xqsum, qm.spec.group_size, y)
    return y


def gate_up(w1, w3, x: np.ndarray) -> np.ndarray:
    """h [T, I] = silu(x @ w1.T) * (x @ w3.T), x quantized once for both."""
    quantized = quantize_activations(x, w1.spec.group_size, w1.spec.bits)
    h = matmul(w1, x, quantized)
    _swiglu(h, matmul(w3, x, quantized))
    return h
