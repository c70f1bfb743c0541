"""Write a model as GGUF for llama.cpp (layout: gguf_layout.py): an HF checkpoint or a converted model directory.

    python benchmarks/to_gguf.py MODEL_DIR OUT.gguf --type f32|q4_0|q8_0

An HF checkpoint (Mixtral-mini) is read whole. A converted directory (dense.safetensors + experts.pool,
e.g. from `mixtral-offload synth`) gives the same weights as this runtime computes: dense weights
upcast from their stored dtype (exact), experts dequantized from the pool one matrix at a time
(w = (q - zero) * scale) and, for q4_0/q8_0, quantized again. The vocab is MODEL_DIR/tokenizer.model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_layout import GGUF_TYPES, write_gguf  # noqa: E402


class CheckpointSource:
    """An HF checkpoint directory's tensors, all read into memory as float32 (a small model)."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        self.config = json.loads((hf_dir / "config.json").read_text())
        self.tokenizer = hf_dir / "tokenizer.model"
        self.tensors = {}
        for file in sorted(hf_dir.glob("*.safetensors")):
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    self.tensors[name] = handle.get_tensor(name).float().numpy()

    def dense(self, hf_name: str) -> np.ndarray:
        if hf_name not in self.tensors and ".block_sparse_moe." in hf_name:  # transformers-5 spelling
            return self.tensors[hf_name.replace(".block_sparse_moe.", ".mlp.")]
        return self.tensors[hf_name]

    def expert(self, layer: int, expert: int, part: str) -> np.ndarray:
        return self.dense(f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{part}.weight")


class PoolSource:
    """A converted model's weights as float32, by HF name; one tensor or one expert matrix at a time."""

    def __init__(self, model_dir: Path):
        from mixtral_offload.config import ModelArgs
        from mixtral_offload.offload.store.checkpoint import dense_shapes, hf_dense_name
        from mixtral_offload.offload.store.pool import CONFIG_NAME, DENSE_NAME, TOKENIZER_NAME, ExpertPool

        self.config = json.loads((model_dir / CONFIG_NAME).read_text())
        self.tokenizer = model_dir / TOKENIZER_NAME
        self.dense_file = model_dir / DENSE_NAME
        args = ModelArgs.from_file(model_dir / CONFIG_NAME)
        self.runtime_name = {hf_dense_name(name): name for name in dense_shapes(args)}
        self.pool = ExpertPool.open(model_dir)

    def dense(self, hf_name: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(self.dense_file, framework="pt") as handle:
            return handle.get_tensor(self.runtime_name[hf_name]).float().numpy()

    def expert(self, layer: int, expert: int, part: str) -> np.ndarray:
        from mixtral_offload.quant.quantize import dequantize_torch

        matrix = dict(zip(("w1", "w3", "w2"), self.pool.mapped((layer, expert))))[part]
        weight = dequantize_torch(matrix).numpy()
        self.pool.release((layer, expert), drop_cache=True)  # the pool's pages leave memory as we go
        return weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", choices=GGUF_TYPES, default="f32")
    parser.add_argument("-v", "--verbose", action="store_true", help="name each tensor as it is written")
    args = parser.parse_args()
    source = PoolSource(args.model_dir) if (args.model_dir / "experts.pool").exists() else CheckpointSource(args.model_dir)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else None
    write_gguf(source, args.out, args.type, args.model_dir.name, log=log)


if __name__ == "__main__":
    main()
