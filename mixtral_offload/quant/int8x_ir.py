"""LLVM IR building blocks of the int8-activation kernels: the target ISA, vector types, loads, prefetch
and the integer dot products (VNNI vpdpbusd, AVX2 pmaddubsw/pmaddwd, or generic vector ops).

Shared by int8x.py (row kernels), int8x_tiles.py (prompt tiles), compute_peak.py and the GGUF kernels.
"""

from __future__ import annotations

from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba.core import cgutils
from numba.core import config as numba_config


def target_isa() -> str:
    """The integer-dot instructions for the CPU Numba compiles for (this host's, or NUMBA_CPU_NAME/
    NUMBA_CPU_FEATURES'): 'vnni' (AVX-512 VNNI), 'avx2' (pmaddubsw/pmaddwd) or 'generic'."""
    if numba_config.CPU_NAME not in (None, "host"):  # compiling for another CPU (e.g. a portable cache)
        features = {f[1:] for f in (numba_config.CPU_FEATURES or "").split(",") if f.startswith("+")}
    else:
        features = {name for name, on in llvm_binding.get_host_cpu_features().items() if on}
    if {"avx512vnni", "avx512bw"} <= features:
        return "vnni"
    return "avx2" if "avx2" in features else "generic"


ISA = target_isa()
ISAS = ("vnni", "avx2", "generic")

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()
_V64I8 = ir.VectorType(_I8, 64)
_V16I32 = ir.VectorType(_I32, 16)
_V16F = ir.VectorType(_F32, 16)


def _data_pointer(context, builder, array_type, array):
    return context.make_array(array_type)(context, builder, array).data


def _load(builder, base, offset, vector_type):
    pointer = builder.bitcast(builder.gep(base, [offset]), vector_type.as_pointer())
    return builder.load(pointer, align=1)


def _halfs_to_float(builder, base, offset, count):
    """<count x float> from `count` float16 bit patterns (uint16) at base[offset]."""
    bits = _load(builder, base, offset, ir.VectorType(_I16, count))
    return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), count)), ir.VectorType(_F32, count))


def _prefetch_l2(builder, pointer):
    """A read prefetch into L2 (prefetcht1 on x86); never faults, so it may point past the codes."""
    hint = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]), "llvm.prefetch.p0i8"
    )
    builder.call(hint, [builder.bitcast(pointer, _I8.as_pointer()), ir.Constant(_I32, 0), ir.Constant(_I32, 2),
                        ir.Constant(_I32, 1)])


def _horizontal_sum(builder, vector):
    """The sum of a float vector's lanes, halving it with shuffles (log2(n) adds, not n - 1)."""
    width = vector.type.count
    while width > 1:
        width //= 2
        low = builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(_I32, width), list(range(width))))
        high = builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(_I32, width), list(range(width, 2 * width))))
        vector = builder.fadd(low, high)
    return builder.extract_element(vector, ir.Constant(_I32, 0))


def _call(builder, name, return_type, args):
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(return_type, [a.type for a in args]), name)
    return builder.call(function, args)


def _avx2_dot(builder, unsigned_u8, signed_s8):
    """<16 x i32>: sums of 4 adjacent u8 x s8 products, by pmaddubsw then pmaddwd on each 32-byte half.
    The pair sums of pmaddubsw saturate at 32767: callers keep u8 x |s8| pairs under it."""
    halves = []
    ones = ir.Constant(ir.VectorType(_I16, 16), [1] * 16)
    for half in range(2):
        pick = ir.Constant(ir.VectorType(_I32, 32), list(range(32 * half, 32 * half + 32)))
        u = builder.shuffle_vector(unsigned_u8, unsigned_u8, pick)
        x = builder.shuffle_vector(signed_s8, signed_s8, pick)
        pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(_I16, 16), [u, x])
        halves.append(_call(builder, "llvm.x86.avx2.pmadd.wd", ir.VectorType(_I32, 8), [pairs, ones]))
    return builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(_I32, 16), list(range(16))))


