"""A GGUF file's experts as the cache's BlockSource: three extents per expert (w1, w3, w2), one slot.

The experts stay in the file: a miss reads the three byte ranges of one expert into a slot, each at a
cache-line-aligned place; a run without a cache computes them on the file's read-only mapping.
"""
from __future__ import annotations

import mmap
import os

import numpy as np

from ...cache.reader import populate_mapping
from ...cache.source import MATRICES, PAGE, Extent, Key
from ...errors import MixtralOffloadError
from ...quant.gguf_blocks import GGUFMatrix
from ...validate import require_size
from .checkpoint import expert_shapes
from .gguf import GGUFModel


class GGUFExperts:
    """The experts of a validated GGUFModel (extents checked inside the file at open)."""

    spec = None  # no pool QuantSpec: device slots cannot dequantize GGUF blocks

    def __init__(self, model: GGUFModel):
        self.model, self.name = model, str(model.path)
        self.args, self.shapes = model.args, expert_shapes(model.args)
        self.block_nbytes = max(self._layout(key)[-1] for key in self._keys())
        self._fd = os.open(model.path, os.O_RDONLY)
        self.file_bytes = os.fstat(self._fd).st_size
        self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        self._bytes = np.frombuffer(self._map, np.uint8)

    def _keys(self):
        return {(layer, expert) for layer, expert, _ in self.model.experts}

    def _matrices(self, key: Key):
        try:
            return [self.model.experts[(*key, part)] for part in MATRICES]
        except KeyError:
            raise IndexError(f"no expert {key} in {self.name}") from None

    def _layout(self, key: Key) -> list[int]:
        """Where w1, w3, w2 of `key` start in a slot, and the slot bytes they need (last). Each starts at
        its file offset modulo the page, as on the mapping: the slot is page-aligned, so the reader's
        O_DIRECT body of each matrix lands on page-aligned addresses instead of falling back to buffered reads."""
        starts, end = [], 0
        for extent in self._matrices(key):
            starts.append(end + (extent.offset - end) % PAGE)
            end = starts[-1] + extent.nbytes
        return starts + [end]

    def fileno(self) -> int:
        """The GGUF file's descriptor."""
        return self._fd

    def extents(self, key: Key) -> list[Extent]:
        """w1, w3, w2 of expert `key`: three ranges of the file, in the order the kernel needs them."""
        return [Extent(e.offset, e.nbytes, start) for e, start in zip(self._matrices(key), self._layout(key))]

    def views(self, buffer: np.ndarray, key: Key) -> tuple[GGUFMatrix, GGUFMatrix, GGUFMatrix]:
        """w1, w3, w2 of `key` on a slot buffer filled from its extents."""
        return tuple(GGUFMatrix(e.qtype, e.shape, buffer[start:start + e.nbytes])
                     for e, start in zip(self._matrices(key), self._layout(key)))

    def mapped(self, key: Key) -> tuple[GGUFMatrix, GGUFMatrix, GGUFMatrix]:
        """w1, w3, w2 of `key` as read-only views on the file mapping (refused once the file was cut short)."""
        require_size(self._fd, self.file_bytes, self.name)
        return tuple(GGUFMatrix(e.qtype, e.shape, self._bytes[e.offset:e.offset + e.nbytes])
                     for e in self._matrices(key))

    def populate_mapped(self) -> bool:
        """Map the whole file mapping's pages in now, reading what the page cache lacks."""
        return populate_mapping(self._map)

    def release(self, key: Key) -> None:
        """Drop the mapped pages of `key`'s matrices from the process (RSS)."""
        for extent in self._matrices(key):
            start = extent.offset // PAGE * PAGE
            self._map.madvise(mmap.MADV_DONTNEED, start, extent.offset + extent.nbytes - start)

    def tensor_parts(self, buffer) -> tuple:
        """Device slots hold pool blocks only."""
        raise MixtralOffloadError(f"{self.name}: GGUF experts run on the CPU; for --device cuda convert the "
                                  "file first (mixtral-offload convert MODEL.gguf OUT_DIR)")
