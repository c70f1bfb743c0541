"""Random-weight Mixtral checkpoints in the original HF layout, written by transformers (test-only)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

TINY = dict(vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512)


def mixtral_tokenizer_path() -> Path:
    """The Mixtral v0.1 sentencepiece model shipped by mistral-common."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def write_checkpoint(path: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, shard_size: str | None = None,
                     init_std: float = 0.1, **config) -> "transformers.MixtralForCausalLM":
    """Save a random MixtralForCausalLM (TINY updated by config) with tokenizer.model; return the model."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    hf_config = MixtralConfig(**{**TINY, **config}, initializer_range=init_std)
    model = MixtralForCausalLM(hf_config).to(dtype).eval()
    model.save_pretrained(path, max_shard_size=shard_size or "10GB")
    shutil.copy(mixtral_tokenizer_path(), Path(path) / "tokenizer.model")
    return model
