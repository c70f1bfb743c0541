"""Device slots: cached experts in a torch device's memory (`--device cuda`), as the pool's blocks
dequantized per call, or re-quantized to bitsandbytes NF4 (`--device-format nf4`).

A fill runs on the cache's reader thread: one read of the expert into a pinned host staging buffer,
an asynchronous copy to the slot on a copy stream, and a wait for that copy on the reader thread (so
compute never waits on a stream). On the CPU the same code runs with ordinary buffers, which is how it
is tested without a GPU. NF4 slots compute with `bitsandbytes.matmul_4bit` (gemv_4bit for one token
on CUDA); bitsandbytes is imported only when that store is built.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import MixtralOffloadError
from .expert_cache import read_extents, run_on_mapping
from .source import MATRICES, BlockSource, Key, page_rounded

class DeviceSlots:
    """Slots in a torch device's memory, filled through pinned host staging buffers on a side stream.

    On CUDA a fill is: one read of the block into a pinned buffer, an asynchronous copy to the slot on
    a copy stream, and a wait for that copy on the reader thread (so compute never waits on a stream).
    On the CPU the same code runs with ordinary buffers, which is how it is tested without a GPU.
    How a slot holds an expert is in allocate, store, matrices_of and linear (NF4DeviceSlots overrides them).
    """

    decode_threads = None  # the CPU computes only direct misses: every core
    direct_choice = True   # a miss may be computed by the CPU where it lies, when that measures cheaper

    def __init__(self, source: BlockSource, num_slots: int, device: torch.device, dtype: torch.dtype,
                 dequantize: Callable, cpu_kernel: Callable, staging_buffers: int = 2):
        self.source, self.device, self.dtype, self.num_slots = source, torch.device(device), dtype, num_slots
        self.dequantize, self.cpu_kernel = dequantize, cpu_kernel
        self.is_cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self.staging: queue.Queue = queue.Queue()
        for _ in range(staging_buffers):
            self.staging.put(torch.empty(page_rounded(source.block_nbytes), dtype=torch.uint8,
                                         pin_memory=self.is_cuda))
        self.allocate(num_slots)

    def allocate(self, num_slots: int) -> None:
        """Allocate the slots once, and set slot_bytes: here one page-rounded block each."""
        self.slot_bytes = page_rounded(self.source.block_nbytes)
        self.buffers = torch.empty((num_slots, self.slot_bytes), dtype=torch.uint8, device=self.device)

    def fill(self, slot: int, key: Key) -> int:
        """Read one expert's block and store it into a device slot (see `store`); bytes read."""
        stage = self.staging.get()
        try:
            got = read_extents(self.source, key, stage.numpy())
            if self.is_cuda:  # the slot's previous expert may still be queued for compute on the default stream
                self.stream.wait_stream(torch.cuda.default_stream(self.device))
            with torch.cuda.stream(self.stream) if self.is_cuda else contextlib.nullcontext():
                self.store(slot, stage)
            if self.is_cuda:
                self.stream.synchronize()  # the staging buffer is reused next, and the slot must be whole
        finally:
            self.staging.put(stage)
        return got

    def store(self, slot: int, stage: torch.Tensor) -> None:
        """Put the block read into the staging buffer into `slot` (on the copy stream): here a plain copy."""
        self.buffers[slot].copy_(stage, non_blocking=self.is_cuda)

    def run(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """The expert in `slot` on x [T, D] -> [T, D] in the compute dtype."""
        w1, w3, w2 = self.matrices_of(slot)
        x = x.to(self.dtype)
        return self.linear(F.silu(self.linear(x, w1)) * self.linear(x, w3), w2)

    def matrices_of(self, slot: int) -> tuple:
        """w1, w3, w2 of the expert in `slot`, dequantized on the device to the compute dtype."""
        return tuple(self.dequantize(self.source.spec, self.source.shapes[name], parts, self.dtype)
                     for name, parts in zip(MATRICES, self.source.tensor_parts(self.buffers[slot])))

    def linear(self, x: torch.Tensor, weight) -> torch.Tensor:
        """x [T, in] times one matrix from `matrices_of` ([out, in]) -> [T, out]."""
        return F.linear(x, weight)

    def run_direct(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        """The expert computed by the CPU kernels where it lies in the pool (no copy to the device)."""
        return run_on_mapping(self.source, self.cpu_kernel, key, x)


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


def nf4_slot_bytes(source: BlockSource) -> int:
    """Device bytes of one NF4 slot: every matrix's packed codes and float32 absmax."""
    return sum(codes + ABSMAX_BYTES * blocks for codes, blocks in map(nf4_matrix_sizes, source.shapes.values()))


class NF4DeviceSlots(DeviceSlots):
    """Device slots holding each expert's w1, w3, w2 as NF4 (packed codes, QuantState) for matmul_4bit.

    Same interface and staging as DeviceSlots; a fill also re-quantizes, through one device buffer of a
    pool block, so fills are serialized by a lock. The pool's int4/int8 to NF4 adds quantization error.
    """

    def __init__(self, source: BlockSource, num_slots: int, device: torch.device, dtype: torch.dtype,
                 dequantize: Callable, cpu_kernel: Callable, staging_buffers: int = 2):
        self.bnb = import_bitsandbytes()
        self.fill_lock = threading.Lock()
        super().__init__(source, num_slots, device, dtype, dequantize, cpu_kernel, staging_buffers)

    def allocate(self, num_slots: int) -> None:
        """Allocate every slot's codes and absmax once, each matrix's QuantState on views of them."""
        sizes = [nf4_matrix_sizes(self.source.shapes[name]) for name in MATRICES]
        codes_per_matrix, blocks_per_matrix = zip(*sizes)
        self.slot_bytes = nf4_slot_bytes(self.source)
        self.codes = torch.empty((num_slots, sum(codes_per_matrix)), dtype=torch.uint8, device=self.device)
        self.absmax = torch.empty((num_slots, sum(blocks_per_matrix)), dtype=torch.float32, device=self.device)
        # the device copy of the block being re-quantized (fills are serialized by fill_lock)
        self.block = torch.empty(page_rounded(self.source.block_nbytes), dtype=torch.uint8, device=self.device)
        code = self.bnb.functional.get_4bit_type("nf4", device=self.device)
        self.matrices = []
        for slot in range(num_slots):
            codes = torch.split(self.codes[slot], codes_per_matrix)
            absmax = torch.split(self.absmax[slot], blocks_per_matrix)
            self.matrices.append(tuple(
                (packed.view(-1, 1), self.bnb.functional.QuantState(
                    absmax=scales, shape=torch.Size(self.source.shapes[name]), code=code,
                    blocksize=NF4_BLOCKSIZE, quant_type="nf4", dtype=self.dtype))
                for name, packed, scales in zip(MATRICES, codes, absmax)))

    def fill(self, slot: int, key) -> int:
        """Read one expert's block, re-quantize it to NF4 into `slot` on the device; bytes read."""
        with self.fill_lock:  # one device block buffer
            return super().fill(slot, key)

    def store(self, slot: int, stage: torch.Tensor) -> None:
        """Copy the staged block to the device, dequantize each matrix there and quantize it to NF4 in place."""
        self.block.copy_(stage, non_blocking=self.is_cuda)
        block_parts = self.source.tensor_parts(self.block)
        for name, parts, (packed, state) in zip(MATRICES, block_parts, self.matrices[slot]):
            # one dequantized matrix at a time: nothing holds it once it is quantized
            fresh_codes, fresh_state = self.bnb.functional.quantize_4bit(
                self.dequantize(self.source.spec, self.source.shapes[name], parts, self.dtype),
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
