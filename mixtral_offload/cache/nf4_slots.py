"""Device slots that hold experts as bitsandbytes NF4 (`--device-format nf4`).

A fill reads the pool block as DeviceSlots does (pinned staging, copy stream), dequantizes it on the
device to the compute dtype and re-quantizes each matrix to NF4 in blocks of 64 weights into the
slot's preallocated buffers: 0.5 byte per weight plus one float32 absmax per block. `run` computes
with `bitsandbytes.matmul_4bit`; on CUDA a single token goes through its gemv_4bit kernel on the packed
weights, where the dequantize format materializes three matrices per call. bitsandbytes is imported
only when this store is built.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from ..errors import MixtralOffloadError
from ..offload.store.pool import MATRICES
from .slots import DeviceSlots, page_rounded_block_bytes

NF4_BLOCKSIZE = 64
ABSMAX_BYTES = 4  # one float32 absmax per block (no nested quantization of the absmax)


def import_bitsandbytes():
    """The bitsandbytes module, imported on first use; a one-line error when it is not installed."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401  (quantize_4bit, QuantState)
    except ImportError:
        raise MixtralOffloadError("--device-format nf4 needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes


def nf4_matrix_sizes(shape: tuple[int, int]) -> tuple[int, int]:
    """(packed code bytes, absmax blocks) of one [rows, cols] matrix in NF4 with blocks of 64."""
    count = shape[0] * shape[1]
    return -(-count // 2), -(-count // NF4_BLOCKSIZE)


def nf4_slot_bytes(pool) -> int:
    """Device bytes of one NF4 slot: every matrix's packed codes and float32 absmax."""
    return sum(codes + ABSMAX_BYTES * blocks for codes, blocks in map(nf4_matrix_sizes, pool.shapes.values()))


class NF4DeviceSlots(DeviceSlots):
    """Device slots holding each expert's w1, w3, w2 as NF4 (packed codes, QuantState) for matmul_4bit.

    Same interface and staging as DeviceSlots; a fill also re-quantizes, through one device buffer of a
    pool block, so fills are serialized by a lock. The pool's int4/int8 to NF4 adds quantization error.
    """

    def __init__(self, pool, num_slots: int, device: torch.device, dtype: torch.dtype,
                 dequantize: Callable, cpu_compute: Callable, staging_buffers: int = 2):
        self.bnb = import_bitsandbytes()
        self.fill_lock = threading.Lock()
        super().__init__(pool, num_slots, device, dtype, dequantize, cpu_compute, staging_buffers)

    def allocate(self, num_slots: int) -> None:
        """Allocate every slot's codes and absmax once, each matrix's QuantState on views of them."""
        sizes = [nf4_matrix_sizes(self.pool.shapes[name]) for name in MATRICES]
        codes_per_matrix, blocks_per_matrix = zip(*sizes)
        self.slot_bytes = nf4_slot_bytes(self.pool)
        self.codes = torch.empty((num_slots, sum(codes_per_matrix)), dtype=torch.uint8, device=self.device)
        self.absmax = torch.empty((num_slots, sum(blocks_per_matrix)), dtype=torch.float32, device=self.device)
        # the device copy of the block being re-quantized (fills are serialized by fill_lock)
        self.block = torch.empty(page_rounded_block_bytes(self.pool), dtype=torch.uint8, device=self.device)
        code = self.bnb.functional.get_4bit_type("nf4", device=self.device)
        self.matrices = []
        for slot in range(num_slots):
            codes = torch.split(self.codes[slot], codes_per_matrix)
            absmax = torch.split(self.absmax[slot], blocks_per_matrix)
            self.matrices.append(tuple(
                (packed.view(-1, 1), self.bnb.functional.QuantState(
                    absmax=scales, shape=torch.Size(self.pool.shapes[name]), code=code,
                    blocksize=NF4_BLOCKSIZE, quant_type="nf4", dtype=self.dtype))
                for name, packed, scales in zip(MATRICES, codes, absmax)))

    def fill(self, slot: int, key) -> int:
        """Read one expert's block, re-quantize it to NF4 into `slot` on the device; bytes read."""
        with self.fill_lock:  # one device block buffer
            return super().fill(slot, key)

    def store(self, slot: int, stage: torch.Tensor) -> None:
        """Copy the staged block to the device, dequantize each matrix there and quantize it to NF4 in place."""
        self.block.copy_(stage, non_blocking=self.is_cuda)
        block_parts = self.pool.tensor_parts(self.block)
        for name, parts, (packed, state) in zip(MATRICES, block_parts, self.matrices[slot]):
            # one dequantized matrix at a time: nothing holds it once it is quantized
            fresh_codes, fresh_state = self.bnb.functional.quantize_4bit(
                self.dequantize(self.pool.spec, self.pool.shapes[name], parts, self.dtype),
                blocksize=NF4_BLOCKSIZE, quant_type="nf4")
            packed.copy_(fresh_codes.view(-1, 1))
            state.absmax.copy_(fresh_state.absmax)

    def matrices_of(self, slot: int) -> tuple:
        """(packed codes, QuantState) of w1, w3, w2 in `slot`."""
        return self.matrices[slot]

    def linear(self, x: torch.Tensor, weight) -> torch.Tensor:
        """x [T, in] times one NF4 matrix [out, in] -> [T, out], by bitsandbytes.matmul_4bit."""
        packed, state = weight
        return self.bnb.matmul_4bit(x, packed.t(), quant_state=state)
