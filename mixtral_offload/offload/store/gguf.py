"""A llama.cpp Mixtral GGUF as a model source: validated on open, dense tensors, expert byte extents.

Everything is checked before any view is handed out: the header (through the gguf package's reader),
every tensor's type, extent and alignment, and every shape against the metadata. The experts stay in
the file: per (layer, expert, matrix) the reader gives the byte range that holds it.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from ...config import ModelArgs, format_size
from ...errors import MixtralOffloadError
from ...quant.gguf_blocks import BLOCK_TYPES, GGUFMatrix
from ...quant.gguf_kernels import gguf_dequantize
from ..tokenizer import Tokenizer
from .checkpoint import EXPERT_PARTS, dense_shapes, expert_shapes
from .gguf_header import Metadata, model_args, open_reader
from .gguf_tokenizer import sentencepiece_model

# Runtime dense names (checkpoint.py's) -> GGUF tensor names.
_DENSE_NAMES = {
    "embed": "token_embd.weight",
    "norm": "output_norm.weight",
    "lm_head": "output.weight",
    "attn_norm": "blk.{layer}.attn_norm.weight",
    "moe_norm": "blk.{layer}.ffn_norm.weight",
    "wq": "blk.{layer}.attn_q.weight",
    "wk": "blk.{layer}.attn_k.weight",
    "wv": "blk.{layer}.attn_v.weight",
    "wo": "blk.{layer}.attn_output.weight",
    "gate": "blk.{layer}.ffn_gate_inp.weight",
}
# HF expert matrix -> llama.cpp's name for it (SwiGLU: w2(silu(w1 x) * w3 x)).
_EXPERT_NAMES = {"w1": "gate", "w3": "up", "w2": "down"}
MERGED_EXPERTS = "blk.{layer}.ffn_{part}_exps.weight"       # [E, rows, cols], all experts of a layer
PER_EXPERT = "blk.{layer}.ffn_{part}.{expert}.weight"       # [rows, cols], older files
DEQUANTIZE_CHUNK = 4 << 20   # values dequantized at a time (16 MB of float32)


def gguf_dense_name(name: str) -> str:
    """The GGUF tensor name of a runtime dense tensor name (e.g. 'layers.3.wq' -> 'blk.3.attn_q.weight')."""
    match = re.fullmatch(r"layers\.(\d+)\.(\w+)", name)
    if match:
        return _DENSE_NAMES[match.group(2)].format(layer=match.group(1))
    return _DENSE_NAMES[name]


def deinterleave_rope(weight, heads: int):
    """GGUF q/k rows (per head: rotation pairs interleaved) -> HF rows (per head: first halves, second halves).

    weight is a numpy array or a torch tensor, [rows, ...]; the result is a contiguous copy.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class Extent:
    """Where one matrix lies in the file: its GGML type, [rows, cols] (numpy order: [out, in]) and bytes."""

    qtype: QType
    shape: tuple[int, int]
    offset: int   # from the start of the file
    nbytes: int


