"""Opening a model directory of either kind: an HF Mixtral checkpoint, or a converted one with a pool."""
from __future__ import annotations

from pathlib import Path

from ..errors import MixtralOffloadError
from .runtime import Runtime, load_checkpoint


def load(path: str | Path, dtype: str = "float32", max_context: int | None = None) -> Runtime:
    """Load the model at path for generation: dtype is the compute dtype of the dense weights."""
    path = Path(path)
    if not path.exists():
        raise MixtralOffloadError(f"{path}: no such model directory")
    return load_checkpoint(path, dtype=dtype, max_context=max_context)
