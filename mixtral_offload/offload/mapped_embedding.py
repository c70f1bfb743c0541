"""The token embedding table read from dense.safetensors' mapping, a few rows at a time.

A converted model computed on the CPU gathers the rows of each forward pass's tokens from the
file mapping, then gives the mapped pages back (madvise DONTNEED: they stay in the page cache and
leave this process's RSS). The table, 262 MB for Mixtral-8x7B in float16 and needed a few rows
per token, so never counts against --memory-budget.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from pathlib import Path

import torch

from ..errors import MixtralOffloadError
from ..validate import require_size

SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
# Linux maps up to this much around a faulting address when the pages are in the page cache
# (/proc/sys/vm/fault_around_bytes, 64 KiB by default): what one row's lookup may add to RSS until released
FAULT_AROUND_BYTES = 64 << 10


class MappedEmbedding:
    """Rows [V, D] of one safetensors tensor, looked up from the file mapping in `dtype`."""

    def __init__(self, file: Path, name: str, shape: tuple[int, int], dtype: torch.dtype):
        self.file, self.shape, self.dtype = Path(file), tuple(shape), dtype
        stored, start, end = _locate(self.file, name, self.shape)
        # map the table's pages only: the kernel's fault-around then cannot map other tensors' pages
        first_page = start // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        self.handle = open(self.file, "rb")  # kept open: its size is checked before each lookup
        self.end = end
        self.mapping = mmap.mmap(self.handle.fileno(), end - first_page, access=mmap.ACCESS_READ, offset=first_page)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")  # read-only mapping; never written
            self.table = torch.frombuffer(self.mapping, dtype=stored, count=shape[0] * shape[1],
                                          offset=start - first_page).view(shape)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """The rows of `tokens` [T] as [T, D] in dtype; the table's mapped pages are released after."""
        require_size(self.handle.fileno(), self.end, str(self.file))  # reading past the end would be SIGBUS
        rows = self.table[tokens.to(torch.long)].to(self.dtype)
        self.mapping.madvise(mmap.MADV_DONTNEED)
        return rows

def _locate(file: Path, name: str, shape: tuple[int, int]) -> tuple[torch.dtype, int, int]:
    """(stored dtype, first byte, end byte) of tensor `name` in a safetensors file, every field checked."""
    size = os.path.getsize(file)
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise MixtralOffloadError(f"{file}: truncated safetensors header")
        header_bytes = struct.unpack("<Q", prefix)[0]
        if header_bytes > size - 8:
            raise MixtralOffloadError(f"{file}: safetensors header of {header_bytes} bytes runs past the file")
        try:
            entry = json.loads(handle.read(header_bytes))[name]
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = (int(offset) for offset in entry["data_offsets"])
            stored_shape = tuple(int(n) for n in entry["shape"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MixtralOffloadError(f"{file}: no readable {name!r} entry in the safetensors header ({exc})") from None
    if stored_shape != tuple(shape):
        raise MixtralOffloadError(f"{file}: tensor {name} has shape {stored_shape}, expected {tuple(shape)}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    start, stop = 8 + header_bytes + begin, 8 + header_bytes + end
    if begin < 0 or end - begin != shape[0] * shape[1] * itemsize or stop > size:
        raise MixtralOffloadError(f"{file}: tensor {name}'s offsets {begin}..{end} do not fit its shape or the file")
    return dtype, start, stop
