"""Synthetic model directories: random quantized experts written straight into a pool, at any geometry.

No float source is made: codes are random bits, scales are set so the dequantized weights have a
chosen standard deviation. One expert block is generated at a time, so full Mixtral-8x7B (~24 GB
at int4) is written with ~100 MB of memory, as fast as the disk takes it.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ...config import ModelArgs
from ...quant.format import QuantSpec
from .checkpoint import dense_shapes, parse_dtype
from .convert import (PoolWriters, check_tokenizer, copy_specs, model_config, progress_bar, staging_dir,
                      write_dense, write_model_files)
from .digests import file_digests
from .pool import CHECKED_FILES, DENSE_NAME

WEIGHT_STD = 0.02  # std of the random weights (dense and dequantized experts), as in HF's initializer


@dataclasses.dataclass
class SynthResult:
    """What write_synthetic wrote."""

    path: Path
    pool_bytes: int
    dense_bytes: int
    seconds: float


def write_synthetic(out_dir: str | Path, args: ModelArgs, *, bits: int = 4, group_size: int = 64,
                    dense_dtype: str = "float16", tokenizer: str | Path | None = None, seed: int = 0,
                    miss_bits: int | None = None, progress: bool | None = None) -> SynthResult:
    """Write a converted-format model directory of random weights with args' geometry (miss_bits: and a
    low-bit copy of every expert, random too)."""
    start = time.perf_counter()
    specs = copy_specs(QuantSpec(bits, group_size), miss_bits)
    dense_torch = parse_dtype(dense_dtype)
    rng = np.random.Generator(np.random.SFC64(seed))
    if tokenizer is not None:
        check_tokenizer(Path(tokenizer), args)
    with staging_dir(out_dir) as tmp:
        write_model_files(tmp, model_config(args, specs, dense_dtype, "synthetic", False), tokenizer)
        writers = PoolWriters(tmp, args, specs)
        dense_bytes = torch.empty((), dtype=dense_torch).element_size() * sum(
            int(np.prod(s)) for s in dense_shapes(args).values())
        try:
            with progress_bar(writers.total_bytes + dense_bytes, progress, "synth") as bar:
                write_dense(tmp / DENSE_NAME, args, dense_torch, _random_dense(args, dense_torch, seed),
                            on_tensor=lambda t: bar.update(t.numel() * dense_torch.itemsize))
                views = {copy: writer.part_views() for copy, writer in writers.writers.items()}
                for layer in range(args.num_hidden_layers):
                    for expert in range(args.num_local_experts):
                        for copy, writer in writers.writers.items():
                            _fill_random_block(views[copy], specs[copy], rng)
                            writer.add(layer, expert)
                            bar.update(writer.stride)
            pool_bytes = writers.finish(file_digests(tmp, CHECKED_FILES))
        finally:
            writers.close()
    return SynthResult(Path(out_dir), pool_bytes, dense_bytes, time.perf_counter() - start)


def _fill_random_block(views: dict[tuple[str, str], np.ndarray], spec: QuantSpec, rng: np.random.Generator) -> None:
    """Random codes, and scales (zeros) giving dequantized weights of std ~WEIGHT_STD."""
    for (matrix, name), view in views.items():
        if name == "codes":
            raw = rng.bit_generator.random_raw(-(-view.nbytes // 8)).view(np.uint8)[:view.nbytes]
            flat = view.reshape(-1).view(np.uint8)
            flat[...] = raw
            if spec.bits == 8:  # symmetric int8 codes lie in -127..127
                np.maximum(view, -127, out=view)
        elif name == "scales":  # random bits: codes uniform over 2^bits levels (int8: 255 levels)
            levels = 255 if spec.bits == 8 else 2**spec.bits
            code_std = np.sqrt((levels**2 - 1) / 12)
            jitter = rng.uniform(0.8, 1.2, size=view.shape)
            view[...] = (WEIGHT_STD / code_std * jitter).astype(np.float16)
        else:  # zeros: the middle of 0..2^bits - 1, a little off the integers
            middle = (2**spec.bits - 1) / 2
            view[...] = rng.uniform(middle - 0.5, middle + 0.5, size=view.shape).astype(np.float16)


def _random_dense(args: ModelArgs, dtype: torch.dtype, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Dense tensors in dtype, generated in row chunks so no float32 copy of a whole embedding exists."""
    generator = torch.Generator().manual_seed(seed)
    for name, shape in dense_shapes(args).items():
        if len(shape) == 1:  # RMSNorm weights
            yield name, torch.ones(shape, dtype=dtype)
            continue
        tensor = torch.empty(shape, dtype=dtype)
        rows = max(1, (1 << 22) // shape[1])
        for r0 in range(0, shape[0], rows):
            chunk = tensor[r0:r0 + rows]
            chunk.copy_(torch.randn(chunk.shape, generator=generator).mul_(WEIGHT_STD))
        yield name, tensor
