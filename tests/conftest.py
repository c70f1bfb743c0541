import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny float32 random Mixtral in HF layout, sharded, with its transformers model: (path, model)."""
    path = tmp_path_factory.mktemp("tiny-hf")
    model = write_checkpoint(path, shard_size="300KB")
    return path, model
