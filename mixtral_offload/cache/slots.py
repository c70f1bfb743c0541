"""Where cached experts live and how they are computed: RAM slots (CPU kernels) or device slots (torch).

A slot store owns `num_slots` buffers of one pool block each. `fill` runs on a reader thread and
copies one expert into a slot; `run` computes the expert held in a slot on x; `run_direct` computes
an expert where it lies in the mapped pool with the CPU kernels (no slot, pages released after).
"""
from __future__ import annotations

import contextlib
import queue
from typing import Callable

import numba
import numpy as np
import torch
import torch.nn.functional as F

from ..offload.store.pool import MATRICES

PAGE = 4096
Key = tuple[int, int]


def page_rounded_block_bytes(pool) -> int:
    """One pool block's bytes rounded up to whole pages: the size of a RAM slot and a staging buffer."""
    return -(-pool.block_nbytes // PAGE) * PAGE


def run_on_pool(pool, compute: Callable, key: Key, x: torch.Tensor) -> torch.Tensor:
    """One expert computed by the CPU kernels on the mapped pool; its mapped pages are given back after."""
    x32 = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
    try:
        y = compute(*pool.expert(*key), x32)
    finally:
        pool.release(*key)
    return torch.from_numpy(y).to(x.device)


class HostSlots:
    """Slots in RAM (numpy, page-rounded, allocated once); experts computed by the CPU kernels.

    `compute_threads`: the CPU kernels should run on one core fewer than Numba has, because the cache's
    reader thread copies the next experts into slots meanwhile and a parallel kernel waits for its
    slowest thread (the runtime applies it to whole decode steps, whose dense kernels meet the reader
    too; a prefill is compute-bound and keeps every core). Mixtral-mini on 2 cores with a cache of 50% of the experts, `generate -n 384`, farm-bench,
    5 paired runs: whole-process wall 0.965x and CPU time 0.84x of running the kernels on both cores
    (decode printed 48-54 tok/s before, 52-60 after). Resident, with no reader, both cores stay faster.
    """

    device = torch.device("cpu")

    def __init__(self, pool, num_slots: int, compute: Callable, compute_threads: int | None = None):
        self.pool, self.compute = pool, compute
        self.compute_threads = compute_threads or max(1, numba.get_num_threads() - 1)
        self.slot_bytes = page_rounded_block_bytes(pool)
        self.buffers = np.empty((num_slots, self.slot_bytes), dtype=np.uint8)  # pages touched on first fill
        self.views = [pool.views_from_buffer(buffer) for buffer in self.buffers]  # fixed: contents change

    def fill(self, slot: int, key: Key) -> int:
        """Read one expert's block into a slot; bytes read."""
        return self.pool.read_block_into(key[0], key[1], self.buffers[slot])

    def run(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """The expert in `slot` on x [T, D] -> [T, D] float32."""
        x32 = np.ascontiguousarray(x.detach().float().numpy())
        return torch.from_numpy(self.compute(*self.views[slot], x32))

    def run_direct(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        """The expert computed where it lies in the pool."""
        return run_on_pool(self.pool, self.compute, key, x)


class DeviceSlots:
    """Slots in a torch device's memory, filled through pinned host staging buffers on a side stream.

    On CUDA a fill is: one read of the block into a pinned buffer, an asynchronous copy to the slot on
    a copy stream, and a wait for that copy on the reader thread (so compute never waits on a stream).
    On the CPU the same code runs with ordinary buffers, which is how it is tested without a GPU.
    How a slot holds an expert is in allocate, store, matrices_of and linear (NF4DeviceSlots overrides them).
    """

    def __init__(self, pool, num_slots: int, device: torch.device, dtype: torch.dtype,
                 dequantize: Callable, cpu_compute: Callable, staging_buffers: int = 2):
        self.pool, self.device, self.dtype = pool, torch.device(device), dtype
        self.dequantize, self.cpu_compute = dequantize, cpu_compute
        self.is_cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self.staging: queue.Queue = queue.Queue()
        for _ in range(staging_buffers):
            self.staging.put(torch.empty(page_rounded_block_bytes(pool), dtype=torch.uint8,
                                         pin_memory=self.is_cuda))
        self.allocate(num_slots)

    def allocate(self, num_slots: int) -> None:
        """Allocate the slots once, and set slot_bytes: here one page-rounded pool block each."""
        self.slot_bytes = page_rounded_block_bytes(self.pool)
        self.buffers = torch.empty((num_slots, self.slot_bytes), dtype=torch.uint8, device=self.device)

    def fill(self, slot: int, key: Key) -> int:
        """Read one expert's block and store it into a device slot (see `store`); bytes read."""
        stage = self.staging.get()
        try:
            got = self.pool.read_block_into(key[0], key[1], stage.numpy())
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
        return tuple(self.dequantize(self.pool.spec, self.pool.shapes[name], parts, self.dtype)
                     for name, parts in zip(MATRICES, self.pool.tensor_parts(self.buffers[slot])))

    def linear(self, x: torch.Tensor, weight) -> torch.Tensor:
        """x [T, in] times one matrix from `matrices_of` ([out, in]) -> [T, out]."""
        return F.linear(x, weight)

    def run_direct(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        """The expert computed by the CPU kernels where it lies in the pool (no copy to the device)."""
        return run_on_pool(self.pool, self.cpu_compute, key, x)
