"""Recording where time and bytes go: spans (named, timed, nested) and counters, per token.

The model, the expert backends and the cache call `span` and `count`; the default NULL_PROFILER
makes both free. A `Profiler` keeps every event for the JSON / Chrome-trace writers and reports.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class Event:
    """One timed span: name, start and duration in seconds since the profiler started, and details."""

    name: str
    start: float
    duration: float
    thread: int
    args: dict = field(default_factory=dict)


class NullProfiler:
    """Records nothing."""

    @contextmanager
    def span(self, name: str, **args) -> Iterator[None]:
        """Time a block of work under a name (e.g. 'attention', 'router', 'expert_cpu')."""
        yield

    def count(self, name: str, value: float = 1, **args) -> None:
        """Add to a named counter (e.g. 'cache_hit', 'pool_read_bytes')."""

    def token(self, kind: str) -> None:
        """Mark the start of a forward over new tokens ('prefill' or 'decode')."""


NULL_PROFILER = NullProfiler()


class Profiler(NullProfiler):
    """Keeps every span and counter, tagged with the index of the forward pass it belongs to."""

    def __init__(self) -> None:
        self.origin = time.perf_counter()
        self.events: list[Event] = []
        self.counters: list[tuple[int, str, float, dict]] = []  # (forward index, name, value, args)
        self.forwards: list[tuple[str, float]] = []             # (kind, start) per forward pass
        self._lock = threading.Lock()                          # prefetch threads record too

    @contextmanager
    def span(self, name: str, **args) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            event = Event(name, start - self.origin, end - start, threading.get_ident(), args)
            with self._lock:
                self.events.append(event)

    def count(self, name: str, value: float = 1, **args) -> None:
        with self._lock:
            self.counters.append((len(self.forwards) - 1, name, value, args))

    def token(self, kind: str) -> None:
        with self._lock:
            self.forwards.append((kind, time.perf_counter() - self.origin))
