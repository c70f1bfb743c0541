"""A random Mixtral GGUF at full Mixtral width with llama.cpp's Q4_K_M type mix, streamed to disk.

    python benchmarks/q4_k_m_gguf.py OUT.gguf [--layers 8]

llama.cpp's quantizer takes minutes per expert tensor at this size, and neither system's speed depends
on the values, so every quantized tensor is random valid blocks (tests/gguf_files.random_expert_blocks,
weights' std 0.02, Q4_K/Q5_K sub-blocks centred). Types as llama-quantize Q4_K_M gives an 8-expert
llama (llama_tensor_get_type):
output Q6_K, attn_k and attn_v Q8_0, attn_output Q5_K, ffn_down_exps Q6_K in the layers where
use_more_bits holds (else Q4_K), every other matrix Q4_K; norms and the router F32 (norms 1, router N(0, 1)).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gguf_files import random_expert_blocks, start_writer  # noqa: E402

T = gguf.GGMLQuantizationType
STD = 0.02
WIDTH = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
             num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
             rope_theta=1e6, rms_norm_eps=1e-5)


def blocks_of(qtype: T, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Random valid blocks of qtype, weights of std STD, K-quant sub-blocks of mean ~0."""
    return random_expert_blocks(qtype, shape, seed, STD, centred=True)


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's rule for the layers whose ffn_down gets more bits."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def plan(config: dict) -> Iterator[tuple[str, tuple[int, ...], T, Callable[[int], np.ndarray]]]:
    """(name, numpy shape, type, seed -> array) for every tensor, in llama.cpp's order."""
    D, I, L, E = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts"))
    H, KV, V = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    hd = D // H

    def blocks(qtype: T, rows: int, cols: int):
        return lambda seed: blocks_of(qtype, (rows, cols), seed)

    def ones(n: int):
        return lambda seed: np.ones(n, np.float32)

    yield "token_embd.weight", (V, D), T.Q4_K, blocks(T.Q4_K, V, D)
    yield "output_norm.weight", (D,), T.F32, ones(D)
    yield "output.weight", (V, D), T.Q6_K, blocks(T.Q6_K, V, D)
    for i in range(L):
        yield f"blk.{i}.attn_norm.weight", (D,), T.F32, ones(D)
        yield f"blk.{i}.attn_q.weight", (H * hd, D), T.Q4_K, blocks(T.Q4_K, H * hd, D)
        yield f"blk.{i}.attn_k.weight", (KV * hd, D), T.Q8_0, blocks(T.Q8_0, KV * hd, D)
        yield f"blk.{i}.attn_v.weight", (KV * hd, D), T.Q8_0, blocks(T.Q8_0, KV * hd, D)
        yield f"blk.{i}.attn_output.weight", (D, H * hd), T.Q5_K, blocks(T.Q5_K, D, H * hd)
        yield f"blk.{i}.ffn_norm.weight", (D,), T.F32, ones(D)
        yield (f"blk.{i}.ffn_gate_inp.weight", (E, D), T.F32,
               lambda seed: np.random.default_rng(seed).standard_normal((E, D), dtype=np.float32))
        down = T.Q6_K if use_more_bits(i, L) else T.Q4_K
        for part, qtype, (rows, cols) in (("gate", T.Q4_K, (I, D)), ("up", T.Q4_K, (I, D)), ("down", down, (D, I))):
            yield (f"blk.{i}.ffn_{part}_exps.weight", (E, rows, cols), qtype,
                   lambda seed, qtype=qtype, rows=rows, cols=cols:
                   np.stack([blocks_of(qtype, (rows, cols), seed * E + e) for e in range(E)]))


def write(out: Path, layers: int, tokenizer: Path) -> None:
    """Write the file at out (via out.tmp, renamed when complete), one tensor in memory at a time."""
    config = dict(WIDTH, num_hidden_layers=layers)
    tensors = list(plan(config))
    tmp = out.with_name(out.name + ".tmp")
    writer = start_writer(tmp, config, tokenizer, gguf.LlamaFileType.MOSTLY_Q4_K_M, "mixtral-width-q4_k_m")
    for name, shape, qtype, _ in tensors:
        nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for seed, (name, _, _, make) in enumerate(tensors):
        print(f"gguf {name}", file=sys.stderr, flush=True)
        writer.write_tensor_data(make(seed))
    writer.close()
    tmp.rename(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    import mistral_common

    write(args.out, args.layers, Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")


if __name__ == "__main__":
    main()