def _generic_dot(builder, codes, x_s8, codes_signed):
    """<16 x i32>: sums of 4 adjacent products in plain vector IR (any CPU)."""
    wide = ir.VectorType(_I32, 64)
    widened = builder.sext(codes, wide) if codes_signed else builder.zext(codes, wide)
    products = builder.mul(widened, builder.sext(x_s8, wide))
    total = ir.Constant(_V16I32, None)
    for k in range(4):
        lane = builder.shuffle_vector(products, products, ir.Constant(ir.VectorType(_I32, 16), list(range(k, 64, 4))))
        total = builder.add(total, lane)
    return total


def _int_dot(builder, acc, codes_u8, x_s8, isa):
    """acc <16 x i32> + the sums of each 4 adjacent u8 x s8 products (u8 codes of at most 15 on avx2)."""
    if isa == "vnni":
        return _call(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32,
                     [acc, builder.bitcast(codes_u8, _V16I32), builder.bitcast(x_s8, _V16I32)])
    if isa == "avx2":  # int2-int4 codes <= 15: a pair sum is at most 2 * 15 * 128, far from saturating
        return builder.add(acc, _avx2_dot(builder, codes_u8, x_s8))
    return builder.add(acc, _generic_dot(builder, codes_u8, x_s8, codes_signed=False))


def _signed_int_dot(builder, codes_s8, x_s8, isa):
    """<16 x i32>: the sums of each 4 adjacent s8 x s8 products (int8 weights)."""
    if isa == "vnni":  # q + 128 as u8 (the sign bit flipped), less 128 * x
        bias = ir.Constant(_V64I8, [0x80] * 64)
        return builder.sub(_int_dot(builder, ir.Constant(_V16I32, None), builder.xor(codes_s8, bias), x_s8, isa),
                           _int_dot(builder, ir.Constant(_V16I32, None), bias, x_s8, isa))
    if isa == "avx2":  # |q| against x with q's sign: pair sums at most 2 * 128 * 127 < 32767
        magnitude = _call(builder, "llvm.abs.v64i8", _V64I8, [codes_s8, ir.Constant(ir.IntType(1), 0)])
        signed_x = _psign(builder, x_s8, codes_s8)
        return _avx2_dot(builder, magnitude, signed_x)
    return _generic_dot(builder, codes_s8, x_s8, codes_signed=True)


def _psign(builder, x, sign_of):
    """x negated where sign_of < 0 and zeroed where it is 0 (psignb on each 32-byte half)."""
    halves = []
    for half in range(2):
        pick = ir.Constant(ir.VectorType(_I32, 32), list(range(32 * half, 32 * half + 32)))
        halves.append(_call(builder, "llvm.x86.avx2.psign.b", ir.VectorType(_I8, 32),
                            [builder.shuffle_vector(x, x, pick), builder.shuffle_vector(sign_of, sign_of, pick)]))
    return builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(_I32, 64), list(range(64))))


class _Operands:
    """One rows-kernel call's arguments in LLVM: pointers to a matrix's flat codes/scales/zeros and the
    quantized x, x's shape (tokens, cols), out's data and columns, and the row range and group size."""

    def __init__(self, context, builder, sig, args):
        self.codes, self.scales, self.zeros, self.xperm, self.dx, self.xqsum = (
            _data_pointer(context, builder, array_type, array) for array_type, array in zip(sig.args[:6], args[:6])
        )
        xperm = context.make_array(sig.args[3])(context, builder, args[3])
        self.tokens, self.cols = cgutils.unpack_tuple(builder, xperm.shape, 2)
        out = context.make_array(sig.args[6])(context, builder, args[6])
        self.out, self.out_cols = out.data, cgutils.unpack_tuple(builder, out.shape, 2)[1]
        self.first_row, self.end_row, self.out_first, self.group_size = args[7:11]
