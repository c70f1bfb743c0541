"""LLVM IR vector steps of the GGUF decoders (gguf_decode.py): byte unpacking and float expansion.

Written as Numba intrinsics because LLVM leaves the same Numba loops scalar: a block's loops run
16-32 iterations, too few to pay for the runtime check that the codes buffer and the tensor's bytes
do not overlap, so every byte went through a scalar and/shift/store (measured ~20x slower).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from mixtral_offload.quant.int8x import _F32, _I8, _I16, _I32, _I64, _data_pointer, _load


def _splat(builder, value, vector_type):
    """A vector of `value` (an IR integer) in every lane of vector_type."""
    single = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(single, ir.Constant(vector_type, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, vector_type.count), [0] * vector_type.count))


def _store(builder, value, base, offset):
    builder.store(value, builder.bitcast(builder.gep(base, [offset]), value.type.as_pointer()), align=1)


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
