import sys
from pathlib import Path

import pytest

import mixtral_offload  # noqa: F401  first: it sets the OpenMP wait policy, which torch reads when it loads

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny float32 random Mixtral in HF layout, sharded, with its transformers model: (path, model)."""
    path = tmp_path_factory.mktemp("tiny-hf")
    model = write_checkpoint(path, shard_size="300KB")
    return path, model


@pytest.fixture(scope="session")
def converted_int4(tmp_path_factory):
    """A 4-layer, 8-expert random Mixtral converted to int4 g64: the converted model directory."""
    from mixtral_offload.offload.store.convert import convert

    root = tmp_path_factory.mktemp("converted")
    write_checkpoint(root / "hf", num_hidden_layers=4, num_local_experts=8, hidden_size=128, intermediate_size=256)
    convert(root / "hf", root / "q4", bits=4, group_size=64, progress=False)
    return root / "q4"