@dataclass
class GGUFModel:
    """A validated Mixtral GGUF: ModelArgs, dense tensors on request, and the extent of every expert matrix."""

    path: Path
    args: ModelArgs
    reader: gguf.GGUFReader            # holds the file's read-only mapping
    tensors: dict[str, gguf.ReaderTensor]
    experts: dict[tuple[int, int, str], Extent]   # (layer, expert, 'w1' | 'w3' | 'w2') -> extent
    layout: str                        # 'merged' (ffn_*_exps) or 'per-expert' (ffn_*.E)

    @classmethod
    def open(cls, path: str | Path) -> "GGUFModel":
        """Open and validate a GGUF file; any problem is one MixtralOffloadError naming the file."""
        path = Path(path)
        reader = open_reader(path)
        tensors = {tensor.name: tensor for tensor in reader.tensors}
        _check_extents(path, reader)
        meta = Metadata(reader, path)
        parts = meta.integer("split.count", 0, 1 << 16, default=1)
        if parts > 1:
            raise meta.fail("split.count", f"is {parts}: one part of a split GGUF; join the parts first "
                                           "(llama-gguf-split --merge)")
        vocab_size = len(meta.strings("tokenizer.ggml.tokens"))
        if "token_embd.weight" not in tensors:
            raise MixtralOffloadError(f"{path}: tensor token_embd.weight is missing")
        args = model_args(meta, vocab_size, tensors["token_embd.weight"].tensor_type,
                          tied="output.weight" not in tensors)
        for name, shape in dense_shapes(args).items():
            _check_shape(path, tensors, gguf_dense_name(name), shape)
        layout = "merged" if MERGED_EXPERTS.format(layer=0, part="gate") in tensors else "per-expert"
        experts = {}
        for layer in range(args.num_hidden_layers):
            experts.update(_expert_extents(path, tensors, args, layer, layout))
        return cls(path, args, reader, tensors, experts, layout)

    def dense_tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One dense tensor by runtime name, dequantized; q and k rows in HF's RoPE order.

        The bytes are read with pread, not through the mapping, so the file's pages never count in RSS;
        they are dequantized in chunks of rows straight into a tensor of the asked dtype: the types the
        kernels know by their decoders (gguf_kernels.gguf_dequantize), others by gguf.quants; both give
        the same floats.
        """
        tensor = self.tensors[gguf_dense_name(name)]
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        blocks = self._read(tensor).reshape(-1, gguf.quant_shape_to_byte_shape(shape, tensor.tensor_type)[-1])
        result = torch.empty(shape, dtype=dtype)
        rows = result.view(-1, shape[-1])
        step = max(1, DEQUANTIZE_CHUNK // shape[-1])
        for start in range(0, len(blocks), step):
            chunk = blocks[start:start + step]
            if tensor.tensor_type in BLOCK_TYPES:
                floats = gguf_dequantize(GGUFMatrix(tensor.tensor_type, (len(chunk), shape[-1]), chunk))
            else:
                floats = gguf.quants.dequantize(chunk, tensor.tensor_type)
            rows[start:start + step] = torch.from_numpy(floats)
        if name.endswith(".wq"):
            return deinterleave_rope(result, self.args.num_attention_heads)
        if name.endswith(".wk"):
            return deinterleave_rope(result, self.args.num_key_value_heads)
        return result

    def _read(self, tensor: gguf.ReaderTensor) -> np.ndarray:
        return self._read_range(tensor.data_offset, tensor.n_bytes, f"tensor {tensor.name}")

    def _read_range(self, offset: int, nbytes: int, what: str) -> np.ndarray:
        raw = np.empty(nbytes, np.uint8)
        with open(self.path, "rb") as file:
            done = 0
            while done < nbytes:
                got = os.preadv(file.fileno(), [memoryview(raw)[done:]], offset + done)
                if got == 0:
                    raise MixtralOffloadError(f"{self.path}: file shrank while reading {what}")
                done += got
        return raw

    def dense_tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Every dense tensor, one at a time, as (runtime name, tensor)."""
        for name in dense_shapes(self.args):
            yield name, self.dense_tensor(name, dtype)

    def expert_views(self, layer: int, expert: int) -> dict[str, tuple[QType, tuple[int, int], np.ndarray]]:
        """'w1', 'w3', 'w2' -> (GGML type, [rows, cols], read-only uint8 view of its bytes on the mapping)."""
        views = {}
        for part in EXPERT_PARTS:
            extent = self.experts[(layer, expert, part)]
            views[part] = (extent.qtype, extent.shape, self.reader.data[extent.offset:extent.offset + extent.nbytes])
        return views

    def expert_tensor(self, layer: int, expert: int, part: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One expert matrix ('w1', 'w3' or 'w2') dequantized by gguf.quants, [out, in], float32 or dtype."""
        extent = self.experts[(layer, expert, part)]
        raw = self._read_range(extent.offset, extent.nbytes, f"expert ({layer}, {expert}) {part}")
        weight = torch.from_numpy(gguf.quants.dequantize(raw.reshape(extent.shape[0], -1), extent.qtype))
        return weight if dtype is None else weight.to(dtype)

    def expert_bytes(self) -> int:
        """Bytes of all expert matrices as the file stores them."""
        return sum(extent.nbytes for extent in self.experts.values())

    def tokenizer_model(self) -> bytes:
        """The serialized sentencepiece model rebuilt from the file's tokenizer metadata."""
        return sentencepiece_model(Metadata(self.reader, self.path))

    def float_dtype(self) -> str:
        """The compute dtype 'auto' means for this file: the embedding table's, when it is a float type."""
        stored = self.tensors["token_embd.weight"].tensor_type
        return {QType.F32: "float32", QType.BF16: "bfloat16"}.get(stored, "float16")

    def tokenizer(self) -> Tokenizer:
        """The sentencepiece tokenizer rebuilt from the file's tokenizer.ggml.* metadata."""
        return Tokenizer.from_model_bytes(self.tokenizer_model(), str(self.path))


def _check_extents(path: Path, reader: gguf.GGUFReader) -> None:
    """Every tensor's bytes aligned, inside the file, of the size its shape and type give, none overlapping."""
    file_bytes = len(reader.data)
    spans = []
    for tensor in reader.tensors:
        block, type_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        dims = [int(d) for d in tensor.shape]   # ggml order: dims[0] is a row's length
        if min(dims) < 1 or dims[0] % block:
            raise MixtralOffloadError(f"{path}: tensor {tensor.name} has shape {dims[::-1]}: not rows of "
                                      f"whole {tensor.tensor_type.name} blocks of {block}")
        nbytes = math.prod(dims) // block * type_bytes
        start = int(tensor.data_offset)
        if (start - reader.data_offset) % reader.alignment:
            raise MixtralOffloadError(f"{path}: tensor {tensor.name} starts at byte {start}, "
                                      f"not aligned to {reader.alignment}")
        if nbytes != tensor.n_bytes or start + nbytes > file_bytes:
            raise MixtralOffloadError(f"{path}: tensor {tensor.name} ({nbytes} bytes at byte {start}) "
                                      f"does not fit in the file ({file_bytes} bytes)")
        spans.append((start, start + nbytes, tensor.name))
    spans.sort()
    for (_, end, name), (start, _, next_name) in zip(spans, spans[1:]):
        if start < end:
            raise MixtralOffloadError(f"{path}: tensors {name} and {next_name} overlap")


def _check_shape(path: Path, tensors: dict, name: str, shape: tuple[int, ...]) -> gguf.ReaderTensor:
    tensor = tensors.get(name)
    if tensor is None:
        raise MixtralOffloadError(f"{path}: tensor {name} is missing")
    found = tuple(reversed([int(d) for d in tensor.shape]))
    if found != tuple(shape):
        raise MixtralOffloadError(f"{path}: tensor {name} has shape {list(found)}, "
                                  f"expected {list(shape)} from the metadata")
    return tensor


def _expert_extents(path: Path, tensors: dict, args: ModelArgs, layer: int, layout: str) -> dict:
    """(layer, expert, part) -> Extent for one layer's experts, in either layout."""
    extents = {}
    for part, (rows, cols) in expert_shapes(args).items():
        if layout == "merged":
            name = MERGED_EXPERTS.format(layer=layer, part=_EXPERT_NAMES[part])
            tensor = _check_shape(path, tensors, name, (args.num_local_experts, rows, cols))
            slice_bytes = tensor.n_bytes // args.num_local_experts   # whole rows: _check_extents saw whole blocks
            for expert in range(args.num_local_experts):
                extents[(layer, expert, part)] = Extent(tensor.tensor_type, (rows, cols),
                                                        int(tensor.data_offset) + expert * slice_bytes, slice_bytes)
        else:
            for expert in range(args.num_local_experts):
                name = PER_EXPERT.format(layer=layer, part=_EXPERT_NAMES[part], expert=expert)
                tensor = _check_shape(path, tensors, name, (rows, cols))
                extents[(layer, expert, part)] = Extent(tensor.tensor_type, (rows, cols),
                                                        int(tensor.data_offset), tensor.n_bytes)
    return extents


def is_gguf(path: Path) -> bool:
    """Whether path is a regular file that starts with GGUF's magic."""
    if not path.is_file():  # never open a FIFO or a device: an open could block
        return False
    try:
        with open(path, "rb") as file:
            return file.read(4) == b"GGUF"
    except OSError:
        return False


def verify_gguf(path: str | Path) -> str:
    """What can be checked of a GGUF (header, extents, shapes, tokenizer), as a short report."""
    model = GGUFModel.open(path)
    args, reader = model.args, model.reader
    tokenizer = model.tokenizer()
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    version = reader.fields["GGUF.version"].parts[0][0]
    return "\n".join([
        f"{model.path}: GGUF version {version}, {len(reader.fields) - 3} metadata fields, "
        f"{len(reader.tensors)} tensors, {format_size(len(reader.data))}",
        f"metadata: Mixtral, {args.num_hidden_layers} layers, {args.num_local_experts} experts "
        f"(top {args.num_experts_per_tok}), hidden {args.hidden_size}, intermediate {args.intermediate_size}, "
        f"heads {args.num_attention_heads}/{args.num_key_value_heads}, vocab {args.vocab_size}",
        f"extents: every tensor inside the file, aligned to {reader.alignment} bytes, none overlapping",
        f"shapes: dense and expert tensors agree with the metadata; experts {model.layout}; types "
        + ", ".join(f"{name} x{count}" for name, count in sorted(types.items())),
        f"tokenizer: {tokenizer.vocab_size} pieces, BOS {tokenizer.bos_id}, EOS {tokenizer.eos_id}",
        "checksums: none (GGUF stores no checksums; the weights' bytes themselves cannot be verified)",
    ])
