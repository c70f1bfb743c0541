"""The runtime expert cache: fixed slots filled from the pool, with pluggable eviction and prefetch.

It implements the model's ExpertBackend. It deals in (layer, expert) keys and a slot store
(cache/slots.py: RAM slots computed by the CPU kernels, or device slots computed by torch); it knows
no model classes and no file formats.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import MixtralOffloadError
from ..profiling import NULL_PROFILER
from .policies import EvictionPolicy, make_policy
from .slots import DeviceSlots, HostSlots
from .simulate import partition_capacities
from .traces import TraceRecorder

Key = tuple[int, int]  # (layer, expert)


@dataclass
class CacheStats:
    """What the cache did: per-layer hits and misses, prefetch outcomes, bytes and seconds of reads."""

    num_layers: int
    hits: list[int] = field(default_factory=list)
    misses: list[int] = field(default_factory=list)
    prefetches: int = 0
    prefetch_hits: int = 0
    prefetch_waste: int = 0
    direct: int = 0            # misses computed by the CPU on the mapped pool (no slot free, or cheaper)
    bytes_read: int = 0
    read_seconds: float = 0.0  # summed over reader threads
    wait_seconds: float = 0.0  # time the compute thread waited for a read

    def __post_init__(self) -> None:
        self.hits = self.hits or [0] * self.num_layers
        self.misses = self.misses or [0] * self.num_layers

    @property
    def hit_rate(self) -> float:
        """Hits over requests, prefetch hits included."""
        total = sum(self.hits) + sum(self.misses)
        return sum(self.hits) / total if total else 0.0


class MissCosts:
    """Measured seconds per byte of the two answers to a miss: fill a slot, or compute on the pool."""

    def __init__(self, smoothing: float = 0.2):
        self.fill: float | None = None
        self.direct: float | None = None
        self.smoothing = smoothing

    def record(self, kind: str, seconds: float, nbytes: int) -> None:
        """Fold one measurement into the running average of `kind` ('fill' or 'direct')."""
        rate, old = seconds / max(nbytes, 1), getattr(self, kind)
        setattr(self, kind, rate if old is None else old + self.smoothing * (rate - old))

    def prefer_direct(self) -> bool:
        """Whether computing on the pool has measured cheaper than filling a slot (and computing there)."""
        return self.fill is not None and self.direct is not None and self.direct < self.fill


class ExpertCache:
    """Experts of a pool paged into a slot store; computes routed experts on them."""

    def __init__(self, pool, num_layers: int, top_k: int, num_slots: int,
                 compute: Callable[[object, object, object, np.ndarray], np.ndarray] | None = None,
                 policy: str = "lru", prefetch: int = 0, partition: str = "auto",
                 recorder: TraceRecorder | None = None, read_threads: int = 1, store=None):
        if num_slots < top_k + prefetch:
            raise MixtralOffloadError(
                f"an expert cache of {num_slots} slots is below the minimum of top_k + prefetch = {top_k + prefetch}")
        self.pool, self.compute = pool, compute
        self.num_layers, self.top_k, self.prefetch = num_layers, top_k, prefetch
        if partition == "auto":
            # Measured on the demo model's recorded trace (docs/cache.md): with prefetch, one shared pool
            # lets the guesses for the next layer take slots from any layer and wins; without it, a pool
            # per layer avoids the cliff of shared LRU (each token walks the layers in the same order).
            per_layer_room = num_slots // num_layers > top_k
            partition = "layer" if per_layer_room and not prefetch else "shared"
        self.partition = partition
        sizes = partition_capacities(num_slots, num_layers, partition, top_k)
        self.capacity = sizes if partition == "layer" else None
        self.policies: list[EvictionPolicy] = [make_policy(policy) for _ in sizes]
        self.store = store if store is not None else HostSlots(pool, num_slots, compute)
        # With device slots a miss may be cheaper on the CPU, where the expert lies; RAM slots are
        # filled by the same bytes the CPU would read, so there a miss always fills a slot.
        self.costs = MissCosts() if isinstance(self.store, DeviceSlots) else None
        # CPU kernel threads for a forward pass (the runtime applies it): RAM slots leave a core to the reader
        self.kernel_threads = getattr(self.store, "compute_threads", None)
        self.free = list(range(num_slots - 1, -1, -1))
        self.slot_of: dict[Key, int] = {}
        self.loading: dict[Key, Future] = {}
        self.pinned: set[Key] = set()
        self.resident_per_layer = [0] * num_layers
        self.prefetched: dict[int, set[Key]] = {}    # layer -> keys read ahead for it, not yet used
        self.hints: dict[int, list[int]] = {}        # layer -> experts guessed for it
        self.token_guesses: dict[int, np.ndarray] = {}  # layer -> [T, E] hint per token (for traces)
        self.reader = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="expert-read")
        self.stats = CacheStats(num_layers)
        self.recorder = recorder
        self.profiler = NULL_PROFILER
        self.now = 0

    # -- slots ----------------------------------------------------------------------------------
    def _policy(self, layer: int) -> EvictionPolicy:
        return self.policies[layer if self.capacity else 0]

    def _reserve(self, key: Key, protected: set[Key]) -> int | None:
        """A slot for key: a free one, or one freed from the policy's victim; None if all are protected."""
        layer = key[0]
        full = (self.resident_per_layer[layer] >= self.capacity[layer]) if self.capacity else not self.free
        if not full and self.free:
            return self.free.pop()
        resident = [k for k in self.slot_of if (k[0] == layer or not self.capacity)]
        keep = protected | self.pinned | set(self.loading)
        if all(k in keep for k in resident):
            return None
        victim = self._policy(layer).victim(resident, keep, self.now)
        slot = self.slot_of.pop(victim)
        self.resident_per_layer[victim[0]] -= 1
        self._policy(victim[0]).on_evict(victim)
        for prefetched in self.prefetched.values():
            if victim in prefetched:
                prefetched.discard(victim)
                self.stats.prefetch_waste += 1
        return slot

    def _start_read(self, key: Key, slot: int) -> None:
        self.slot_of[key] = slot
        self.resident_per_layer[key[0]] += 1
        self._policy(key[0]).on_insert(key, self.now)
        self.loading[key] = self.reader.submit(self._read, key, slot)

    def _read(self, key: Key, slot: int) -> tuple[int, float]:
        start = time.perf_counter()
        with self.profiler.span("pool_read", layer=key[0], expert=key[1], bytes=self.pool.block_nbytes):
            got = self.store.fill(slot, key)
        return got, time.perf_counter() - start

    def _wait(self, key: Key) -> None:
        future = self.loading.pop(key, None)
        if future is None:
            return
        start = time.perf_counter()
        with self.profiler.span("read_wait", layer=key[0], expert=key[1]):
            got, seconds = future.result()
        self.stats.wait_seconds += time.perf_counter() - start
        self.stats.bytes_read += got
        self.stats.read_seconds += seconds
        if self.costs is not None:
            self.costs.record("fill", seconds, got)
        self.profiler.count("pool_read_bytes", got, layer=key[0])

    # -- ExpertBackend --------------------------------------------------------------------------
    def hint(self, layer: int, probs: torch.Tensor) -> None:
        """Pass the router probabilities guessed for `layer` to its policy; remember the experts to read
        during the layer before (top by summed probability)."""
        if layer >= self.num_layers:
            return
        guess = probs.float().cpu().numpy()  # [T, E]
        self._policy(layer).observe_hint(layer, guess)
        if self.recorder is not None:  # each token's own guess, for the trace
            self.token_guesses[layer] = guess
        if self.prefetch:
            mass = probs.float().sum(dim=0)
            self.hints[layer] = torch.topk(mass, min(self.prefetch, mass.shape[0])).indices.tolist()

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of each token's routed experts, [T, D] in x's dtype; misses are read into slots."""
        ids = expert_ids.cpu().numpy()
        w = weights.float()
        w_cpu = w.cpu().numpy()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if self.recorder is not None:
            self.recorder.record(layer, ids, w_cpu, hint_probs=self.token_guesses.pop(layer + 1, None))
        experts, inverse = np.unique(ids, return_inverse=True)
        inverse = inverse.reshape(ids.shape)
        keys = [(layer, int(e)) for e in experts]
        for index, key in enumerate(keys):
            self._policy(layer).on_access(key, float(w_cpu[inverse == index].sum()), self.now)
            self.now += 1
        self._count_prefetch(layer, keys)
        # resident and loaded first, then those in flight, then misses
        order = sorted(keys, key=lambda k: (k in self.loading, k not in self.slot_of))
        wanted = set(keys)
        direct = set()
        for key in order:
            if key in self.slot_of:
                self.stats.hits[layer] += 1
                self.profiler.count("cache_hit", layer=layer)
            else:
                self.stats.misses[layer] += 1
                self.profiler.count("cache_miss", layer=layer)
                if self._try_direct(len(direct)):
                    direct.add(key)
        self._read_ahead(order, wanted, direct)
        self._start_prefetch(layer + 1, wanted)
        for key in order:
            rows, rank = np.nonzero(inverse == keys.index(key))
            rows_t, rank_t = torch.from_numpy(rows).to(x.device), torch.from_numpy(rank).to(x.device)
            xs = x[rows_t]
            if key not in self.slot_of and key not in direct:
                slot = self._reserve(key, set())
                if slot is not None:
                    self._start_read(key, slot)
            self._read_ahead(order, wanted, direct)
            if key in self.slot_of:
                self._wait(key)
                self.pinned.add(key)
                with self.profiler.span(f"expert_{self.store.device.type}", layer=layer, expert=key[1],
                                        tokens=len(rows)):
                    y = self.store.run(self.slot_of[key], xs)
                self.pinned.discard(key)
            else:  # computed where it lies: no slot could be had, or the CPU measured cheaper than a fill
                self.stats.direct += 1
                start = time.perf_counter()
                with self.profiler.span("expert_pool", layer=layer, expert=key[1], tokens=len(rows)):
                    y = self.store.run_direct(key, xs)
                if self.costs is not None:
                    self.costs.record("direct", time.perf_counter() - start, self.pool.block_nbytes)
            # a token meets each expert once, so rows are distinct: a plain indexed add (index_add_
            # wakes torch's thread pool, ~0.15 ms a call on the CPU, more than the add itself)
            out[rows_t] += y.float() * w[rows_t, rank_t, None]
        return out.to(x.dtype)

    def _try_direct(self, chosen: int) -> bool:
        """Whether a miss should be computed on the pool: measured cheaper, or not yet measured once."""
        if self.costs is None:
            return False
        if self.costs.direct is None:  # measure each answer once before choosing
            return self.costs.fill is not None and chosen == 0
        return self.costs.prefer_direct()

    def _read_ahead(self, order: list[Key], wanted: set[Key], direct: set[Key]) -> None:
        """Start reads for this layer's misses while slots can be had without evicting what it still needs."""
        for key in order:
            if key not in self.slot_of and key not in direct:
                slot = self._reserve(key, wanted)
                if slot is None:
                    return
                self._start_read(key, slot)

    def _start_prefetch(self, layer: int, in_use: set[Key]) -> None:
        guess = self.hints.pop(layer, None)
        if not guess:
            return
        protected = set(in_use) | {(layer, e) for e in guess}
        started = self.prefetched.setdefault(layer, set())
        for expert in guess:
            key = (layer, expert)
            if key in self.slot_of:
                continue
            slot = self._reserve(key, protected)
            if slot is None:
                return
            self._start_read(key, slot)
            started.add(key)
            self.stats.prefetches += 1

    def _count_prefetch(self, layer: int, keys: list[Key]) -> None:
        started = self.prefetched.pop(layer, set())
        used = started & set(keys)
        self.stats.prefetch_hits += len(used)
        self.stats.prefetch_waste += len(started) - len(used)
        if used:
            self.profiler.count("prefetch_hit", len(used), layer=layer)
        if len(started) > len(used):
            self.profiler.count("prefetch_waste", len(started) - len(used), layer=layer)

    def close(self) -> None:
        """Stop the reader threads."""
        for future in self.loading.values():
            future.result()
        self.loading.clear()
        self.reader.shutdown(wait=True)
