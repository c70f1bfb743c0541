"""Where cached experts live and how they are computed: RAM slots (CPU kernels) or device slots (torch).

A slot store owns `num_slots` buffers of one pool block each. `fill` runs on a reader thread and
copies one expert into a slot; `run` computes the expert held in a slot on x; `run_direct` computes
an expert where it lies in the mapped pool with the CPU kernels (no slot, pages released after).
"""
from __future__ import annotations

import queue
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

PAGE = 4096
Key = tuple[int, int]


def _slot_bytes(pool) -> int:
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
    """Slots in RAM (numpy, page-rounded, allocated once); experts computed by the CPU kernels."""

    device = torch.device("cpu")

    def __init__(self, pool, num_slots: int, compute: Callable):
        self.pool, self.compute = pool, compute
        self.slot_bytes = _slot_bytes(pool)
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
    """

    def __init__(self, pool, num_slots: int, device: torch.device, dtype: torch.dtype,
                 dequantize: Callable, cpu_compute: Callable, staging_buffers: int = 2):
        self.pool, self.device, self.dtype = pool, torch.device(device), dtype
        self.dequantize, self.cpu_compute = dequantize, cpu_compute
        self.slot_bytes = _slot_bytes(pool)
        self.buffers = torch.empty((num_slots, self.slot_bytes), dtype=torch.uint8, device=self.device)
        self.is_cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self.staging: queue.Queue = queue.Queue()
        for _ in range(staging_buffers):
            self.staging.put(torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=self.is_cuda))

    def fill(self, slot: int, key: Key) -> int:
        """Read one expert's block and copy it into a device slot; bytes read."""
        stage = self.staging.get()
        try:
            got = self.pool.read_block_into(key[0], key[1], stage.numpy())
            if self.is_cuda:
                with torch.cuda.stream(self.stream):
                    self.buffers[slot].copy_(stage, non_blocking=True)
                self.stream.synchronize()  # the staging buffer is reused next, and the slot must be whole
            else:
                self.buffers[slot].copy_(stage)
        finally:
            self.staging.put(stage)
        return got

    def run(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """The expert in `slot`, dequantized on the device, on x [T, D] -> [T, D]."""
        w1, w3, w2 = (self.dequantize(self.pool.spec, self.pool.shapes[name], parts, self.dtype)
                      for name, parts in zip(("w1", "w3", "w2"), self.pool.tensor_parts(self.buffers[slot])))
        x = x.to(self.dtype)
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)

    def run_direct(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        """The expert computed by the CPU kernels where it lies in the pool (no copy to the device)."""
        return run_on_pool(self.pool, self.cpu_compute, key, x)
