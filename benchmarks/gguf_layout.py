"""A Mixtral written as GGUF for llama.cpp ('llama' architecture with experts), one tensor at a time.

Tensor layout as llama.cpp expects it: q and k rows permuted from HF's rotate-half RoPE order to
interleaved pairs; experts stacked per layer as ffn_gate_exps (w1) and ffn_up_exps (w3) [E, I, D]
and ffn_down_exps (w2) [E, D, I], each expert quantized on its own (its rows are whole blocks), so
a stack never exists in float32; the router stays F32. q4_0/q8_0 quantize every other matrix
(embedding and output included: llama-quantize --pure). The vocab is a sentencepiece model.
Sources (HF checkpoint: to_gguf.py, converted pool: pool_to_gguf.py) give float32 arrays by HF name.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gguf_files import FILE_TYPES, permute_rope, start_writer  # noqa: E402  (one GGUF metadata and RoPE layout)

GGUF_TYPES = ("f32", "q4_0", "q8_0")
EXPERT_STACKS = (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps"))
Q4_0_BLOCK = 32


class GGUFSource(Protocol):
    """A Mixtral's weights as float32 arrays, named as in an HF checkpoint."""

    config: dict          # HF config.json keys
    tokenizer: Path       # a sentencepiece tokenizer.model

    def dense(self, hf_name: str) -> np.ndarray: ...

    def expert(self, layer: int, expert: int, part: str) -> np.ndarray: ...


@numba.njit(parallel=True, cache=True)
def _q4_0_blocks(blocks, d, packed):  # blocks [N, 32] float32 -> d [N] float32, packed [N, 16] uint8
    for b in numba.prange(blocks.shape[0]):
        peak, largest = np.float32(0.0), np.float32(-1.0)
        for j in range(Q4_0_BLOCK):
            magnitude = abs(blocks[b, j])
            if magnitude > largest:  # strictly: the first of equal magnitudes, as numpy's argmax
                largest, peak = magnitude, blocks[b, j]
        d[b] = peak / np.float32(-8.0)
        inverse = np.float32(0.0) if d[b] == 0 else np.float32(np.float32(1.0) / d[b])
        for j in range(Q4_0_BLOCK // 2):
            lo = min(15, int(np.float32(blocks[b, j] * inverse) + np.float32(8.5)))
            hi = min(15, int(np.float32(blocks[b, j + 16] * inverse) + np.float32(8.5)))
            packed[b, j] = np.uint8(lo | (hi << 4))


def quantize_q4_0(weight: np.ndarray) -> np.ndarray:
    """Q4_0 blocks of a float32 matrix: bit for bit gguf.quants.quantize, compiled (gguf's NumPy is slow).

    Per 32 weights: d = (the weight of largest magnitude, first on ties) / -8, stored as float16,
    then 16 bytes, byte j holding clip(trunc(w_j / d + 8.5), 0, 15) low and the same of w_{j+16} high.
    """
    rows = weight.shape[0]
    blocks = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1, Q4_0_BLOCK)
    d = np.empty(blocks.shape[0], np.float32)
    packed = np.empty((blocks.shape[0], Q4_0_BLOCK // 2), np.uint8)
    _q4_0_blocks(blocks, d, packed)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), packed], axis=1).reshape(rows, -1)


def quantizer(qtype_name: str) -> Callable[[np.ndarray], np.ndarray]:
    """float32 matrix -> its GGUF bytes in qtype_name (q4_0 checked against gguf.quants on its first use)."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name.upper())
    if qtype_name != "q4_0":
        return lambda weight: gguf.quants.quantize(np.ascontiguousarray(weight, dtype=np.float32), qtype)
    checked = []

    def quantize(weight: np.ndarray) -> np.ndarray:
        out = quantize_q4_0(weight)
        if not checked:  # the reference on a slice of the first matrix, so a drift cannot pass unseen
            sample = np.ascontiguousarray(weight[:64], dtype=np.float32)
            if not np.array_equal(out[:64], gguf.quants.quantize(sample, qtype)):
                raise RuntimeError("quantize_q4_0 differs from gguf.quants.quantize")
            checked.append(True)
        return out
    return quantize


def tensor_plan(source: GGUFSource) -> Iterator[tuple[str, tuple[int, ...], bool, Callable[[], Iterator[np.ndarray]]]]:
    """(GGUF name, float shape, quantized?, pieces whose concatenated rows are the tensor) in file order."""
    c = source.config
    D, I, L, E = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_local_experts"]
    H, KV = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or D // H

    def one(hf_name: str, transform=lambda a: a):
        return lambda: iter([transform(source.dense(hf_name))])

    yield "token_embd.weight", (c["vocab_size"], D), True, one("model.embed_tokens.weight")
    yield "output_norm.weight", (D,), False, one("model.norm.weight")
    yield "output.weight", (c["vocab_size"], D), True, one("lm_head.weight")
    for i in range(L):
        p = f"model.layers.{i}."
        yield f"blk.{i}.attn_norm.weight", (D,), False, one(p + "input_layernorm.weight")
        yield f"blk.{i}.attn_q.weight", (H * head_dim, D), True, one(p + "self_attn.q_proj.weight",
                                                                      lambda a: permute_rope(a, H))
        yield f"blk.{i}.attn_k.weight", (KV * head_dim, D), True, one(p + "self_attn.k_proj.weight",
                                                                       lambda a: permute_rope(a, KV))
        yield f"blk.{i}.attn_v.weight", (KV * head_dim, D), True, one(p + "self_attn.v_proj.weight")
        yield f"blk.{i}.attn_output.weight", (D, H * head_dim), True, one(p + "self_attn.o_proj.weight")
        yield f"blk.{i}.ffn_norm.weight", (D,), False, one(p + "post_attention_layernorm.weight")
        yield f"blk.{i}.ffn_gate_inp.weight", (E, D), False, one(p + "block_sparse_moe.gate.weight")
        for part, gguf_name in EXPERT_STACKS:
            shape = (E, I, D) if part != "w2" else (E, D, I)
            yield (f"blk.{i}.{gguf_name}.weight", shape, True,
                   lambda i=i, part=part: (source.expert(i, e, part) for e in range(E)))


def write_gguf(source: GGUFSource, out: Path, qtype_name: str, name: str, log=None) -> None:
    """Write source as a GGUF file at out (via out.tmp, renamed when complete)."""
    import gguf

    if qtype_name not in GGUF_TYPES:
        raise ValueError(f"GGUF type must be one of {GGUF_TYPES}")
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name.upper())
    quantize = quantizer(qtype_name) if qtype_name != "f32" else None
    plan = list(tensor_plan(source))
    tmp = out.with_name(out.name + ".tmp")
    writer = start_writer(tmp, source.config, source.tokenizer, FILE_TYPES[qtype_name], name)
    for tensor_name, shape, quantized, _ in plan:
        raw = qtype if quantized and quantize else gguf.GGMLQuantizationType.F32
        nbytes = 4 * int(np.prod(shape)) if raw == gguf.GGMLQuantizationType.F32 else int(
            np.prod(gguf.quants.quant_shape_to_byte_shape(shape, raw)))
        writer.add_tensor_info(tensor_name, shape, np.dtype(np.float32), nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor_name, _, quantized, pieces in plan:
        if log:
            log(f"gguf {tensor_name}")
        parts = [quantize(p) if quantized and quantize else np.ascontiguousarray(p, dtype=np.float32)
                 for p in pieces()]
        writer.write_tensor_data(np.concatenate(parts) if len(parts) > 1 else parts[0])
    writer.close()
    tmp.rename(out)
