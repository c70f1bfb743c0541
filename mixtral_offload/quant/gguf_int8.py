"""int8 activations for the GGUF kernels: x quantized as llama.cpp does, and the integer chunk dot in LLVM IR.

x is quantized per BlockType.act_cols columns, symmetric: d = max|x| / 127, q = round(x / d) (half
away from zero), as llama.cpp's Q8_0 for Q4_0/Q8_0 weights (32 columns, d stored as float16, so
these bytes equal gguf.quants.quantize(x, Q8_0)) and as its Q8_K for K-quants (256, d float32).

A row's codes u (gguf_decode.py's form), built in registers from its blocks (gguf_vectors.py),
take per 64 one u8 x s8 integer dot from int8x.py's IR helpers (AVX-512 VNNI vpdpbusd, AVX2
pmaddubsw/pmaddwd, or plain vector IR): 16 int32 lanes of 4 products each, converted once and
multiplied by each lane's scale(sub-block) x d(x block). Codes stay <= 63 except Q8_0's signed
bytes, which take int8x's signed dot, so no AVX2 pair sum saturates. The offsets are summed apart:
sum_s offset_s d_s sum(xq in s).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from mixtral_offload.quant.gguf_blocks import BlockType
from mixtral_offload.quant.gguf_vectors import BUFFERED, CodeUnit, _splat
from mixtral_offload.quant.int8x import BLOCK_BYTES, PREFETCH_BYTES
from mixtral_offload.quant.int8x_ir import (
    _F32, _I64, _V16F, _V16I32, _V64I8, ISA, _data_pointer, _horizontal_sum, _int_dot, _load, _prefetch_l2,
    _signed_int_dot,
)


def padded_cols(cols: int) -> int:
    """Columns of quantized x: whole 64-byte vectors, zeros past cols (a Q4_0/Q8_0 row may end mid-vector)."""
    return -(-cols // BLOCK_BYTES) * BLOCK_BYTES


def _round_half_away(v: np.ndarray) -> np.ndarray:
    # exact for every float32 (no v + 0.5 rounding): the integer part plus 1 where the fraction is >= 1/2
    a = np.abs(v)
    whole = np.floor(a)
    return np.sign(v) * (whole + np.floor(2 * (a - whole)))


def quantize_x(x: np.ndarray, act_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(xq int8 [T, cols], d float32 [T, cols / act_cols]) for float32 x [T, cols]: x ~ d * xq per block."""
    tokens, cols = x.shape
    blocks = x.reshape(tokens, cols // act_cols, act_cols)
    d = np.abs(blocks).max(axis=2) / np.float32(127)
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    xq = _round_half_away(blocks * inverse[:, :, None]).astype(np.int8).reshape(tokens, cols)
    if act_cols == 32:  # Q8_0 stores d as float16
        d = d.astype(np.float16).astype(np.float32)
    return xq, d


def dequantized_x(x: np.ndarray, act_cols: int) -> np.ndarray:
    """The float32 x [T, cols] that the int8 path computes with (for references and error reports)."""
    xq, d = quantize_x(x, act_cols)
    return (xq.reshape(d.shape[0], d.shape[1], act_cols) * d[:, :, None]).reshape(xq.shape)


def kernel_activations(x: np.ndarray, bt: BlockType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xq int8 [T, P], dsub float32 [T, P / S], xoff float32 [T, P / S]): P = padded_cols, S = sub_cols.

    dsub is each sub-block's x scale, xoff = dsub * sum(xq in the sub-block) (the offsets' factor).
    """
    tokens, cols = x.shape
    xq, d = quantize_x(x, bt.act_cols)
    padded = padded_cols(cols)
    xq_padded = np.zeros((tokens, padded), np.int8)
    xq_padded[:, :cols] = xq
    per_block = bt.act_cols // bt.sub_cols
    dsub = np.zeros((tokens, padded // bt.sub_cols), np.float32)
    dsub[:, : cols // bt.sub_cols] = np.repeat(d, per_block, axis=1)
    sums = xq.reshape(tokens, cols // bt.sub_cols, bt.sub_cols).sum(axis=2, dtype=np.int32)
    xoff = dsub * np.pad(sums, ((0, 0), (0, dsub.shape[1] - sums.shape[1]))).astype(np.float32)
    return xq_padded, dsub, xoff


def _block_dot(builder, unit, c, at, x, d, xo, first, per_vector, acc, shifts, isa):
    """One K-quant block (unit) of a chunk_dot: its vectors' int32 lanes times their integer sub-block scales,
    summed in integers (at most 4 x 4 x 63 x 127 x 128 per lane), then once times d(block) x d(x block)
    into acc; the offsets of its sub-blocks times x's (xoff) into shifts."""
    lanes, d_w, offsets = unit.block_scales(builder, c, at)
    ints = ir.Constant(_V16I32, None)
    for i, codes_v in enumerate(unit.emit(builder, c, at)):
        at_x = builder.mul(builder.add(first, ir.Constant(_I64, i)), ir.Constant(_I64, BLOCK_BYTES))
        dot = _int_dot(builder, ir.Constant(_V16I32, None), codes_v, _load(builder, x, at_x, _V64I8), isa)
        ints = builder.add(ints, builder.mul(dot, lanes[i]))
    g0 = builder.mul(first, ir.Constant(_I64, per_vector))  # the block's first sub-block
    scale = builder.fmul(d_w, builder.load(builder.gep(d, [g0])))  # one x scale per K-quant block
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
    product = builder.call(fma, [builder.sitofp(ints, _V16F), _splat(builder, scale, _V16F), builder.load(acc)])
    builder.store(product, acc)
    shift = builder.fmul(offsets, _load(builder, xo, g0, offsets.type))
    builder.store(builder.fadd(builder.load(shifts), shift), shifts)


