"""Expert backends without a cache: every expert resident as torch tensors, or computed on the mapped pool."""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from ..cache.reader import in_background
from ..quant.kernels import ExpertKernel
from ..validate import require_size
from ..quant.linear import TensorLinear
from .model import ExpertGroup, Routing


class TorchExperts:
    """All experts resident as torch tensors: the float reference backend (HF checkpoints)."""

    stats = None
    decode_threads = None

    def __init__(self, w1: list[torch.Tensor], w3: list[torch.Tensor], w2: list[torch.Tensor]):
        # per layer and expert: w1, w3 [I, D], w2 [D, I]
        self.layers = [[tuple(TensorLinear(w[e]) for w in (a, b, c)) for e in range(a.shape[0])]
                       for a, b, c in zip(w1, w3, w2)]

    def run(self, layer: int, x: torch.Tensor, routing: Routing) -> Iterator[tuple[ExpertGroup, torch.Tensor]]:
        """Each group's expert in torch, in ascending expert order."""
        for group in routing.groups:
            w1, w3, w2 = self.layers[layer][group.expert]
            xs = x if len(group.rows) == x.shape[0] else x[torch.from_numpy(group.rows).to(x.device)]
            yield group, w2(F.silu(w1(xs)) * w3(xs))

    def hint(self, layer: int, probs: torch.Tensor) -> None:
        """Everything is resident: nothing to prefetch."""

    def set_profiler(self, profiler) -> None:
        """Nothing of its own to record: the model's spans cover it."""


class PoolExperts:
    """Every routed expert computed where it lies in a block source's mapping (no cache, no copies)."""

    stats = None
    decode_threads = None

    def __init__(self, source, kernel: ExpertKernel, release_pages: bool = False):
        self.source, self.kernel = source, kernel  # source: a cache.source.BlockSource
        self.file_bytes = os.fstat(source.fileno()).st_size  # checked before computing on the mapping
        self.release_pages = release_pages  # drop the mapped pages after use, so RSS stays flat
        self.views: dict[tuple[int, int], tuple] = {}  # (layer, expert) -> validated views on the mapping
        # every expert's pages mapped in on a low-priority thread, as llama.cpp's mmap does with MAP_POPULATE:
        # the first prompt then takes no page fault per 64 KiB of experts (BENCHMARKS.md, issue 18); not
        # when the file is larger than the memory available, where it would only read pages to evict them
        fits = self.file_bytes <= psutil.virtual_memory().available
        self.populating = in_background(source.populate_mapped) if fits and not release_pages else None

    def run(self, layer: int, x: torch.Tensor, routing: Routing) -> Iterator[tuple[ExpertGroup, torch.Tensor]]:
        """Each group's expert by the CPU kernel on the mapping, in ascending expert order."""
        require_size(self.source.fileno(), self.file_bytes, self.source.name)  # cut short: an error, not SIGBUS
        x32 = x.detach().float().numpy()                          # [T, D]
        for group in routing.groups:
            key = (layer, group.expert)
            if key not in self.views:
                self.views[key] = self.source.mapped(key)
            xs = x32 if len(group.rows) == len(x32) else np.ascontiguousarray(x32[group.rows])
            y = self.kernel(*self.views[key], xs)
            if self.release_pages:
                self.source.release(key)
            yield group, torch.from_numpy(y)

    def hint(self, layer: int, probs: torch.Tensor) -> None:
        """No prefetch here: the page cache and the expert cache (cache/) do that."""

    def set_profiler(self, profiler) -> None:
        """Nothing of its own to record: the model's spans cover it."""
