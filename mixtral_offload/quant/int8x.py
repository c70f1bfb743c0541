"""int2, int3, int4 and int8 weights times int8 activations: integer dot products per 64-byte block of codes.

The float kernels in kernels.py decode every nibble to float and stay compute-bound at ~25-30% of
memory bandwidth. Here x is quantized once per call to int8 per weight group (symmetric, one float
scale per group, as llama.cpp's Q8 does), and the dot products run on integers:

    row . x = sum_g s_g dx_g (sum_k q_k xq_k) - sum_g s_g z_g (dx_g sum_k xq_k)

One 64-byte block of a row's codes holds 128 weights: low nibbles are elements j of their group,
high nibbles elements j + G/2 (the pool's layout). `quantize_activations` writes xq permuted to
the same order, [lo 64 B | hi 64 B] per block, so each block takes two `vpdpbusd` (AVX-512 VNNI:
u8 x s8 -> int32, 4 products per lane) with no shuffles, one int->float conversion, and one FMA with
the per-lane scale s_g dx_g. Groups of 32/64/128 map to 4/8/16 int32 lanes of a block.

int2 and int3 (quant/lowbit.py) are the same with four 2-bit planes per byte: a block of 64 bytes holds
256 weights, xq is permuted to [plane 0 | 1 | 2 | 3] x 64 B, and each plane is a shift and a mask
then one `vpdpbusd`. int3 adds a 64-bit mask per plane and block, adding 4 to the plane's bytes under it.

int8 weights (symmetric, q in -127..127) are read by VNNI as u = q + 128 (an XOR of the sign bit),
and a block of 64 takes sum u xq - 128 sum xq: two `vpdpbusd` on the same x, no zero points. x stays
in its natural order for them.

Numba widens small-integer arithmetic to int64, so the block loop is written in LLVM IR through a
Numba intrinsic. Where the CPU has no AVX-512 VNNI, the same IR computes the integer dot products
with generic vector ops (widen, multiply, add pairs), which LLVM lowers for any target: correct
everywhere. With AVX2 and no VNNI, pmaddubsw/pmaddwd on 256-bit halves (llama.cpp's AVX2 route; int8
weights as |q| against x with q's sign, so no pair sum saturates). `ISA` says which one this process
compiled; the tests build the other two here and compare.

Applies where cols is a whole number of blocks (BLOCK_COLS: 128 for int4, 256 for int2/int3, 64 for int8);
`supports()` says so, and the callers in kernels.py keep the exact float kernels otherwise.
Results equal the float64 reference on the dequantized weights and the dequantized int8 x
(`reference_matmul`) within ~1e-6 relative; against the float x they differ by the activation
rounding (~0.5% of the largest output on Gaussian data, 0.03 points of relative Frobenius error).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from mixtral_offload.quant.format import kernel_parts
from mixtral_offload.quant.swiglu import silu
from mixtral_offload.quant.int8x_ir import ISAS  # noqa: F401  (the forms callers may build)
from mixtral_offload.quant.int8x_ir import (
    _F32, _I32, _I64, _V16F, _V16I32, _V64I8, ISA, _halfs_to_float, _horizontal_sum, _int_dot, _load,
    _Operands, _prefetch_l2, _signed_int_dot,
)

BLOCK_BYTES = 64  # codes per block: one zmm load, 128 int4, 256 int2/int3 or 64 int8 weights
# Planes per code byte, by bit width: int4 two nibbles, int2/int3 four 2-bit fields (quant/lowbit.py;
# int3 adds 32 high-bit bytes per block); int8 one code per byte in natural order.
PLANES = {2: 4, 3: 4, 4: 2, 8: 1}
PLANE_BITS = {2: 2, 3: 2, 4: 4, 8: 8}
BLOCK_COLS = {bits: planes * BLOCK_BYTES for bits, planes in PLANES.items()}  # weights per block
ROWS_PER_TASK = 64
# Software prefetch of the codes 8 KiB ahead into L2 (prefetcht1). The hardware prefetchers alone
# left one thread at 16-20 GB/s on Mixtral's w1/w2 int4 g64; with it 27 GB/s, and 2 threads 33 GB/s,
# ~95% of a plain parallel sum's read rate (distances 1, 2, 4 and 8 KiB measured; 4-8 KiB best).
PREFETCH_BYTES = 8192

def supports(bits: int, cols: int) -> bool:
    """Whether a [rows, cols] matrix of this bit width can use the int8-activation kernels."""
    return bits in BLOCK_COLS and cols % BLOCK_COLS[bits] == 0


# --- activation quantization ---


@njit(cache=True, fastmath=True, nogil=True)
def group_scale(x, t, base, group_size):
    """(dx, 1 / dx) of x[t, base : base + group_size]: dx = max|x| / 127 (1 / dx = 0 for a zero group)."""
    amax = np.float32(0.0)
    for j in range(group_size):
        amax = max(amax, abs(x[t, base + j]))
    return amax * np.float32(1.0 / 127.0), (np.float32(127.0) / amax if amax > 0 else np.float32(0.0))


@njit(cache=True, fastmath=True, nogil=True)
def _quantize_activations(x, group_size, planes, xperm, dx, xqsum):
    """Per token and group: dx = max|x| / 127, xq = round(x / dx), in the block order of codes with
    `planes` planes per byte (1: natural order)."""
    part = group_size // planes
    for t in range(x.shape[0]):
        for g in range(x.shape[1] // group_size):
            base = g * group_size
            scale, inv = group_scale(x, t, base, group_size)
            total = 0
            for j in range(group_size):
                q = np.int32(np.rint(x[t, base + j] * inv))
                total += q
                # element j of the group is in plane j // part of code byte g * part + j % part
                p = g * part + (j % part)
                block, pos = p // BLOCK_BYTES, p % BLOCK_BYTES
                xperm[t, (block * planes + j // part) * BLOCK_BYTES + pos] = q
            dx[t, g] = scale
            xqsum[t, g] = scale * np.float32(total)


def quantize_activations(x: np.ndarray, group_size: int, bits: int = 4):
    """(xperm int8 [T, cols], dx float32 [T, cols/G], xqsum float32 [T, cols/G]) for x [T, cols].

    xperm is in the order the weights' codes are read: by planes of each block, natural for int8.
    """
    tokens, cols = x.shape
    xperm = np.empty((tokens, cols), np.int8)
    dx = np.empty((tokens, cols // group_size), np.float32)
    xqsum = np.empty((tokens, cols // group_size), np.float32)
    _quantize_activations(x, group_size, PLANES[bits], xperm, dx, xqsum)
    return xperm, dx, xqsum


def dequantized_activations(x: np.ndarray, group_size: int) -> np.ndarray:
    """The float32 x [T, cols] the int8 kernels compute with (for references and error reports)."""
    tokens, cols = x.shape
    groups = x.reshape(tokens, cols // group_size, group_size)
    amax = np.abs(groups).max(axis=2, keepdims=True)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(groups * inv)
    return (q * (amax * np.float32(1.0 / 127.0))).reshape(tokens, cols).astype(np.float32)


# --- the block loop, in LLVM IR ---

def _decode_planes(builder, codes, code_at, codes_b, bits):
    """The <64 x i8> codes of each plane of the block at codes[code_at] (codes_b: its first 64 bytes).

    int3: after the planes, one 64-bit mask per plane; 4 is added to plane p's bytes under mask p
    (on AVX-512BW a mask-register load and a masked add).
    """
    width = PLANE_BITS[bits]
    mask = ir.Constant(_V64I8, [(1 << width) - 1] * 64)
    planes = []
    for p in range(PLANES[bits]):
        shifted = builder.lshr(codes_b, ir.Constant(_V64I8, [width * p] * 64)) if p else codes_b
        planes.append(builder.and_(shifted, mask) if p < PLANES[bits] - 1 else shifted)
    if bits != 3:
        return planes
    four = ir.Constant(_V64I8, [4] * 64)
    for p in range(PLANES[bits]):
        high = _load(builder, codes, builder.add(code_at, ir.Constant(_I64, BLOCK_BYTES + 8 * p)), _I64)
        is_set = builder.bitcast(high, ir.VectorType(ir.IntType(1), 64))
        planes[p] = builder.select(is_set, builder.add(planes[p], four), planes[p])
    return planes


def _emit_row_dots(builder, ops, bits, group_size, tokens, t0, code_off, scale_off, nblocks, isa, prefetch):
    """IR for the dot products of one row with x[t0 : t0 + tokens]: a list of float32 values.

    code_off/scale_off: the row's first element in the flat codes and scales/zeros; nblocks = cols
    / BLOCK_COLS[bits]. Each 64-byte block of codes is decoded once and used for every token.
    """
    block_cols = BLOCK_COLS[bits]
    block_bytes = BLOCK_BYTES * bits // PLANE_BITS[bits]  # code bytes per block: int3 adds 32 of masks
    # int32 lane l of a block sums weights 4l..4l+3 of each plane's 64 bytes: of group (4l) // (G/planes)
    # (a byte holds elements j + p G/planes of its group); an int8 group of 128 spans 2 blocks
    group_bytes = group_size // PLANES[bits]
    groups_per_block = max(1, BLOCK_BYTES // group_bytes)
    expand = ir.Constant(ir.VectorType(_I32, 16), [(4 * lane) // group_bytes for lane in range(16)])
    small = ir.VectorType(_F32, groups_per_block)
    # one token: two accumulators over alternate blocks (one FMA chain would bound the loop by its
    # latency); a tile of tokens has a chain per token already
    chains = 2 if tokens == 1 else 1
    cols = builder.mul(nblocks, ir.Constant(_I64, block_cols))
    ngroups = builder.udiv(cols, ir.Constant(_I64, group_size))
    x_rows, dx_rows, xqsum_rows = [], [], []
    for i in range(tokens):
        t = builder.add(t0, ir.Constant(_I64, i))
        x_rows.append(builder.gep(ops.xperm, [builder.mul(t, cols)]))
        dx_rows.append(builder.gep(ops.dx, [builder.mul(t, ngroups)]))
        xqsum_rows.append(builder.gep(ops.xqsum, [builder.mul(t, ngroups)]))
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(_V16F, None)) for _ in range(chains)] for _ in range(tokens)]
    zero_terms = [cgutils.alloca_once_value(builder, ir.Constant(small, None)) for _ in range(tokens)]

    def block(b, chain):
        code_at = builder.add(code_off, builder.mul(b, ir.Constant(_I64, block_bytes)))
        for line in range(0, block_bytes if prefetch else 0, BLOCK_BYTES):  # int3's 96-byte blocks: 2 lines
            _prefetch_l2(builder, builder.gep(ops.codes, [builder.add(code_at, ir.Constant(_I64, prefetch + line))]))
        codes_b = _load(builder, ops.codes, code_at, _V64I8)
        g0 = builder.udiv(builder.mul(b, ir.Constant(_I64, BLOCK_BYTES)), ir.Constant(_I64, group_bytes))
        s = _halfs_to_float(builder, ops.scales, builder.add(scale_off, g0), groups_per_block)
        x_off = builder.mul(b, ir.Constant(_I64, block_cols))
        if bits != 8:
            planes = _decode_planes(builder, ops.codes, code_at, codes_b, bits)
            sz = builder.fmul(s, _halfs_to_float(builder, ops.zeros, builder.add(scale_off, g0), groups_per_block))
        for i in range(tokens):
            if bits != 8:
                ints = ir.Constant(_V16I32, None)
                for p, plane in enumerate(planes):
                    x_p = _load(builder, x_rows[i], builder.add(x_off, ir.Constant(_I64, p * BLOCK_BYTES)), _V64I8)
                    ints = _int_dot(builder, ints, plane, x_p, isa)
            else:
                ints = _signed_int_dot(builder, codes_b, _load(builder, x_rows[i], x_off, _V64I8), isa)
            d = _load(builder, dx_rows[i], g0, small)
            lane_scale = builder.shuffle_vector(builder.fmul(s, d), ir.Constant(small, ir.Undefined), expand)
            acc = accs[i][chain]
            builder.store(builder.call(fma, [builder.sitofp(ints, _V16F), lane_scale, builder.load(acc)]), acc)
            if bits != 8:
                zt = builder.fmul(sz, _load(builder, xqsum_rows[i], g0, small))
                builder.store(builder.fadd(builder.load(zero_terms[i]), zt), zero_terms[i])

    steps = builder.udiv(nblocks, ir.Constant(_I64, chains))
    with cgutils.for_range(builder, steps) as loop:
        first = builder.mul(loop.index, ir.Constant(_I64, chains))
        for chain in range(chains):
            block(builder.add(first, ir.Constant(_I64, chain)), chain)
    if chains == 2:
        odd = builder.icmp_unsigned("!=", builder.urem(nblocks, ir.Constant(_I64, 2)), ir.Constant(_I64, 0))
        with builder.if_then(odd):
            block(builder.sub(nblocks, ir.Constant(_I64, 1)), 0)

    results = []
    for i in range(tokens):
        total = builder.load(accs[i][0])
        for chain in range(1, chains):
            total = builder.fadd(total, builder.load(accs[i][chain]))
        results.append(builder.fsub(_horizontal_sum(builder, total),
                                    _horizontal_sum(builder, builder.load(zero_terms[i]))))
    return results


TILE = 4  # tokens per pass over a row when several tokens go through one matrix (prefill)
# From this many tokens (by bit width), matmul and gate_up run int8x_tiles' row x token tiles: measured
# faster from 2 tokens on for int4 and from 6 for int8 (from DRAM; in cache from 2 for both)
TILES_MIN_TOKENS = {4: 2, 8: 6}  # int2/int3 have no tile kernel: their tokens go TILE at a time


def _tiles(bits: int, tokens: int) -> bool:
    """Whether int8x_tiles takes this many tokens of this bit width."""
    return bits in TILES_MIN_TOKENS and tokens >= TILES_MIN_TOKENS[bits]


GROUP_SIZES = (32, 64, 128)


def emit_per_group_size(builder, group_size_v, emit) -> None:
    """IR calling emit(G) under `if group_size_v == G` for each G in GROUP_SIZES (G is a codegen constant)."""
    for group_size in GROUP_SIZES:
        with builder.if_then(builder.icmp_unsigned("==", group_size_v, ir.Constant(_I64, group_size))):
            emit(group_size)


def make_rows_kernel(bits: int, isa: str = ISA, prefetch: int = PREFETCH_BYTES):
    """An intrinsic: rows_dots(codes, scales, zeros, xperm, dx, xqsum, out, r_start, r_end, out_start, G).

    For rows r_start <= r < r_end of an int2/int3/int4/int8 matrix (codes/scales/zeros: its flat views) with
    group size G and every token t of quantize_activations' output (all arrays C-contiguous):
    out[t, out_start + r - r_start] = row r . x[t]. Tokens go TILE at a time, the rest one by one.
    The row loop is in the IR: a call per row from Numba cost ~40 ns of fixed work, as much as 9
    blocks of codes (measured on 3584x1024). The loop is emitted once per group size in GROUP_SIZES.
    """

    @intrinsic
    def rows_dots(typingctx, codes, scales, zeros, xperm, dx, xqsum, out, r_start, r_end, out_start, group_size):
        signature = types.none(codes, scales, zeros, xperm, dx, xqsum, out, r_start, r_end, out_start, group_size)

        def codegen(context, builder, sig, args):
            ops = _Operands(context, builder, sig, args)
            tokens, cols, out_cols = ops.tokens, ops.cols, ops.out_cols
            first_row, end_row, out_first = ops.first_row, ops.end_row, ops.out_first
            nblocks = builder.udiv(cols, ir.Constant(_I64, BLOCK_COLS[bits]))
            row_bytes = builder.udiv(builder.mul(cols, ir.Constant(_I64, bits)), ir.Constant(_I64, 8))
            tiles = builder.udiv(tokens, ir.Constant(_I64, TILE))
            rest = builder.urem(tokens, ir.Constant(_I64, TILE))

            def store(t, column, value):
                builder.store(value, builder.gep(ops.out, [builder.add(builder.mul(t, out_cols), column)]))

            def emit_rows(group_size):
                ngroups = builder.udiv(cols, ir.Constant(_I64, group_size))
                with cgutils.for_range(builder, builder.sub(end_row, first_row)) as row_loop:
                    r = builder.add(first_row, row_loop.index)
                    column = builder.add(out_first, row_loop.index)
                    code_off, scale_off = builder.mul(r, row_bytes), builder.mul(r, ngroups)
                    with cgutils.for_range(builder, tiles) as tile_loop:
                        t0 = builder.mul(tile_loop.index, ir.Constant(_I64, TILE))
                        values = _emit_row_dots(builder, ops, bits, group_size, TILE, t0, code_off, scale_off,
                                                nblocks, isa, prefetch)
                        for i, value in enumerate(values):
                            store(builder.add(t0, ir.Constant(_I64, i)), column, value)
                    with cgutils.for_range(builder, rest) as rest_loop:
                        t = builder.add(builder.mul(tiles, ir.Constant(_I64, TILE)), rest_loop.index)
                        (value,) = _emit_row_dots(builder, ops, bits, group_size, 1, t, code_off, scale_off,
                                                  nblocks, isa, prefetch)
                        store(t, column, value)

            emit_per_group_size(builder, ops.group_size, emit_rows)
            return context.get_dummy_value()

        return signature, codegen

    return rows_dots


_rows_int2, _rows_int3, _rows_int4, _rows_int8 = (make_rows_kernel(bits) for bits in (2, 3, 4, 8))


@njit(cache=True, fastmath=True, nogil=True)
def _rows(bits, codes, scales, zeros, xperm, dx, xqsum, group_size, out, r_start, r_end, out_start):
    """out[t, out_start + r - r_start] = row r . x[t] for r in [r_start, r_end) (flat matrix views)."""
    first, end, column, group = np.uint64(r_start), np.uint64(r_end), np.uint64(out_start), np.uint64(group_size)
    if bits == 4:
        _rows_int4(codes, scales, zeros, xperm, dx, xqsum, out, first, end, column, group)
    elif bits == 3:
        _rows_int3(codes, scales, zeros, xperm, dx, xqsum, out, first, end, column, group)
    elif bits == 2:
        _rows_int2(codes, scales, zeros, xperm, dx, xqsum, out, first, end, column, group)
    else:
        _rows_int8(codes, scales, zeros, xperm, dx, xqsum, out, first, end, column, group)


# --- parallel drivers: rows in order, one read stream per thread (measured faster from DRAM than
# 2 or 4 rows at once, which are faster only when the matrix sits in cache) ---


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _matvec_kernel(bits, codes, scales, zeros, xperm, dx, xqsum, group_size, out):
    """out[t, r] = row r . x[t] for every token t of the quantized activations."""
    rows = scales.shape[0]
    cflat = codes.reshape(codes.size)
    sflat = scales.reshape(scales.size)
    zflat = zeros.reshape(zeros.size)
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        first = task * ROWS_PER_TASK
        _rows(bits, cflat, sflat, zflat, xperm, dx, xqsum, group_size, out, first, min(rows, first + ROWS_PER_TASK), first)


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _gate_up_kernel(bits, codes1, scales1, zeros1, codes3, scales3, zeros3, xperm, dx, xqsum, group_size, h):
    """h[t, r] = silu(w1[r] . x[t]) * (w3[r] . x[t]), a task's rows of w1 then the same rows of w3."""
    rows = scales1.shape[0]
    tokens = xperm.shape[0]
    c1 = codes1.reshape(codes1.size)
    s1 = scales1.reshape(scales1.size)
    z1 = zeros1.reshape(zeros1.size)
    c3 = codes3.reshape(codes3.size)
    s3 = scales3.reshape(scales3.size)
    z3 = zeros3.reshape(zeros3.size)
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        first = task * ROWS_PER_TASK
        end = min(rows, first + ROWS_PER_TASK)
        gate = np.empty((tokens, ROWS_PER_TASK), np.float32)
        up = np.empty((tokens, ROWS_PER_TASK), np.float32)
        _rows(bits, c1, s1, z1, xperm, dx, xqsum, group_size, gate, first, end, 0)
        _rows(bits, c3, s3, z3, xperm, dx, xqsum, group_size, up, first, end, 0)
        for t in range(tokens):
            for i in range(end - first):
                h[t, first + i] = silu(gate[t, i]) * up[t, i]