def make_chunk_dot(sub_cols: int, signed: bool, unit: CodeUnit = BUFFERED, isa: str = ISA):
    """An intrinsic: chunk_dot(codes, code_at, scale, offset, xq, dsub, xoff, x_at, s_at, units) -> float32.

    sum over sub-blocks s of scale[s] dsub[s_at + s] (sum_j u[j] xq[x_at + j], j in s) - offset[s]
    xoff[s_at + s], for the u of `units` units of codes from codes[code_at] (unit: BUFFERED reads
    decoded u, 64 at a time; a type's unit reads its blocks, and their scales where unit.scales);
    u8 codes, or int8 if signed. xq, dsub and xoff are flat (every token's row after the other);
    sub_cols is 16 or 32.
    """
    per_vector = BLOCK_BYTES // sub_cols
    small = ir.VectorType(_F32, per_vector)
    # int32 lane l of a 64-byte dot sums codes 4l..4l+3, which lie in sub-block (4l) // sub_cols
    expand = ir.Constant(ir.VectorType(ir.IntType(32), 16), [(4 * lane) // sub_cols for lane in range(16)])
    vectors = unit.cols // BLOCK_BYTES

    @intrinsic
    def chunk_dot(typingctx, codes, code_at, scale, offset, xq, dsub, xoff, x_at, s_at, units):
        signature = types.float32(codes, code_at, scale, offset, xq, dsub, xoff, x_at, s_at, units)

        def codegen(context, builder, sig, args):
            arrays = (sig.args[0], *sig.args[2:7]), (args[0], *args[2:7])
            c, s, o, x, d, xo = (_data_pointer(context, builder, t, a) for t, a in zip(*arrays))
            x = builder.gep(x, [args[7]])
            d, xo = builder.gep(d, [args[8]]), builder.gep(xo, [args[8]])
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
            acc = cgutils.alloca_once_value(builder, ir.Constant(_V16F, None))
            shifts = cgutils.alloca_once_value(builder, ir.Constant(small, None))
            wide = ir.VectorType(_F32, unit.cols // sub_cols)  # the offsets of a K-quant block's sub-blocks
            wide_shifts = cgutils.alloca_once_value(builder, ir.Constant(wide, None))
            with cgutils.for_range(builder, args[9]) as loop:
                first = builder.mul(loop.index, ir.Constant(_I64, vectors))
                at = builder.add(args[1], builder.mul(loop.index, ir.Constant(_I64, unit.nbytes)))
                # the blocks stream from memory: prefetch them as int8x.py does (at batch 1 Q4_0, Q8_0 and
                # Q6_K took 10-15% less time with it, Q4_K the same; benchmarks/gguf_cpu_time.py)
                if unit is not BUFFERED:
                    for line in range(0, unit.nbytes, BLOCK_BYTES):
                        _prefetch_l2(builder, builder.gep(c, [builder.add(at, ir.Constant(_I64, PREFETCH_BYTES + line))]))
                if unit.block_scales:
                    _block_dot(builder, unit, c, at, x, d, xo, first, per_vector, acc, wide_shifts, isa)
                else:
                    in_blocks = unit.scales(builder, c, at) if unit.scales else None
                    for i, codes_v in enumerate(unit.emit(builder, c, at)):
                        vector = builder.add(first, ir.Constant(_I64, i))
                        x_v = _load(builder, x, builder.mul(vector, ir.Constant(_I64, BLOCK_BYTES)), _V64I8)
                        if signed:
                            ints = _signed_int_dot(builder, codes_v, x_v, isa)
                        else:
                            ints = _int_dot(builder, ir.Constant(_V16I32, None), codes_v, x_v, isa)
                        g0 = builder.mul(vector, ir.Constant(_I64, per_vector))
                        w_scale, w_offset = in_blocks[i] if in_blocks else (_load(builder, s, g0, small),
                                                                            _load(builder, o, g0, small))
                        scales = builder.fmul(w_scale, _load(builder, d, g0, small))
                        lanes = builder.shuffle_vector(scales, ir.Constant(small, ir.Undefined), expand)
                        builder.store(builder.call(fma, [builder.sitofp(ints, _V16F), lanes, builder.load(acc)]), acc)
                        if w_offset is not None:
                            shift = builder.fmul(w_offset, _load(builder, xo, g0, small))
                            builder.store(builder.fadd(builder.load(shifts), shift), shifts)
            shift = builder.fadd(_horizontal_sum(builder, builder.load(shifts)),
                                 _horizontal_sum(builder, builder.load(wide_shifts)))
            return builder.fsub(_horizontal_sum(builder, builder.load(acc)), shift)

        return signature, codegen

    return chunk_dot
