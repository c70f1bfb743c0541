"""This machine's int8 multiply-accumulate peak: register-resident integer dot products.

Prompt (many-token) kernels are compute-bound, so `bench kernels` judges them as a share of this
peak, as it judges batch-1 kernels as a share of the read bandwidth. The loop runs ACCUMULATORS
independent chains of the kernels' own integer dot (int8x's `_int_dot`: `vpdpbusd` on AVX-512 VNNI,
pmaddubsw/pmaddwd on AVX2, plain vector IR otherwise), 64 u8 x s8 products each, on operands held in
registers; x changes by one add per round so no form can hoist a product out of the loop.
"""

from __future__ import annotations

import time

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from mixtral_offload.quant.int8x import BLOCK_BYTES
from mixtral_offload.quant.int8x_ir import _I64, _V16I32, _V64I8, ISA, _data_pointer, _int_dot, _load

ACCUMULATORS = 12  # independent dot chains: enough to cover vpdpbusd's latency on 2 ports
MACS_PER_DOT = BLOCK_BYTES
ROUNDS = 4_000_000  # rounds of ACCUMULATORS dots per thread and timing (~50-200 ms at 1 thread)


def make_mac_loop(isa: str = ISA):
    """An intrinsic mac_loop(operands int8[3 * 64], rounds) -> int64 (a checksum of the accumulators)."""

    @intrinsic
    def mac_loop(typingctx, operands, rounds):
        def codegen(context, builder, sig, args):
            base = _data_pointer(context, builder, sig.args[0], args[0])
            codes = [_load(builder, base, ir.Constant(_I64, k * BLOCK_BYTES), _V64I8) for k in range(2)]
            x0 = _load(builder, base, ir.Constant(_I64, 2 * BLOCK_BYTES), _V64I8)
            x_slot = cgutils.alloca_once_value(builder, x0)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16I32, None)) for _ in range(ACCUMULATORS)]
            with cgutils.for_range(builder, args[1]):
                x = builder.load(x_slot)
                for k, acc in enumerate(accs):
                    builder.store(_int_dot(builder, builder.load(acc), codes[k % 2], x, isa), acc)
                builder.store(builder.add(x, ir.Constant(_V64I8, [1] * 64)), x_slot)
            total = builder.load(accs[0])
            for acc in accs[1:]:
                total = builder.add(total, builder.load(acc))
            lanes = [builder.extract_element(total, ir.Constant(ir.IntType(32), i)) for i in range(16)]
            checksum = lanes[0]
            for lane in lanes[1:]:
                checksum = builder.add(checksum, lane)
            return builder.sext(checksum, _I64)

        return types.int64(operands, rounds), codegen

    return mac_loop


_mac_loop = make_mac_loop()


@njit(cache=True, nogil=True, parallel=True)
def _run(operands, rounds, checksums):
    for worker in prange(checksums.shape[0]):
        checksums[worker] = _mac_loop(operands, rounds)


def measure_int8_peak(threads: int, repeats: int = 5, clock=time.perf_counter) -> float:
    """G int8 multiply-accumulates per second of `clock` on `threads` threads (median of `repeats`);
    clock=time.process_time gives them per CPU-second, which a time-shared core does not lower."""
    operands = np.random.default_rng(0).integers(-100, 100, 3 * BLOCK_BYTES).astype(np.int8)
    checksums = np.zeros(threads, np.int64)
    saved = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        _run(operands, np.int64(1000), checksums)
        times = []
        for _ in range(repeats):
            start = clock()
            _run(operands, np.int64(ROUNDS), checksums)
            times.append(clock() - start)
    finally:
        numba.set_num_threads(saved)
    return threads * ROUNDS * ACCUMULATORS * MACS_PER_DOT / float(np.median(times)) / 1e9
