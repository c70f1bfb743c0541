"""What the cache needs of storage: where an expert's bytes lie and how to read a buffer holding one.

The cache knows no file format. A pool (offload/store/pool.py) or a GGUF file implements BlockSource;
the cache reads an expert's extents into a slot with preadv and hands the views to a kernel.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np

Key = tuple[int, int]  # (layer, expert)
PAGE = 4096            # slots, staging buffers and pool blocks are page-aligned
MATRICES = ("w1", "w3", "w2")  # an expert's matrices, in the order every source and kernel takes them


class Extent(NamedTuple):
    """One contiguous range of the source's file and where it goes in a slot buffer."""

    offset: int        # in the file
    nbytes: int
    dest: int          # in the slot buffer


class BlockSource(Protocol):
    """Experts stored as blocks of one file; a block read into a buffer is one expert's w1, w3, w2."""

    name: str           # the file, for messages
    block_nbytes: int   # bytes of one expert read into a buffer
    spec: object        # the matrices' format (quant.format.QuantSpec), for device slots
    shapes: dict        # 'w1', 'w3', 'w2' -> (rows, cols)

    def fileno(self) -> int:
        """The open file the extents refer to."""
        ...

    def extents(self, key: Key) -> list[Extent]:
        """The ranges holding expert `key`, validated inside the file; the first needed first."""
        ...

    def views(self, buffer: np.ndarray, key: Key) -> tuple:
        """(w1, w3, w2) of expert `key` as kernel inputs on a uint8 buffer filled from its extents."""
        ...

    def tensor_parts(self, buffer) -> tuple:
        """(w1, w3, w2) parts as typed views on a torch uint8 buffer (any device) holding one block."""
        ...

    def mapped(self, key: Key) -> tuple:
        """(w1, w3, w2) as read-only views on the file mapping (an expert computed where it lies)."""
        ...

    def release(self, key: Key) -> None:
        """Drop expert `key`'s mapped pages from the process (RSS)."""
        ...

    def populate_mapped(self) -> bool:
        """Map every expert's pages of the file mapping in now (reader.populate_mapping); False if not done."""
        ...


def page_rounded(nbytes: int) -> int:
    """nbytes rounded up to whole pages: the size of a slot or a staging buffer."""
    return -(-nbytes // PAGE) * PAGE
