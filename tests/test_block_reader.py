"""BlockReader: the bytes of every extent land where asked, direct or buffered, and a short file is named."""
import ctypes
import errno
import os
import sys
import threading

import numpy as np
import pytest

from mixtral_offload.cache import reader as reader_module
from mixtral_offload.cache.reader import BlockReader, aligned_buffer, in_background, populate
from mixtral_offload.cache.source import PAGE, Extent
from mixtral_offload.errors import MixtralOffloadError

FILE_BYTES = 5 * PAGE * 8 + 123  # not a whole number of pages


@pytest.fixture
def data_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, FILE_BYTES, dtype=np.uint8)
    path = tmp_path / "blocks.bin"
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


def expected(data: np.ndarray, extents: list[tuple[int, int, int]], size: int) -> np.ndarray:
    out = np.zeros(size, np.uint8)
    for file_offset, nbytes, buffer_offset in extents:
        out[buffer_offset:buffer_offset + nbytes] = data[file_offset:file_offset + nbytes]
    return out


ALIGNED = [(0, 8 * PAGE, 0), (8 * PAGE, 16 * PAGE, 8 * PAGE), (32 * PAGE, 4 * PAGE, 24 * PAGE)]
# a head and tail around whole pages (offsets congruent mod PAGE), then pieces that cannot be aligned
UNALIGNED = [(PAGE + 100, 6 * PAGE + 7, 100), (3, 2 * PAGE, 7 * PAGE + 50), (FILE_BYTES - 500, 500, 10 * PAGE)]


@pytest.mark.parametrize("extents", [ALIGNED, UNALIGNED], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("in_flight", [1, 3])
def test_bytes_land_where_asked(data_file, extents, in_flight):
    fd, data = data_file
    size = 29 * PAGE
    buffer = aligned_buffer(size)
    buffer[:] = 0
    with BlockReader(fd, in_flight=in_flight, chunk_bytes=2 * PAGE) as reader:
        got = reader.read(extents, buffer)
        assert got == sum(e[1] for e in extents)
        assert reader.direct_bytes + reader.buffered_bytes == got
    np.testing.assert_array_equal(buffer, expected(data, extents, size))


def test_aligned_extents_go_direct_where_the_file_system_allows(data_file):
    fd, data = data_file
    buffer = aligned_buffer(28 * PAGE)
    with BlockReader(fd) as reader:
        reader.read(ALIGNED, buffer)
        if reader.direct_fd is None:
            pytest.skip("this file system refuses O_DIRECT")
        assert reader.direct_bytes == sum(e[1] for e in ALIGNED) and reader.buffered_bytes == 0


def test_unaligned_buffer_falls_back_to_buffered_reads(data_file):
    fd, data = data_file
    buffer = aligned_buffer(8 * PAGE + 1)[1:]  # every address one byte past a page boundary
    with BlockReader(fd) as reader:
        reader.read([(0, 8 * PAGE, 0)], buffer)
        assert reader.direct_bytes == 0 and reader.buffered_bytes == 8 * PAGE
    np.testing.assert_array_equal(buffer, data[:8 * PAGE])


def test_a_refused_direct_read_is_read_buffered(data_file, monkeypatch):
    fd, data = data_file
    real = os.preadv

    def refuse_direct(target_fd, buffers, offset):
        if target_fd not in (fd,):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(target_fd, buffers, offset)

    monkeypatch.setattr(reader_module.os, "preadv", refuse_direct)
    buffer = aligned_buffer(28 * PAGE)
    with BlockReader(fd) as reader:
        reader.read(ALIGNED, buffer)
        assert reader.direct_bytes == 0
    np.testing.assert_array_equal(buffer, expected(data, ALIGNED, 28 * PAGE))


def test_without_direct_every_read_is_buffered(data_file):
    fd, data = data_file
    buffer = aligned_buffer(28 * PAGE)
    with BlockReader(fd, direct=False) as reader:
        assert reader.read(ALIGNED, buffer) == reader.buffered_bytes
        assert reader.direct_fd is None
    np.testing.assert_array_equal(buffer, expected(data, ALIGNED, 28 * PAGE))


def test_first_extents_can_be_waited_for_alone(data_file):
    fd, data = data_file
    buffer = aligned_buffer(28 * PAGE)
    with BlockReader(fd, in_flight=2, chunk_bytes=PAGE) as reader:
        pending = reader.submit([Extent(*e) for e in ALIGNED], buffer)
        assert pending.wait(1) == ALIGNED[0][1]
        np.testing.assert_array_equal(buffer[:8 * PAGE], data[:8 * PAGE])
        pending.wait()
        assert pending.done()


@pytest.mark.parametrize("extent", [(36 * PAGE, 8 * PAGE, 0), (FILE_BYTES - PAGE, 2 * PAGE, 0),
                                    (FILE_BYTES + PAGE, PAGE, 0)],
                         ids=["direct read runs past the end", "buffered read runs past", "starts past the end"])
def test_a_short_file_names_the_offset(data_file, extent):
    fd, _ = data_file
    with BlockReader(fd) as reader, pytest.raises(MixtralOffloadError, match=r"blocks\.bin: unexpected end of file "
                                                                              r"at offset \d+"):
        reader.read([extent], aligned_buffer(8 * PAGE))


@pytest.mark.parametrize("extent", [(0, PAGE, PAGE), (0, 0, 0), (-1, 10, 0)])
def test_extents_outside_the_buffer_are_refused_before_any_read(data_file, extent):
    fd, _ = data_file
    with BlockReader(fd) as reader, pytest.raises(ValueError):
        reader.read([extent], aligned_buffer(PAGE))


def test_overlapping_extents_are_refused(data_file):
    fd, _ = data_file
    with BlockReader(fd) as reader, pytest.raises(ValueError, match="overlapping"):
        reader.read([(0, PAGE, 0), (PAGE, PAGE, PAGE - 1)], aligned_buffer(2 * PAGE))


def resident_bytes(buffer: np.ndarray) -> int:
    """Bytes of buffer's pages in memory (mincore): unlike the process's RSS, untouched by other threads."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = np.zeros(-(-buffer.nbytes // PAGE), np.uint8)
    assert libc.mincore(buffer.ctypes.data, buffer.nbytes, pages.ctypes.data) == 0, os.strerror(ctypes.get_errno())
    return int((pages & 1).sum()) * PAGE


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux's")
def test_populate_faults_pages_in_and_keeps_their_contents():
    buffer = aligned_buffer(64 << 20)
    buffer[:PAGE] = 7                     # a read that landed before the populate
    assert resident_bytes(buffer) == PAGE
    if not populate(buffer):
        pytest.skip("this kernel has no MADV_POPULATE_WRITE")
    assert resident_bytes(buffer) == 64 << 20
    assert (buffer[:PAGE] == 7).all() and not buffer[PAGE:].any()


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux's")
def test_populate_in_background_finishes_on_its_own_thread():
    buffer = aligned_buffer(16 << 20)
    thread = in_background(populate, buffer)
    thread.join(timeout=60)
    assert not thread.is_alive() and thread is not threading.main_thread()
    if resident_bytes(buffer) < 16 << 20:
        assert not populate(buffer), "the thread did not populate a buffer this kernel can populate"
