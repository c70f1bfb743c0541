"""Reading Hugging Face Mixtral checkpoints: sharded or single safetensors, tensors one at a time.

This module is the one place where checkpoint tensor names are mapped to the runtime's names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from ...config import ModelArgs
from ...cache.source import MATRICES as EXPERT_PARTS  # SwiGLU: w2(silu(w1 x) * w3 x)
from ...errors import MixtralOffloadError
from ...validate import confined, read_json_object

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# Runtime names of the dense tensors (per layer where marked with {layer}) and their HF names.
_DENSE_NAMES = {
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "layers.{layer}.attn_norm": "model.layers.{layer}.input_layernorm.weight",
    "layers.{layer}.moe_norm": "model.layers.{layer}.post_attention_layernorm.weight",
    "layers.{layer}.wq": "model.layers.{layer}.self_attn.q_proj.weight",
    "layers.{layer}.wk": "model.layers.{layer}.self_attn.k_proj.weight",
    "layers.{layer}.wv": "model.layers.{layer}.self_attn.v_proj.weight",
    "layers.{layer}.wo": "model.layers.{layer}.self_attn.o_proj.weight",
    "layers.{layer}.gate": "model.layers.{layer}.block_sparse_moe.gate.weight",
}
_EXPERT_NAME = "model.layers.{layer}.block_sparse_moe.experts.{expert}.{part}.weight"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dense_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Runtime name -> expected shape of every dense tensor of a model with these args."""
    D, V, hd = args.hidden_size, args.vocab_size, args.head_dim
    per_layer = {
        "attn_norm": (D,), "moe_norm": (D,),
        "wq": (args.num_attention_heads * hd, D),
        "wk": (args.num_key_value_heads * hd, D),
        "wv": (args.num_key_value_heads * hd, D),
        "wo": (D, args.num_attention_heads * hd),
        "gate": (args.num_local_experts, D),
    }
    shapes = {"embed": (V, D), "norm": (D,)}
    if not args.tie_word_embeddings:
        shapes["lm_head"] = (V, D)
    for layer in range(args.num_hidden_layers):
        for name, shape in per_layer.items():
            shapes[f"layers.{layer}.{name}"] = shape
    return shapes


def expert_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """Shape of each part of one expert, as stored in an HF checkpoint ([out, in])."""
    D, I = args.hidden_size, args.intermediate_size
    return {"w1": (I, D), "w3": (I, D), "w2": (D, I)}


def hf_dense_name(name: str) -> str:
    """The HF checkpoint name of a runtime dense tensor name."""
    match = re.fullmatch(r"layers\.(\d+)\.(\w+)", name)
    if match:
        return _DENSE_NAMES["layers.{layer}." + match.group(2)].format(layer=match.group(1))
    return _DENSE_NAMES[name]


def hf_expert_name(layer: int, expert: int, part: str) -> str:
    """The HF checkpoint name of one expert weight."""
    return _EXPERT_NAME.format(layer=layer, expert=expert, part=part)


@dataclass
class Checkpoint:
    """A Hugging Face Mixtral checkpoint directory, read lazily one tensor at a time."""

    path: Path
    args: ModelArgs
    tensor_files: dict[str, Path]  # HF tensor name -> shard file

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        """Open a checkpoint directory: config.json plus model.safetensors or an index with shards."""
        path = Path(path)
        if not path.is_dir():
            raise MixtralOffloadError(f"{path}: not a directory")
        args = ModelArgs.from_file(path / "config.json")
        index_path = path / INDEX_NAME
        if index_path.exists():
            weight_map = read_json_object(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise MixtralOffloadError(f"{index_path}: has no 'weight_map' object")
            tensor_files = {name: confined(path, shard, str(index_path)) for name, shard in weight_map.items()}
        elif (path / SINGLE_NAME).exists():
            tensor_files = {name: path / SINGLE_NAME for name in _list_tensors(path / SINGLE_NAME)}
        else:
            raise MixtralOffloadError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} found")
        for shard in sorted(set(tensor_files.values())):
            if not shard.is_file():
                raise MixtralOffloadError(f"{shard}: shard listed in {INDEX_NAME} is missing")
        checkpoint = cls(path, args, tensor_files)
        checkpoint._check_names()
        return checkpoint

    def _check_names(self) -> None:
        for name in dense_shapes(self.args):
            if hf_dense_name(name) not in self.tensor_files:
                raise MixtralOffloadError(f"{self.path}: tensor {hf_dense_name(name)} is missing")
        for layer in range(self.args.num_hidden_layers):
            for expert in range(self.args.num_local_experts):
                for part in EXPERT_PARTS:
                    if hf_expert_name(layer, expert, part) not in self.tensor_files:
                        raise MixtralOffloadError(
                            f"{self.path}: tensor {hf_expert_name(layer, expert, part)} is missing")

    @property
    def tokenizer_path(self) -> Path:
        """Where the sentencepiece model of this checkpoint lies."""
        return self.path / "tokenizer.model"

    def _read(self, hf_name: str, shape: tuple[int, ...], dtype: torch.dtype | None) -> torch.Tensor:
        shard = self.tensor_files[hf_name]
        try:
            with safe_open(shard, framework="pt") as handle:
                tensor = handle.get_tensor(hf_name)
        except Exception as exc:  # safetensors raises several types for damaged files
            raise MixtralOffloadError(f"{shard}: cannot read tensor {hf_name} ({exc})") from None
        if tuple(tensor.shape) != tuple(shape):
            raise MixtralOffloadError(
                f"{shard}: tensor {hf_name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} from config.json")
        if tensor.dtype not in _DTYPES.values():
            raise MixtralOffloadError(f"{shard}: tensor {hf_name} has unsupported dtype {tensor.dtype}")
        return tensor if dtype is None else tensor.to(dtype)

    def dense_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one dense tensor by runtime name (e.g. 'layers.3.wq'), checked against config shapes."""
        return self._read(hf_dense_name(name), dense_shapes(self.args)[name], dtype)

    def expert_tensor(self, layer: int, expert: int, part: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one expert weight ('w1', 'w3' or 'w2'), [out, in]."""
        return self._read(hf_expert_name(layer, expert, part), expert_shapes(self.args)[part], dtype)

    def dense_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every dense tensor, one at a time, as (runtime name, tensor)."""
        for name in dense_shapes(self.args):
            yield name, self.dense_tensor(name, dtype)

    def expert_bytes(self) -> int:
        """Bytes of all expert weights as stored in the checkpoint."""
        itemsize = torch.tensor([], dtype=_DTYPES.get(self.args.torch_dtype, torch.bfloat16)).element_size()
        return self.args.num_hidden_layers * self.args.num_local_experts * self.args.expert_params * itemsize


def _list_tensors(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:
        raise MixtralOffloadError(f"{file}: not a readable safetensors file ({exc})") from None


def parse_dtype(name: str) -> torch.dtype:
    """torch dtype from 'float32', 'bfloat16' or 'float16'."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise MixtralOffloadError(f"unknown dtype {name!r}: use one of {', '.join(_DTYPES)}") from None
