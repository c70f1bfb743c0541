"""LLVM IR vector steps of the GGUF kernels: byte unpacking, float expansion, and code vectors read
straight from a type's blocks for the int8 dot (gguf_int8.py).

Written as Numba intrinsics because LLVM leaves the same Numba loops scalar: a block's loops run
16-32 iterations, too few to pay for the runtime check that the codes buffer and the tensor's bytes
do not overlap, so every byte went through a scalar and/shift/store (docs/gguf.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from mixtral_offload.quant.int8x_ir import _F32, _I8, _I16, _I32, _I64, _data_pointer, _load


def _splat(builder, value, vector_type):
    """A vector of `value` (an IR integer) in every lane of vector_type."""
    single = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(single, ir.Constant(vector_type, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, vector_type.count), [0] * vector_type.count))


def _store(builder, value, base, offset):
    builder.store(value, builder.bitcast(builder.gep(base, [offset]), value.type.as_pointer()), align=1)


@intrinsic
def half_at(typingctx, raw, offset):
    """The float16 at raw[offset] (any alignment) as float32, by the CPU's conversion (Numba has no
    float16; a 256 KiB lookup table per block read was slower)."""

    def codegen(context, builder, sig, args):
        return _half(builder, _data_pointer(context, builder, sig.args[0], args[0]), args[1])

    return types.float32(raw, offset), codegen


def _half(b, base, at):
    bits = b.load(b.bitcast(b.gep(base, [at]), _I16.as_pointer()), align=1)
    return b.fpext(b.bitcast(bits, ir.HalfType()), _F32)


def make_byte_op(width: int, n_in: int, compute):
    """An intrinsic op(raw, u, offsets, param): loads n_in <width x i8> vectors from raw at offsets[:n_in],
    and stores the vectors compute(builder, inputs, param) returns into u at offsets[n_in:]."""

    @intrinsic
    def op(typingctx, raw, u, offsets, param):
        def codegen(context, builder, sig, args):
            src = _data_pointer(context, builder, sig.args[0], args[0])
            dst = _data_pointer(context, builder, sig.args[1], args[1])
            at = cgutils.unpack_tuple(builder, args[2], len(sig.args[2]))
            inputs = [_load(builder, src, offset, ir.VectorType(_I8, width)) for offset in at[:n_in]]
            for offset, value in zip(at[n_in:], compute(builder, inputs, args[3])):
                _store(builder, value, dst, offset)
            return context.get_dummy_value()

        return types.none(raw, u, offsets, param), codegen

    return op


def _const(vector, value):
    return ir.Constant(vector.type, [value] * vector.type.count)


def _nibbles(b, inputs, param):
    (q,) = inputs
    return [b.and_(q, _const(q, 15)), b.lshr(q, _const(q, 4))]


def _five_bits(b, inputs, param):
    # Q5_K: qh shifted right by param holds the 5th bit of the low nibbles in bit 0, of the high in bit 1
    q, h = inputs
    h = b.lshr(h, _splat(b, b.trunc(param, _I8), h.type))
    return [b.or_(b.and_(q, _const(q, 15)), b.shl(b.and_(h, _const(h, 1)), _const(h, 4))),
            b.or_(b.lshr(q, _const(q, 4)), b.shl(b.and_(h, _const(h, 2)), _const(h, 3)))]


def _six_bits(b, inputs, param):
    # Q6_K: a, c: ql bytes j and j + 32; h: qh byte j, its 2-bit pairs the top bits of a lo, c lo, a hi, c hi
    a, c, h = inputs
    low = _const(a, 15)
    return [b.or_(b.and_(a, low), b.shl(b.and_(h, _const(h, 3)), _const(h, 4))),
            b.or_(b.and_(c, low), b.shl(b.and_(h, _const(h, 12)), _const(h, 2))),
            b.or_(b.lshr(a, _const(a, 4)), b.and_(h, _const(h, 48))),
            b.or_(b.lshr(c, _const(c, 4)), b.lshr(b.and_(h, _const(h, 192)), _const(h, 2)))]


nibbles16 = make_byte_op(16, 1, _nibbles)  # (src, lo, hi): u[lo:+16] = low nibbles, u[hi:+16] = high
nibbles32 = make_byte_op(32, 1, _nibbles)
copy32 = make_byte_op(32, 1, lambda b, inputs, param: inputs)  # (src, dst)
five_bits32 = make_byte_op(32, 2, _five_bits)  # (qs, qh, lo, hi), param = shift of qh
six_bits32 = make_byte_op(32, 3, _six_bits)  # (ql, ql + 32, qh, out, out + 32, out + 64, out + 96)


def _cat(b, lo, hi):
    """<2n x i8> of two <n x i8>, lo first."""
    n = lo.type.count
    return b.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n))))


def _bytes(b, base, at, offset, width):
    return _load(b, base, b.add(at, ir.Constant(_I64, offset)), ir.VectorType(_I8, width))


@dataclass(frozen=True)
class CodeUnit:
    """How the int8 dot reads codes: `cols` weights stored in `nbytes`, and emit(builder, base, at) ->
    their <64 x i8> code vectors in column order (u of gguf_decode.py's form, built in registers).

    scales(builder, base, at), where given, reads each vector's sub-block scales and offsets from the
    blocks too (a list of (<64 / sub_cols x float>, the same or None for zero offsets)); BUFFERED
    reads them from the buffers gguf_decode.decode_codes filled. block_scales(builder, base, at), for
    the K-quants (one x scale per block), gives (per vector a <16 x i32> of each int32 lane's integer
    sub-block scale, the block's float d, <sub-blocks x float> offsets): the lanes are scaled in
    integers and the block takes one float conversion and one multiply-add.
    """

    cols: int
    nbytes: int
    emit: Callable
    scales: Callable | None = None
    block_scales: Callable | None = None


def _floats(b, values):
    vector = ir.Constant(ir.VectorType(_F32, len(values)), ir.Undefined)
    for i, value in enumerate(values):
        vector = b.insert_element(vector, value, ir.Constant(_I32, i))
    return vector


def _times(b, vector, factor):
    return b.fmul(vector, ir.Constant(vector.type, [factor] * vector.type.count))


def _q4_0_scales(b, base, at):  # d of the two blocks; offset 8 d
    d = _floats(b, [_half(b, base, at), _half(b, base, b.add(at, ir.Constant(_I64, 18)))])
    return [(d, _times(b, d, 8.0))]


def _q8_0_scales(b, base, at):
    return [(_floats(b, [_half(b, base, at), _half(b, base, b.add(at, ir.Constant(_I64, 34)))]), None)]


def _shuffle(b, vector, picks):
    """<len(picks) x i8> of vector's lanes; a pick of None is 0."""
    zero = ir.Constant(vector.type, None)
    return b.shuffle_vector(vector, zero, ir.Constant(ir.VectorType(_I32, len(picks)), [
        vector.type.count if p is None else p for p in picks]))


def _k4_packed(b, base, at):
    # the 12 packed bytes at 4 (gguf_decode._scale_min_k4) for all 8 sub-blocks at once: <8 x i8> sc and m;
    # sub-block j < 4: sc = q[j] & 63, m = q[j+4] & 63; j >= 4: sc = (q[j+4] & 15) | (q[j-4] >> 6) << 4,
    # m = (q[j+4] >> 4) | (q[j] >> 6) << 4
    q = _bytes(b, base, at, 4, 16)  # 12 bytes of scales and the first 4 of what follows (unused)
    eight = ir.VectorType(_I8, 8)

    def lanes(values):
        return ir.Constant(eight, values)

    low = _shuffle(b, q, [0, 1, 2, 3, 8, 9, 10, 11])
    high_sc = b.shl(b.lshr(_shuffle(b, q, [None] * 4 + [0, 1, 2, 3]), lanes([6] * 8)), lanes([4] * 8))
    sc = b.or_(b.and_(low, lanes([63] * 4 + [15] * 4)), high_sc)
    mins = b.lshr(_shuffle(b, q, [4, 5, 6, 7, 8, 9, 10, 11]), lanes([0] * 4 + [4] * 4))
    high_m = b.shl(b.lshr(_shuffle(b, q, [None] * 4 + [4, 5, 6, 7]), lanes([6] * 8)), lanes([4] * 8))
    return sc, b.or_(b.and_(mins, lanes([63] * 8)), high_m)


def _lane_scales(b, sc, per_sub: int):
    """Per 64-code vector v, <16 x i32>: int32 lane l's sub-block scale sc[v * 16 / per_sub + l // per_sub]
    (sc <n x i32>; per_sub = lanes per sub-block: 8 for 32 codes, 4 for 16)."""
    per_vector = 16 // per_sub
    return [b.shuffle_vector(sc, ir.Constant(sc.type, ir.Undefined), ir.Constant(
        ir.VectorType(_I32, 16), [v * per_vector + lane // per_sub for lane in range(16)]))
        for v in range(sc.type.count // per_vector)]


def _k4_block_scales(b, base, at):  # Q4_K / Q5_K: integer sc per lane, d; offsets dmin m per sub-block
    sc, m = _k4_packed(b, base, at)
    dmin = _half(b, base, b.add(at, ir.Constant(_I64, 2)))
    offsets = b.fmul(_floats(b, [dmin] * 8), b.uitofp(m, ir.VectorType(_F32, 8)))
    return _lane_scales(b, b.zext(sc, ir.VectorType(_I32, 8)), 8), _half(b, base, at), offsets


def _q6_k_block_scales(b, base, at):  # int8 scales of the 16 sub-blocks of 16, d; offsets 32 d sc
    sc = b.sext(_bytes(b, base, at, 192, 16), ir.VectorType(_I32, 16))
    d = _half(b, base, b.add(at, ir.Constant(_I64, 208)))
    offsets = b.fmul(_floats(b, [d] * 16), _times(b, b.sitofp(sc, ir.VectorType(_F32, 16)), 32.0))
    return _lane_scales(b, sc, 4), d, offsets


def _q4_0_codes(b, base, at):  # two blocks
    return [_cat(b, *[_cat(b, *_nibbles(b, [_bytes(b, base, at, 18 * k + 2, 16)], None)) for k in range(2)])]


def _q8_0_codes(b, base, at):  # two blocks
    return [_cat(b, _bytes(b, base, at, 2, 32), _bytes(b, base, at, 36, 32))]


def _q4_k_codes(b, base, at):
    return [_cat(b, *_nibbles(b, [_bytes(b, base, at, 16 + 32 * c, 32)], None)) for c in range(4)]


def _q5_k_codes(b, base, at):
    high = _bytes(b, base, at, 16, 32)
    return [_cat(b, *_five_bits(b, [_bytes(b, base, at, 48 + 32 * c, 32), high], ir.Constant(_I64, 2 * c)))
            for c in range(4)]


def _q6_k_codes(b, base, at):
    vectors = []
    for n in range(2):
        ql, ql32, qh = (_bytes(b, base, at, 64 * n, 32), _bytes(b, base, at, 64 * n + 32, 32),
                        _bytes(b, base, at, 128 + 32 * n, 32))
        q = _six_bits(b, [ql, ql32, qh], None)
        vectors += [_cat(b, q[0], q[1]), _cat(b, q[2], q[3])]
    return vectors


BUFFERED = CodeUnit(64, 64, lambda b, base, at: [_load(b, base, at, ir.VectorType(_I8, 64))])  # decoded u
Q4_0_UNIT, Q8_0_UNIT = CodeUnit(64, 36, _q4_0_codes, _q4_0_scales), CodeUnit(64, 68, _q8_0_codes, _q8_0_scales)
Q4_K_UNIT = CodeUnit(256, 144, _q4_k_codes, block_scales=_k4_block_scales)
Q5_K_UNIT = CodeUnit(256, 176, _q5_k_codes, block_scales=_k4_block_scales)
Q6_K_UNIT = CodeUnit(256, 210, _q6_k_codes, block_scales=_q6_k_block_scales)


def make_expand(sub_cols: int, signed: bool):
    """An intrinsic expand(u, scale, offset, w, nsub): w[k] = scale[s] * u[k] - offset[s] for the first
    nsub sub-blocks of sub_cols codes (int8 codes if signed), multiply then subtract as gguf does."""
    codes_type = ir.VectorType(_I8, sub_cols)
    floats_type = ir.VectorType(_F32, sub_cols)

    @intrinsic
    def expand(typingctx, u, scale, offset, w, nsub):
        def codegen(context, builder, sig, args):
            codes, scales, offsets, out = (_data_pointer(context, builder, t, a) for t, a in zip(sig.args[:4], args[:4]))
            with cgutils.for_range(builder, args[4]) as loop:
                at = builder.mul(loop.index, ir.Constant(_I64, sub_cols))
                q = _load(builder, codes, at, codes_type)
                values = builder.sitofp(q, floats_type) if signed else builder.uitofp(q, floats_type)
                scaled = builder.fmul(values, _splat(builder, builder.load(builder.gep(scales, [loop.index])), floats_type))
                shifted = builder.fsub(scaled, _splat(builder, builder.load(builder.gep(offsets, [loop.index])), floats_type))
                _store(builder, shifted, out, at)
            return context.get_dummy_value()

        return types.none(u, scale, offset, w, nsub), codegen

    return expand


def make_float_convert(element: str):
    """An intrinsic convert(raw, off, w, n): w[:n] = the float32 values of n F32/F16/BF16 elements at
    raw[off] (n a multiple of 16)."""
    lanes = 16

    @intrinsic
    def convert(typingctx, raw, off, w, n):
        def codegen(context, builder, sig, args):
            src = _data_pointer(context, builder, sig.args[0], args[0])
            out = _data_pointer(context, builder, sig.args[2], args[2])
            with cgutils.for_range(builder, builder.udiv(args[3], ir.Constant(_I64, lanes))) as loop:
                at = builder.mul(loop.index, ir.Constant(_I64, lanes))
                if element == "F32":
                    values = _load(builder, src, builder.add(args[1], builder.mul(at, ir.Constant(_I64, 4))),
                                   ir.VectorType(_F32, lanes))
                else:
                    bits = _load(builder, src, builder.add(args[1], builder.mul(at, ir.Constant(_I64, 2))),
                                 ir.VectorType(_I16, lanes))
                    if element == "F16":
                        values = builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), lanes)),
                                               ir.VectorType(_F32, lanes))
                    else:  # BF16: the upper half of a float32
                        wide = builder.shl(builder.zext(bits, ir.VectorType(_I32, lanes)),
                                           ir.Constant(ir.VectorType(_I32, lanes), [16] * lanes))
                        values = builder.bitcast(wide, ir.VectorType(_F32, lanes))
                _store(builder, values, out, at)
            return context.get_dummy_value()

        return types.none(raw, off, w, n), codegen

    return convert
