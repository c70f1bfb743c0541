"""Convert an HF Mixtral checkpoint into a model directory with a quantized expert pool.

Streams one tensor at a time (peak memory is one expert, not the model), writes into a hidden
temporary directory next to the output, fsyncs, and renames it into place at the end: an
interrupted conversion leaves nothing at the output path, and the next run removes its leftovers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import psutil
import torch
from tqdm import tqdm

from ...config import ModelArgs
from ...errors import MixtralOffloadError
from ...quant.format import QuantizedMatrix, QuantSpec
from ...quant.quantize import quantize
from ..tokenizer import Tokenizer
from .digests import file_digests
from .checkpoint import EXPERT_PARTS, Checkpoint, dense_shapes, expert_shapes, parse_dtype
from .gguf import GGUFModel, is_gguf
from ...cache.source import PAGE
from ..mapped_embedding import SAFETENSORS_DTYPES
from .pool import (CHECKED_FILES, CONFIG_NAME, COPIES, DENSE_NAME, FORMAT_VERSION, TOKENIZER_NAME,
                   BlockEntry, align, block_layout, manifest_dict, pack_header)

_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


# -- atomic output directory ----------------------------------------------------------------------
@contextmanager
def staging_dir(out_dir: str | Path) -> Iterator[Path]:
    """A fresh temporary directory beside out_dir, renamed to out_dir if the block succeeds, removed if not."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        raise MixtralOffloadError(f"{out_dir}: already exists; remove it or choose another output directory")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MixtralOffloadError(f"{out_dir.parent}: cannot create ({exc.strerror or exc})") from None
    remove_stale_staging(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        yield tmp
        _fsync_path(tmp)
        if out_dir.exists():
            raise MixtralOffloadError(f"{out_dir}: appeared while converting; the result is left out")
        os.rename(tmp, out_dir)
        _fsync_path(out_dir.parent)
    except OSError as exc:  # a read-only or full file system: nothing is left behind
        raise MixtralOffloadError(f"{out_dir}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_staging(out_dir: Path) -> None:
    """Remove temporary directories of earlier runs for out_dir whose process is gone."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or not psutil.pid_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- writers --------------------------------------------------------------------------------------
def write_dense(path: Path, args: ModelArgs, dtype: torch.dtype, tensors: Iterable[tuple[str, torch.Tensor]],
                on_tensor: Callable[[torch.Tensor], None] = lambda t: None) -> None:
    """Stream dense tensors (in checkpoint.dense_shapes order) into a safetensors file, one at a time."""
    shapes = dense_shapes(args)
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(np.prod(shape))
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        names = iter(shapes)
        for name, tensor in tensors:
            expected = next(names, None)
            if name != expected or tuple(tensor.shape) != tuple(shapes[name]):
                raise RuntimeError(f"dense tensor {name} {tuple(tensor.shape)} arrived where {expected} was due")
            on_tensor(tensor)
            stored = tensor.detach().to(dtype).contiguous()
            if not bool(torch.isfinite(stored).all()):
                overflow = bool(torch.isfinite(tensor).all())
                raise MixtralOffloadError(f"dense tensor {name} holds NaN or inf" + (
                    f" once stored as {dtype}: its values overflow it (choose --dense-dtype bfloat16 or float32)"
                    if overflow else ""))
            data = stored.view(torch.uint8).numpy()
            f.write(memoryview(data).cast("B"))
        if next(names, None) is not None:
            raise RuntimeError("dense tensor stream ended early")
        f.flush()
        os.fsync(f.fileno())


class PoolWriter:
    """Writes experts.pool block by block in (layer, expert) order; `finish` writes the header and returns the manifest."""

    def __init__(self, path: Path, args: ModelArgs, spec: QuantSpec):
        self.args, self.spec = args, spec
        self.shapes = expert_shapes(args)
        self.slots, self.block_nbytes = block_layout(spec, self.shapes)
        self.stride = align(self.block_nbytes, PAGE)
        self.buffer = np.zeros(self.stride, np.uint8)  # one block; padding between parts stays zero
        self.blocks: dict[tuple[int, int], BlockEntry] = {}
        self.file = open(path, "wb")
        self.file.write(b"\0" * PAGE)  # header placeholder, written by finish()

    @property
    def total_bytes(self) -> int:
        """The pool file's size once every block is written."""
        return PAGE + self.stride * self.args.num_hidden_layers * self.args.num_local_experts

    def part_views(self) -> dict[tuple[str, str], np.ndarray]:
        """(matrix, part) -> writable view of the block buffer, for writers that fill parts in place."""
        out = {}
        for slot in self.slots:
            raw = self.buffer[slot.offset:slot.offset + slot.nbytes]
            out[(slot.matrix, slot.name)] = raw.view(slot.dtype).reshape(slot.shape)
        return out

    def add(self, layer: int, expert: int, matrices: tuple[QuantizedMatrix, ...] | None = None) -> None:
        """Append one expert's block: from (w1, w3, w2), or from what part_views() were filled with."""
        if matrices is not None:
            views = self.part_views()
            for matrix, qm in zip(("w1", "w3", "w2"), matrices):
                for name, array in qm.parts().items():
                    views[(matrix, name)][...] = array
        offset = self.file.tell()
        self.file.write(memoryview(self.buffer))
        self.blocks[(layer, expert)] = BlockEntry(offset, self.block_nbytes,
                                                  zlib.crc32(memoryview(self.buffer)[:self.block_nbytes]))

    def finish(self, files: dict[str, dict]) -> bytes:
        """Write the header, fsync, close; return the manifest's bytes (to be written beside the pool).
        files: the checksums of the model's other files (digests.file_digests), written before the pool's end."""
        expected = self.args.num_hidden_layers * self.args.num_local_experts
        if len(self.blocks) != expected:
            raise RuntimeError(f"pool has {len(self.blocks)} blocks, expected {expected}")
        manifest = (json.dumps(manifest_dict(self.args, self.spec, self.blocks, files), indent=1) + "\n").encode()
        pool_bytes = self.file.tell()
        self.file.seek(0)
        self.file.write(pack_header(pool_bytes, manifest))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return manifest

    def close(self) -> None:
        self.file.close()


class PoolWriters:
    """One PoolWriter per expert copy (pool.COPIES): the full one, and with --miss-bits the low-bit one."""

    def __init__(self, out_dir: Path, args: ModelArgs, specs: dict[str, QuantSpec]):
        self.out_dir, self.specs, self.writers = out_dir, specs, {}
        try:
            for copy, spec in specs.items():
                self.writers[copy] = PoolWriter(out_dir / COPIES[copy][0], args, spec)
        except BaseException:
            self.close()
            raise

    @property
    def total_bytes(self) -> int:
        return sum(writer.total_bytes for writer in self.writers.values())

    def finish(self, files: dict[str, dict]) -> int:
        """Write each pool's header and its manifest beside it, both synced; the pools' bytes.
        files: the checksums of the model's other files (digests.file_digests)."""
        for copy, writer in self.writers.items():
            write_bytes_synced(self.out_dir / COPIES[copy][1], writer.finish(files))
        return sum((self.out_dir / COPIES[copy][0]).stat().st_size for copy in self.writers)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def copy_specs(spec: QuantSpec, miss_bits: int | None) -> dict[str, QuantSpec]:
    """The format of each expert copy a model directory will hold."""
    return {"full": spec} | ({"miss": QuantSpec(miss_bits, spec.group_size)} if miss_bits else {})


def write_bytes_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def model_config(args: ModelArgs, specs: dict[str, QuantSpec], dense_dtype: str, method: str, refine: bool) -> dict:
    """config.json of a converted model: the ModelArgs dict plus its quantization section (copy_specs)."""
    config = dataclasses.replace(args, torch_dtype=dense_dtype).to_dict()
    spec = specs["full"]
    config["quantization"] = {"format_version": FORMAT_VERSION, "bits": spec.bits, "group_size": spec.group_size,
                              "refine": refine, "method": method, "dense_dtype": dense_dtype}
    if "miss" in specs:
        config["quantization"]["miss"] = specs["miss"].to_dict()
    return config


def progress_bar(total: int, show: bool | None, desc: str) -> tqdm:
    """Bytes-done progress with rate and ETA; shown only on a terminal unless show says otherwise."""
    if show is None:
        show = sys.stderr.isatty()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not show,
                dynamic_ncols=True, file=sys.stderr)


# -- the converter --------------------------------------------------------------------------------
@dataclasses.dataclass
class ConvertResult:
    """What a conversion wrote."""

    path: Path
    input_bytes: int
    pool_bytes: int
    dense_bytes: int
    seconds: float


def convert(hf_dir: str | Path, out_dir: str | Path, *, bits: int = 4, group_size: int = 64,
            dense_dtype: str = "float16", refine: bool = True, miss_bits: int | None = None,
            progress: bool | None = None) -> ConvertResult:
    """Convert an HF Mixtral checkpoint directory, or a GGUF file, into a pool model directory at out_dir.

    A GGUF's blocks are dequantized by gguf.quants, then quantized by this runtime's quantizer. miss_bits:
    also a low-bit copy of every expert (pool.COPIES["miss"]).
    """
    import time

    start = time.perf_counter()
    specs = copy_specs(QuantSpec(bits, group_size), miss_bits)
    dense_torch = parse_dtype(dense_dtype)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise MixtralOffloadError(f"{out_dir}: already exists; remove it or choose another output directory")
    checkpoint = GGUFModel.open(hf_dir) if is_gguf(Path(hf_dir)) else Checkpoint.open(hf_dir)
    args = checkpoint.args
    for shape in expert_shapes(args).values():
        specs["full"].check_shape(shape)
    input_itemsize = 4 if args.torch_dtype == "float32" else 2
    dense_input = input_itemsize * sum(int(np.prod(s)) for s in dense_shapes(args).values())
    total = dense_input + checkpoint.expert_bytes()
    if not isinstance(checkpoint, GGUFModel):  # a GGUF's tokenizer was checked against its vocab at open
        check_tokenizer(checkpoint.tokenizer_path, args)
    with staging_dir(out_dir) as tmp, progress_bar(total, progress, "convert") as bar:
        write_dense(tmp / DENSE_NAME, args, dense_torch, checkpoint.dense_tensors(),
                    on_tensor=lambda t: bar.update(t.nbytes))
        tokenizer = checkpoint.tokenizer_model() if isinstance(checkpoint, GGUFModel) else checkpoint.tokenizer_path
        write_model_files(tmp, model_config(args, specs, dense_dtype, "rtn+als" if refine else "rtn", refine), tokenizer)
        writers = PoolWriters(tmp, args, specs)
        try:
            for layer in range(args.num_hidden_layers):
                for expert in range(args.num_local_experts):
                    matrices = {copy: [] for copy in specs}
                    for part in EXPERT_PARTS:
                        weight = checkpoint.expert_tensor(layer, expert, part)
                        for copy, spec in specs.items():
                            matrices[copy].append(quantize(weight, spec, refine=refine))
                        bar.update(weight.nbytes)
                        del weight
                    for copy, writer in writers.writers.items():
                        writer.add(layer, expert, tuple(matrices[copy]))
            pool_bytes = writers.finish(file_digests(tmp, CHECKED_FILES))
        finally:
            writers.close()
        dense_bytes = (tmp / DENSE_NAME).stat().st_size
    return ConvertResult(out_dir, total, pool_bytes, dense_bytes, time.perf_counter() - start)


def check_tokenizer(path: Path, args: ModelArgs) -> None:
    """A converted model needs a sentencepiece tokenizer.model with no more pieces than vocab_size."""
    if not path.exists():
        raise MixtralOffloadError(f"{path}: missing; a converted model needs the checkpoint's tokenizer.model")
    pieces = Tokenizer(path).vocab_size
    if pieces > args.vocab_size:
        raise MixtralOffloadError(f"{path}: {pieces} pieces, more than the model's vocab_size {args.vocab_size}")


def write_model_files(tmp: Path, config: dict, tokenizer: Path | bytes | None) -> None:
    """config.json and (when given) tokenizer.model (a file to copy, or a model's bytes), synced, before
    the pool's manifest sums them."""
    write_bytes_synced(tmp / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    if isinstance(tokenizer, bytes):
        write_bytes_synced(tmp / TOKENIZER_NAME, tokenizer)
    elif tokenizer is not None:
        shutil.copyfile(tokenizer, tmp / TOKENIZER_NAME)
        fsync_file(tmp / TOKENIZER_NAME)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
