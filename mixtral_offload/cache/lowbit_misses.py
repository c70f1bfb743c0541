"""Misses computed from an expert's low-bit copy: read into a few scratch buffers, never into a slot.

The cache hands this the misses its MissRule picks (miss_choice.py); the reads run on the cache's
reader thread in the order the experts will be computed, as many at a time as there are buffers, so
nothing cached is evicted and the bytes read are the low-bit copy's.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Executor, Future

import numpy as np
import torch

from .miss_choice import MissRule
from .reader import BlockReader, aligned_buffer
from .source import BlockSource, Key, page_rounded


class LowBitMisses:
    """The low-bit copy (a BlockSource), its kernel (chosen once at load), the rule and `buffers` scratch buffers."""

    def __init__(self, source: BlockSource, kernel, rule: MissRule, buffers: int):
        self.source, self.kernel, self.rule = source, kernel, rule
        self.buffer_bytes = page_rounded(source.block_nbytes)
        self.buffers = aligned_buffer(buffers * self.buffer_bytes).reshape(buffers, self.buffer_bytes)
        self.reader = BlockReader(source.fileno())
        self.free = list(range(buffers))
        self.queued: deque[Key] = deque()
        self.reading: dict[Key, tuple[int, Future]] = {}

    def start(self, keys: list[Key], executor: Executor, profiler) -> None:
        """A layer's low-bit misses, in the order they will be computed: reads start as buffers are free.

        What an earlier layer left unused (its forward pass was abandoned) is waited for and dropped first.
        """
        for buffer, future in self.reading.values():
            future.result()
            self.free.append(buffer)
        self.reading.clear()
        self.queued = deque(keys)
        self._issue(executor, profiler)

    def _issue(self, executor: Executor, profiler) -> None:
        while self.queued and self.free:
            key, buffer = self.queued.popleft(), self.free.pop()
            self.reading[key] = (buffer, executor.submit(self._read, key, buffer, profiler))

    def _read(self, key: Key, buffer: int, profiler) -> tuple[int, float]:
        start = time.perf_counter()
        with profiler.span("lowbit_read", layer=key[0], expert=key[1], bytes=self.source.block_nbytes):
            got = self.reader.read(self.source.extents(key), self.buffers[buffer])
        return got, time.perf_counter() - start

    def run(self, key: Key, x: torch.Tensor, executor: Executor, profiler) -> tuple[torch.Tensor, int, float]:
        """Expert `key` (started before) on x [T, D] from its low-bit copy: (y [T, D], bytes read, read seconds)."""
        buffer, future = self.reading.pop(key)
        with profiler.span("read_wait", layer=key[0], expert=key[1]):
            got, seconds = future.result()
        x32 = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        with profiler.span("expert_lowbit", layer=key[0], expert=key[1], tokens=x.shape[0]):
            y = self.kernel(*self.source.views(self.buffers[buffer], key), x32)
        self.free.append(buffer)
        self._issue(executor, profiler)
        return torch.from_numpy(y).to(x.device), got, seconds

    def close(self) -> None:
        """Wait for reads still in flight and stop the block reader."""
        for _, future in self.reading.values():
            future.result()
        self.reading.clear()
        self.reader.close()
