"""Opening a model directory of either kind: an HF Mixtral checkpoint, or a converted one with a pool."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ModelArgs
from ..errors import MixtralOffloadError
from .checkpoint import dense_shapes, parse_dtype
from .pool import CONFIG_NAME, DENSE_NAME, POOL_NAME, TOKENIZER_NAME, ExpertPool
from .quant_experts import PoolExperts
from .runtime import Runtime, build_model, default_context, load_checkpoint
from .tokenizer import Tokenizer


def load(path: str | Path, dtype: str = "float32", max_context: int | None = None, *,
         release_pages: bool = False) -> Runtime:
    """Load the model at path for generation: dtype is the compute dtype of the dense weights.

    A directory holding experts.pool loads as a converted model (experts computed on the pool);
    anything else as an HF checkpoint. release_pages drops an expert's mapped pages after each use.
    """
    path = Path(path)
    if not path.exists():
        raise MixtralOffloadError(f"{path}: no such model directory")
    if (path / POOL_NAME).exists():
        return load_converted(path, dtype=dtype, max_context=max_context, release_pages=release_pages)
    return load_checkpoint(path, dtype=dtype, max_context=max_context)


def load_converted(path: str | Path, dtype: str = "float32", max_context: int | None = None,
                   release_pages: bool = False) -> Runtime:
    """Load a converted model directory: dense weights resident, experts in the mapped pool."""
    path = Path(path)
    args = ModelArgs.from_file(path / CONFIG_NAME)
    pool = ExpertPool.open(path)
    dense = read_dense(path / DENSE_NAME, args, parse_dtype(dtype))
    tokenizer = Tokenizer(path / TOKENIZER_NAME)
    model = build_model(args, dense, PoolExperts(pool, release_pages), default_context(args, max_context))
    return Runtime(model, tokenizer, path)


def read_dense(file: Path, args: ModelArgs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every dense tensor of dense.safetensors in dtype, checked against the config's shapes."""
    shapes = dense_shapes(args)
    try:
        with safe_open(file, framework="pt") as handle:
            missing = sorted(set(shapes) - set(handle.keys()))
            if missing:
                raise MixtralOffloadError(f"{file}: tensor {missing[0]} is missing ({len(missing)} missing)")
            dense = {name: handle.get_tensor(name).to(dtype) for name in shapes}
    except MixtralOffloadError:
        raise
    except Exception as exc:  # safetensors raises several types for damaged files
        raise MixtralOffloadError(f"{file}: cannot read ({exc})") from None
    for name, shape in shapes.items():
        if tuple(dense[name].shape) != tuple(shape):
            raise MixtralOffloadError(f"{file}: tensor {name} has shape {tuple(dense[name].shape)}, "
                                      f"expected {tuple(shape)} from {CONFIG_NAME}")
    return dense
