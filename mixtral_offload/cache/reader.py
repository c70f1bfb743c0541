"""Reads of byte extents of an open file into a buffer: several in flight, O_DIRECT where the file system allows.

It knows offsets and lengths, no file format: the caller says where an expert's parts lie and where
each goes in the buffer. O_DIRECT reads skip the page cache (no copy, nothing charged to it); they
need page-aligned file offsets, lengths and buffer addresses, so each piece is split into a buffered
head up to a page boundary, a direct body of whole pages and a buffered tail. Pieces that cannot be
aligned, and every read on a file system that refuses O_DIRECT (tmpfs), are buffered reads.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..errors import MixtralOffloadError
from .source import PAGE, BlockSource, Extent, Key  # PAGE: O_DIRECT's alignment of offsets, lengths and addresses

CHUNK_BYTES = 4 << 20  # extents are read in pieces of this size, so one large matrix keeps several reads in flight
READS_IN_FLIGHT = 4    # preadv calls at a time (several in flight reached 2-3x dd's single-stream rate here)


MADV_POPULATE_READ = 22      # Linux >= 5.14: map a file mapping's pages in, reading what the page cache lacks
MADV_POPULATE_WRITE = 23     # Linux >= 5.14: map pages in writable, contents left alone
POPULATE_PIECE = 4 << 20     # bytes per madvise call: each holds the mapping lock a writer (munmap) waits for


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A writable uint8 array of nbytes starting on a page boundary (numpy's own allocations may not)."""
    raw = np.empty(nbytes + PAGE, np.uint8)
    start = -raw.ctypes.data % PAGE
    return raw[start:start + nbytes]


def _yield_to_the_model() -> None:
    """Lowest CPU priority for the calling thread unless it is the main one (whose priority is the model's)."""
    if threading.current_thread() is not threading.main_thread():
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def populate(buffer: np.ndarray, advice: int = MADV_POPULATE_WRITE) -> bool:
    """Fault a page-aligned buffer's pages in now rather than when the first O_DIRECT read into each one pins
    it (the kernel then zeroes it on the reading thread). Reads may land in it meanwhile: the call never
    changes a page's contents. False where the kernel lacks MADV_POPULATE_WRITE (pages then fault on use).
    With MADV_POPULATE_READ, a read-only file mapping's pages are mapped in (populate_mapping)."""
    if sys.platform != "linux" or buffer.ctypes.data % PAGE:
        return False
    _yield_to_the_model()
    libc = ctypes.CDLL(None, use_errno=True)  # a ctypes call releases the GIL; mmap.madvise would hold it
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start, end = buffer.ctypes.data, buffer.ctypes.data + buffer.nbytes
    for address in range(start, end, POPULATE_PIECE):
        if libc.madvise(address, min(POPULATE_PIECE, end - address), advice) != 0:
            return False
    return True


def populate_mapping(mapping: mmap.mmap) -> bool:
    """Map a read-only file mapping's pages into the process now (reading what the page cache lacks), so
    kernels computing on it do not take a page fault per 64 KiB on first touch. False where the kernel
    lacks MADV_POPULATE_READ (pages then fault on use). The view held meanwhile keeps the mapping alive
    (a close then leaves the unmapping to the last view, as ExpertPool.close says)."""
    return populate(np.frombuffer(mapping, np.uint8), MADV_POPULATE_READ)


def in_background(function, *args) -> threading.Thread:
    """function(*args) on a daemon thread (populate, populate_mapping): the time between a load and the first
    message (a chat's typing, or the rest of the load) pays for the page faults instead of the first prompt."""
    thread = threading.Thread(target=function, args=args, daemon=True, name=function.__name__)
    thread.start()
    return thread


class PendingRead:
    """The reads of one `BlockReader.submit`, per extent in the order given."""

    def __init__(self, pieces: list[list[Future]]):
        self.pieces = pieces

    def wait(self, count: int | None = None) -> int:
        """Wait for the first `count` extents (all by default); their bytes. Raises a read's error."""
        return sum(piece.result() for extent in self.pieces[:count] for piece in extent)

    def done(self) -> bool:
        return all(piece.done() for extent in self.pieces for piece in extent)