def matmul(qm, x: np.ndarray) -> np.ndarray:
    """y [T, rows] = x [T, cols] @ W.T with x quantized to int8 per group (supports(...) must hold)."""
    if _tiles(qm.spec.bits, x.shape[0]):
        from mixtral_offload.quant import int8x_tiles  # it builds on this module's IR

        return int8x_tiles.matmul(qm, x)
    xperm, dx, xqsum = quantize_activations(x, qm.spec.group_size, qm.spec.bits)
    y = np.empty((x.shape[0], qm.rows), np.float32)
    _matvec_kernel(qm.spec.bits, *kernel_parts(qm), xperm, dx, xqsum, qm.spec.group_size, y)
    return y


def gate_up(w1, w3, x: np.ndarray) -> np.ndarray:
    """h [T, I] = silu(x @ w1.T) * (x @ w3.T) with x quantized to int8 per group."""
    if _tiles(w1.spec.bits, x.shape[0]):
        from mixtral_offload.quant import int8x_tiles

        return int8x_tiles.gate_up(w1, w3, x)
    xperm, dx, xqsum = quantize_activations(x, w1.spec.group_size, w1.spec.bits)
    h = np.empty((x.shape[0], w1.rows), np.float32)
    _gate_up_kernel(w1.spec.bits, *kernel_parts(w1), *kernel_parts(w3), xperm, dx, xqsum, w1.spec.group_size, h)
    return h


def expert_forward(w1, w3, w2, x: np.ndarray) -> np.ndarray:
    """y [T, D] = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T, both halves on int8 activations."""
    return matmul(w2, gate_up(w1, w3, x))


def reference_matmul(qm, x: np.ndarray) -> np.ndarray:
    """float64 NumPy reference of matmul: dequantized W times the dequantized int8 x."""
    from mixtral_offload.quant.quantize import dequantize

    xd = dequantized_activations(x, qm.spec.group_size).astype(np.float64)
    return (xd @ dequantize(qm).astype(np.float64).T).astype(np.float32)
