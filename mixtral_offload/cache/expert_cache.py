"""The runtime expert cache: fixed slots filled from a BlockSource, with pluggable eviction and prefetch.

It implements the model's ExpertBackend. It deals in (layer, expert) keys, extents to read and slot
stores (RAM slots here, computed by the CPU kernels; device slots in device_slots.py); it knows no
model classes and no file formats.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numba
import numpy as np
import torch

from ..errors import MixtralOffloadError
from ..profiling import NULL_PROFILER
from .lowbit_misses import LowBitMisses
from .policies import EvictionPolicy, make_policy
from .prompt_reads import batch_experts
from .reader import BlockReader, aligned_buffer, in_background, populate
from .simulate import PREFETCH_MIN_PROB, partition_capacities
from .source import BlockSource, Key, page_rounded
from .traces import TraceRecorder


class SlotStore(Protocol):
    """Where cached experts live and how they are computed: RAM slots here, device slots in device_slots.py."""

    num_slots: int
    device: torch.device
    direct_choice: bool          # whether a miss may instead be computed where it lies, when cheaper
    decode_threads: int | None   # CPU kernel threads for a decode step while the reader fills slots

    def fill(self, slot: int, key: Key) -> int:
        """Read expert `key` into `slot` (on the reader thread); bytes read."""
        ...

    def run(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """The expert in `slot` on x [T, D] -> [T, D]."""
        ...

    def run_direct(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        """Expert `key` computed where it lies in the file mapping."""
        ...

    def close(self) -> None:
        """Stop its readers."""
        ...


class HostSlots:
    """Slots in RAM (numpy, page-rounded, allocated once); experts computed by the CPU kernels.

    `decode_threads`: decode steps run the CPU kernels on one core fewer than Numba has, because the
    reader thread fills slots meanwhile and a parallel kernel waits for its slowest thread
    (docs/architecture.md, Threads); a prefill is compute-bound and keeps every core.
    """

    device = torch.device("cpu")
    direct_choice = False  # a fill reads the same bytes the CPU would: a miss always fills a slot

    def __init__(self, source: BlockSource, num_slots: int, kernel, decode_threads: int | None = None):
        self.source, self.kernel, self.num_slots = source, kernel, num_slots
        self.decode_threads = decode_threads or max(1, numba.get_num_threads() - 1)
        self.slot_bytes = page_rounded(source.block_nbytes)
        # page-aligned, so reads go around the page cache (O_DIRECT); its pages faulted in on a thread
        self.buffers = aligned_buffer(num_slots * self.slot_bytes).reshape(num_slots, self.slot_bytes)
        self.populating = in_background(populate, self.buffers)
        self.reader = BlockReader(source.fileno())
        self.views: list[tuple | None] = [None] * num_slots  # the kernel inputs of each slot's expert

    def fill(self, slot: int, key: Key) -> int:
        """Read one expert into a slot; bytes read."""
        got = self.reader.read(self.source.extents(key), self.buffers[slot])
        self.views[slot] = self.source.views(self.buffers[slot], key)
        return got

    def run(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """The expert in `slot` on x [T, D] -> [T, D] float32."""
        return torch.from_numpy(self.kernel(*self.views[slot], np.ascontiguousarray(x.detach().float().numpy())))

    def run_direct(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        """The expert computed where it lies in the mapped file."""
        return run_on_mapping(self.source, self.kernel, key, x)

    def close(self) -> None:
        """Stop the block reader."""
        self.reader.close()


def run_on_mapping(source: BlockSource, kernel, key: Key, x: torch.Tensor) -> torch.Tensor:
    """One expert computed by the CPU kernel on the file mapping; its mapped pages are given back after."""
    x32 = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
    try:
        y = kernel(*source.mapped(key), x32)
    finally:
        source.release(key)
    return torch.from_numpy(y).to(x.device)


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
    low_bit: int = 0           # misses computed from the low-bit copy (--miss-bits)
    bytes_read: int = 0        # of the full copy, into slots
    low_bit_bytes: int = 0     # of the low-bit copy, into scratch buffers (wasted prefetches included)
    low_bit_prefetches: int = 0      # guesses the miss rule sends to the low-bit copy, read ahead there
    low_bit_prefetch_hits: int = 0   # of them, computed from the buffer by the next layer
    low_bit_prefetch_waste: int = 0  # of them, dropped unused
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
    """Experts of a BlockSource paged into a slot store; runs routed experts on them (an ExpertBackend)."""

    def __init__(self, source: BlockSource, num_layers: int, top_k: int, store: SlotStore, policy: str = "lru",
                 prefetch: int = 0, partition: str = "auto", recorder: TraceRecorder | None = None,
                 read_threads: int = 1, low_bit: LowBitMisses | None = None):
        num_slots = store.num_slots
        if num_slots < top_k + prefetch:
            raise MixtralOffloadError(
                f"an expert cache of {num_slots} slots is below the minimum of top_k + prefetch = {top_k + prefetch}")
        self.source, self.store = source, store
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
        # With device slots a miss may be cheaper on the CPU, where the expert lies (store.direct_choice)
        self.costs = MissCosts() if store.direct_choice else None
        self.decode_threads = store.decode_threads
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
        self.low_bit = low_bit  # misses its rule picks are computed from the low-bit copy
        self.profiler = NULL_PROFILER
        self.now = 0

    def set_profiler(self, profiler) -> None:
        """Record reads, waits, hits and misses into profiler."""
        self.profiler = profiler

    # -- slots ----------------------------------------------------------------------------------
    def _policy(self, layer: int) -> EvictionPolicy:
        return self.policies[layer if self.capacity else 0]

    def _reserve(self, key: Key, protected: set[Key]) -> int | None:
        """A slot for key: a free one, or one freed from the policy's victim; None if all are protected."""
        layer = key[0]
        if self._free_slots(layer):
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
        with self.profiler.span("pool_read", layer=key[0], expert=key[1], bytes=self.source.block_nbytes):
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
        during the layer before (the likeliest, where they pass PREFETCH_MIN_PROB)."""
        if layer >= self.num_layers:
            return
        guess = probs.float().cpu().numpy()  # [T, E]
        self._policy(layer).observe_hint(layer, guess)
        if self.recorder is not None:  # each token's own guess, for the trace
            self.token_guesses[layer] = guess
        batch = batch_experts(guess, self.top_k, self.prefetch) if self.prefetch else None
        if batch is not None:  # a batch whose guesses name more experts than the decode rule reads: all of them
            self.hints[layer] = batch
        elif self.prefetch:  # the likeliest experts, where a token's mean probability makes a read worth it
            mean = guess.mean(axis=0)
            self.hints[layer] = [int(e) for e in np.argsort(-mean, kind="stable")[:self.prefetch]
                                 if mean[e] >= PREFETCH_MIN_PROB]
        if self.prefetch and self.low_bit is not None:  # a batch's read-ahead stays full
            self.low_bit.guess(layer, guess if batch is None else guess[:0], self.top_k)

    def run(self, layer: int, x: torch.Tensor, routing) -> Iterator[tuple[object, torch.Tensor]]:
        """Each routed expert of the layer (routing: offload.model.Routing) on its tokens, resident ones
        first, then those being read, then misses; misses are read into slots while others compute."""
        if self.recorder is not None:
            self.recorder.record(layer, routing.expert_ids, routing.weights,
                                 hint_probs=self.token_guesses.pop(layer + 1, None))
        group_of = {(layer, group.expert): group for group in routing.groups}
        keys = list(group_of)
        for key, group in group_of.items():
            self._policy(layer).on_access(key, group.gate_mass, self.now)
            self.now += 1
        batch = len(routing.expert_ids) > 1
        self._count_prefetch(layer, keys, batch)
        ahead = self.low_bit.reading if self.low_bit is not None else {}  # low-bit reads under way: before other misses
        order = sorted(keys, key=lambda k: (k in self.loading, k not in self.slot_of, k not in ahead))
        wanted = set(keys)
        if batch:  # a prompt's next piece may run this layer's other residents
            wanted |= {key for key in self.slot_of if key[0] == layer}
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
        low = set() if self.low_bit is None else self.low_bit.start(  # its reads started in compute order
            layer, [k for k in order if k not in self.slot_of and k not in direct], group_of, routing.expert_ids,
            self._free_slots(layer), self.reader, self.profiler, self.stats)
        self._read_ahead(order, wanted, direct | low)
        self._start_prefetch(layer + 1, wanted)
        for key in order:
            group = group_of[key]
            xs = x if len(group.rows) == x.shape[0] else x[torch.from_numpy(group.rows).to(x.device)]
            if key in low:
                yield group, self.low_bit.run(key, xs, self.reader, self.profiler, self.stats)
                continue
            if key not in self.slot_of and key not in direct:
                slot = self._reserve(key, set())
                if slot is not None:
                    self._start_read(key, slot)
            self._read_ahead(order, wanted, direct | low)
            if key in self.slot_of:
                self._wait(key)
                self.pinned.add(key)
                with self.profiler.span(f"expert_{self.store.device.type}", layer=layer, expert=key[1],
                                        tokens=len(group.rows)):
                    y = self.store.run(self.slot_of[key], xs)
                self.pinned.discard(key)
            else:  # computed where it lies: no slot could be had, or the CPU measured cheaper than a fill
                self.stats.direct += 1
                start = time.perf_counter()
                with self.profiler.span("expert_pool", layer=layer, expert=key[1], tokens=len(group.rows)):
                    y = self.store.run_direct(key, xs)
                if self.costs is not None:
                    self.costs.record("direct", time.perf_counter() - start, self.source.block_nbytes)
            yield group, y

    def _free_slots(self, layer: int) -> int:
        """Slots an expert of `layer` can take without evicting anything (none once the cache is warm)."""
        free = len(self.free)
        return min(free, self.capacity[layer] - self.resident_per_layer[layer]) if self.capacity else free

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
        warm = self.low_bit is not None and not self._free_slots(layer)  # the rule's low-bit guesses: read that copy
        low = self.low_bit.prefetch(layer, [e for e in guess if (layer, e) not in self.slot_of], self.reader,
                                    self.profiler, self.stats) if warm else set()
        protected = set(in_use) | {(layer, e) for e in guess}
        started = self.prefetched.setdefault(layer, set())
        for expert in guess:
            key = (layer, expert)
            if key in self.slot_of or key in low:
                continue
            slot = self._reserve(key, protected)
            if slot is None:
                return
            self._start_read(key, slot)
            started.add(key)
            self.stats.prefetches += 1

    def _cancel(self, key: Key) -> bool:
        """Drop a read that has not begun (its slot is free again, nothing was read); whether it was dropped."""
        if key not in self.loading or not self.loading[key].cancel():
            return False
        del self.loading[key]
        self.free.append(self.slot_of.pop(key))
        self.resident_per_layer[key[0]] -= 1
        self._policy(key[0]).on_evict(key)
        return True

    def _count_prefetch(self, layer: int, keys: list[Key], batch: bool = False) -> None:
        started = self.prefetched.pop(layer, set())
        used = started & set(keys)
        for key in sorted(started - used):  # a wasted prefetch: a batch drops its read if not begun (prompts
            if not (batch and self._cancel(key)):  # are disk-bound), else done waiting, evictable like any slot
                self._wait(key)
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
        if self.low_bit is not None:
            self.low_bit.close()
        self.store.close()