class BlockReader:
    """Reads extents of the file open at fd with `in_flight` reads at a time (a thread pool of preadv)."""

    def __init__(self, fd: int, in_flight: int = READS_IN_FLIGHT, direct: bool = True, chunk_bytes: int = CHUNK_BYTES):
        if in_flight < 1 or chunk_bytes < PAGE or chunk_bytes % PAGE:
            raise ValueError("in_flight must be >= 1 and chunk_bytes a positive multiple of the page size")
        self.fd, self.chunk_bytes = fd, chunk_bytes
        self.name = _fd_name(fd)
        self.direct_fd = _open_direct(fd) if direct else None
        self.threads = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="block-read")
        self.direct_bytes = 0     # read with O_DIRECT
        self.buffered_bytes = 0   # read through the page cache
        self._lock = threading.Lock()

    def submit(self, extents: list[Extent] | list[tuple[int, int, int]], buffer: np.ndarray) -> PendingRead:
        """Start reading every extent into buffer; earlier extents' pieces are started first."""
        extents = [Extent(*e) if not isinstance(e, Extent) else e for e in extents]
        _check(extents, buffer)
        view = memoryview(buffer).cast("B")
        pieces = []
        for extent in extents:
            futures, done = [], 0
            while done < extent.nbytes:
                start = extent.offset + done
                size = min(extent.nbytes - done, self.chunk_bytes - start % self.chunk_bytes)
                target = view[extent.dest + done:extent.dest + done + size]
                futures.append(self.threads.submit(self._read_piece, start, target))
                done += size
            pieces.append(futures)
        return PendingRead(pieces)

    def read(self, extents: list[Extent] | list[tuple[int, int, int]], buffer: np.ndarray) -> int:
        """Read every extent into buffer and wait; the bytes read."""
        return self.submit(extents, buffer).wait()

    def _read_piece(self, file_offset: int, target: memoryview) -> int:
        done = 0
        address = np.frombuffer(target, np.uint8).ctypes.data if len(target) else 0
        if self.direct_fd is not None and (address - file_offset) % PAGE == 0:
            head = min(len(target), -file_offset % PAGE)
            body = (len(target) - head) // PAGE * PAGE
            if body:
                done = self._read(self.fd, target[:head], file_offset)
                done += self._read_direct(target[head:head + body], file_offset + head)
        return done + self._read(self.fd, target[done:], file_offset + done)

    def _read_direct(self, target: memoryview, file_offset: int) -> int:
        """Whole pages with O_DIRECT; stops early (the caller reads the rest buffered) at a short read or a refusal."""
        done = 0
        try:
            while done < len(target):
                got = os.preadv(self.direct_fd, [target[done:]], file_offset + done)
                done += got
                if got == 0 or got % PAGE:
                    break
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        with self._lock:
            self.direct_bytes += done
        return done

    def _read(self, fd: int, target: memoryview, file_offset: int) -> int:
        done = 0
        while done < len(target):
            got = os.preadv(fd, [target[done:]], file_offset + done)
            if got == 0:
                raise MixtralOffloadError(f"{self.name}: unexpected end of file at offset {file_offset + done} "
                                          f"({len(target) - done} more bytes wanted)")
            done += got
        with self._lock:
            self.buffered_bytes += done
        return done

    def close(self) -> None:
        """Finish the reads in flight and close the O_DIRECT descriptor (the caller's fd stays open)."""
        self.threads.shutdown(wait=True)
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None

    def __enter__(self) -> "BlockReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check(extents: list[Extent], buffer: np.ndarray) -> None:
    if not (isinstance(buffer, np.ndarray) and buffer.dtype == np.uint8 and buffer.flags.c_contiguous
            and buffer.flags.writeable):
        raise ValueError("buffer must be a writable C-contiguous uint8 array")
    end = 0
    for extent in sorted(extents, key=lambda e: e.dest):
        if extent.offset < 0 or extent.nbytes <= 0 or extent.dest < end:
            raise ValueError(f"bad or overlapping extent {extent}")
        end = extent.dest + extent.nbytes
        if end > buffer.nbytes:
            raise ValueError(f"extent {extent} ends past the buffer's {buffer.nbytes} bytes")


def _fd_name(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def _open_direct(fd: int) -> int | None:
    """A second descriptor of fd's file with O_DIRECT, or None where the file system refuses it."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None


def read_extents(source: BlockSource, key: Key, buffer: np.ndarray) -> int:
    """Read expert `key` into buffer once, outside a slot store (warm-up, tests); bytes read."""
    with BlockReader(source.fileno(), in_flight=1, direct=False) as reader:
        return reader.read(source.extents(key), buffer)
