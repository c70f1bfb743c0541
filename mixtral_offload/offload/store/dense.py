"""Reading dense.safetensors of a converted model: every dense tensor checked against the config's shapes."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from ...config import ModelArgs
from ...errors import MixtralOffloadError
from ...validate import regular_file_size
from ...quant.linear import is_quantized_dense, quantize_dense
from ..mapped_embedding import MappedEmbedding
from ..memory_plan import return_freed_memory
from .checkpoint import dense_shapes
from .pool import CONFIG_NAME


def read_dense(file: Path, args: ModelArgs, dtype: torch.dtype, quantized: bool = False,
               activations: str = "int8", mapped_embedding: bool = False) -> dict:
    """Every dense tensor of `file` in dtype; with quantized, the attention and output weights as
    QuantizedLinear (int8, computed with `activations`), each as soon as it is read; with
    mapped_embedding, the embedding table as a MappedEmbedding.

    The file is mapped for one tensor at a time, so its pages never all count in RSS at once.
    """
    shapes = dense_shapes(args)
    regular_file_size(file, "dense.safetensors")  # a FIFO or a device would hang or fill memory

    def tensors():
        for name, shape in shapes.items():
            if name == "embed" and mapped_embedding:
                continue
            with safe_open(file, framework="pt") as handle:
                tensor = handle.get_tensor(name)
            if tuple(tensor.shape) != tuple(shape):
                raise MixtralOffloadError(f"{file}: tensor {name} has shape {tuple(tensor.shape)}, "
                                          f"expected {tuple(shape)} from {CONFIG_NAME}")
            yield name, tensor

    try:
        with safe_open(file, framework="pt") as handle:
            missing = sorted(set(shapes) - set(handle.keys()))
        if missing:
            raise MixtralOffloadError(f"{file}: tensor {missing[0]} is missing ({len(missing)} missing)")
        dense = hold_dense(tensors(), dtype, quantized, activations)
        if mapped_embedding:
            dense["embed"] = MappedEmbedding(file, "embed", shapes["embed"], dtype)
    except MixtralOffloadError:
        raise
    except Exception as exc:  # safetensors raises several types for damaged files
        raise MixtralOffloadError(f"{file}: cannot read ({exc})") from None
    return dense


def hold_dense(items: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, quantized: bool = False,
               activations: str = "int8") -> dict:
    """Dense tensors by runtime name as the model holds them: in dtype, or with quantized the attention
    and output weights as QuantizedLinear, each quantized as it arrives (its float copy freed at once)."""
    dense = {}
    for name, tensor in items:
        if quantized and is_quantized_dense(name, tuple(tensor.shape)):
            dense[name] = quantize_dense(tensor, activations)
            del tensor
            return_freed_memory()
        else:
            dense[name] = tensor.to(dtype=dtype, copy=True)
            del tensor
    return dense
