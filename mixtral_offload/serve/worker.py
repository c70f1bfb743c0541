"""One generation at a time: a FIFO queue of jobs and the thread that runs the blocking token generator.

The expert cache, the memory budget and the KV cache belong to the one model, so requests take turns
in arrival order. A cancelled job (its client went away) is skipped if still queued, or stops before
its next token if running. Every job ends with one Finish event and one log line.
"""
from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from ..errors import MixtralOffloadError
from .stops import StopMatcher

FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}  # runtime's -> OpenAI's
CANCELLED = "cancelled"  # the client disconnected (logged; never sent)


@dataclass(frozen=True)
class Finish:
    """The last event of a job: why it ended and its counts and timings."""

    reason: str                  # 'stop', 'length' or CANCELLED
    prompt_tokens: int
    cached_tokens: int           # prompt tokens whose KV the runtime reused from the previous request
    completion_tokens: int
    queued_seconds: float
    prompt_seconds: float        # prefill and the first token
    tokens_per_second: float     # decode speed after the first token


@dataclass(frozen=True)
class Failure:
    """The last event of a job that raised: the message for the client."""

    message: str


@dataclass
class Job:
    """A request's generation; `emit` receives text pieces, then one Finish or Failure (on the worker thread)."""

    label: str
    prompt_ids: list[int]
    sampling: dict          # max_new_tokens, temperature, top_p, top_k, seed for Runtime.generate
    stops: tuple[str, ...]
    emit: Callable[[object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop at the next token (or never start)."""
        self.cancelled.set()


class Worker:
    """Runs queued jobs one after another on a thread of its own, against one runtime."""

    def __init__(self, runtime, log: Callable[[str], None]):
        self.runtime, self.log = runtime, log
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.current: Job | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="generation", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def cancel_all(self) -> None:
        """Stop the running job at its next token, and every job queued or submitted from now on at once."""
        self.stopping.set()
        if (job := self.current) is not None:
            job.cancel()

    def stop(self) -> None:
        """Cancel every job and wait for the thread to end."""
        self.cancel_all()
        self.jobs.put(None)
        self.thread.join()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.current = job
            if self.stopping.is_set():
                job.cancel()
            try:
                end = self._run(job)
            except MixtralOffloadError as exc:
                end = Failure(str(exc))
            except Exception as exc:  # an internal bug: log the traceback, answer 500, keep serving
                traceback.print_exc()
                end = Failure(f"internal error: {type(exc).__name__}: {exc}")
            self.current = None
            self.log(log_line(job.label, end, self.runtime.cache_stats()))  # logged before the client hears
            job.emit(end)

    def _run(self, job: Job) -> Finish:
        queued = time.perf_counter() - job.submitted
        if job.cancelled.is_set():
            return Finish(CANCELLED, len(job.prompt_ids), 0, 0, queued, 0.0, 0.0)
        matcher = StopMatcher(job.stops)
        records = self.runtime.generate(job.prompt_ids, **job.sampling)
        reason = CANCELLED
        try:
            for record in records:
                text = matcher.push(record.text)
                if matcher.stopped:
                    reason = "stop"
                elif record.finish_reason:
                    text += matcher.flush()
                    reason = FINISH_REASONS[record.finish_reason]
                if text:
                    job.emit(text)
                if reason != CANCELLED or job.cancelled.is_set():
                    break
        finally:
            records.close()
        return Finish(reason, record.prompt_tokens, self.runtime.reused_tokens, record.index + 1, queued,
                      record.prompt_seconds, record.tokens_per_second)


def log_line(label: str, end: Finish | Failure, cache_stats) -> str:
    """One line per generation: time, request, tokens in (cached) and out, speed, expert cache hit rate."""
    stamp = datetime.now().isoformat(sep=" ", timespec="seconds")
    if isinstance(end, Failure):
        return f"{stamp} {label}: failed: {end.message}"
    rate = f", expert cache hit rate {cache_stats.hit_rate:.2f}" if cache_stats is not None else ""
    return (f"{stamp} {label}: {end.prompt_tokens} tokens in ({end.cached_tokens} cached), "
            f"{end.completion_tokens} out, queued {end.queued_seconds:.2f} s, prompt {end.prompt_seconds:.2f} s, "
            f"{end.tokens_per_second:.1f} tok/s, finish {end.reason}{rate}")
