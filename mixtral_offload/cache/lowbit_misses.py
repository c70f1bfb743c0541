"""Misses computed from an expert's low-bit copy: read into a few scratch buffers, never into a slot.

The cache hands this the misses its MissRule picks (miss_choice.py), and the next layer's guesses the
rule would send here, to read ahead instead of the full copy; the reads run on the cache's reader
thread in the order the experts will be computed, as many at a time as there are buffers, so nothing
cached is evicted and the bytes read are the low-bit copy's.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING

import numpy as np
import torch

from .miss_choice import MissRule, guessed_low_bit
from .reader import BlockReader, aligned_buffer
from .source import BlockSource, Key, page_rounded

if TYPE_CHECKING:
    from .expert_cache import CacheStats


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
        self.guessed: dict[int, set[int]] = {}  # layer -> guessed experts the rule would send here
        self.ahead: dict[int, set[Key]] = {}    # layer -> keys read ahead for it, not yet used

    def guess(self, layer: int, probs: np.ndarray, top_k: int) -> None:
        """Judge the experts guessed for `layer` (probs [T, E]) as the rule will judge the routing they foretell."""
        self.guessed[layer] = guessed_low_bit(self.rule, probs, top_k)

    def prefetch(self, layer: int, experts: list[int], executor: Executor, profiler, stats: CacheStats) -> set[Key]:
        """Of these experts guessed for `layer` (none resident), read ahead the low-bit copy of those the rule
        would send here, after this layer's low-bit misses as buffers free up; returns their keys."""
        low = self.guessed.pop(layer, set())
        keys = [(layer, e) for e in experts if e in low and (layer, e) not in self.reading]
        if keys:
            self.queued.extend(key for key in keys if key not in self.queued)
            self.ahead.setdefault(layer, set()).update(keys)
            stats.low_bit_prefetches += len(keys)
            profiler.count("lowbit_prefetch", len(keys), layer=layer)
            self._issue(executor, profiler)
        return set(keys)

    def start(self, layer: int, misses: list[Key], group_of: dict, expert_ids: np.ndarray, free_slots: int,
              executor: Executor, profiler, stats: CacheStats) -> set[Key]:
        """Of a layer's misses (in compute order; group_of: their offload.model.ExpertGroup, expert_ids [T, K]
        the routing), those the rule sends here, but as many as the free slots left after the other misses
        (they evict nothing): start their reads in that order as buffers are free, and return them.

        A read already under way for one of them (read ahead) is kept; every other, a prefetch the layer
        does not use or what an abandoned forward pass left, is waited for, counted and dropped.
        """
        eligible = [key for key in misses if self.rule.takes(group_of[key], expert_ids)]
        keys = eligible[max(0, free_slots - (len(misses) - len(eligible))):]
        wanted = set(keys)
        for key in [key for key in self.reading if key not in wanted]:
            buffer, future = self.reading.pop(key)
            self._count(key, *future.result(), profiler, stats)
            self.free.append(buffer)
        self.queued = deque(key for key in keys if key not in self.reading)
        started = self.ahead.pop(layer, set())
        stats.low_bit_prefetch_hits += len(started & wanted)
        stats.low_bit_prefetch_waste += len(started - wanted)
        if started - wanted:
            profiler.count("lowbit_prefetch_waste", len(started - wanted), layer=layer)
        self._issue(executor, profiler)
        return wanted

    def _issue(self, executor: Executor, profiler) -> None:
        while self.queued and self.free:
            key, buffer = self.queued.popleft(), self.free.pop()
            self.reading[key] = (buffer, executor.submit(self._read, key, buffer, profiler))

    def _read(self, key: Key, buffer: int, profiler) -> tuple[int, float]:
        start = time.perf_counter()
        with profiler.span("lowbit_read", layer=key[0], expert=key[1], bytes=self.source.block_nbytes):
            got = self.reader.read(self.source.extents(key), self.buffers[buffer])
        return got, time.perf_counter() - start

    @staticmethod
    def _count(key: Key, got: int, seconds: float, profiler, stats: CacheStats) -> None:
        stats.low_bit_bytes += got
        stats.read_seconds += seconds
        profiler.count("lowbit_read_bytes", got, layer=key[0])

    def run(self, key: Key, x: torch.Tensor, executor: Executor, profiler, stats: CacheStats) -> torch.Tensor:
        """Expert `key` (started before) on x [T, D] from its low-bit copy -> y [T, D]; its read counted in stats."""
        buffer, future = self.reading.pop(key)
        with profiler.span("read_wait", layer=key[0], expert=key[1]):
            got, seconds = future.result()
        self._count(key, got, seconds, profiler, stats)
        stats.low_bit += 1
        x32 = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        with profiler.span("expert_lowbit", layer=key[0], expert=key[1], tokens=x.shape[0]):
            y = self.kernel(*self.source.views(self.buffers[buffer], key), x32)
        self.free.append(buffer)
        self._issue(executor, profiler)
        return torch.from_numpy(y).to(x.device)

    def close(self) -> None:
        """Wait for reads still in flight and stop the block reader."""
        for _, future in self.reading.values():
            future.result()
        self.reading.clear()
        self.reader.close()
