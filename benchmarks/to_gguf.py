"""Write the Mixtral-mini HF checkpoint as GGUF (llama.cpp's 'llama' architecture with experts).

    python benchmarks/to_gguf.py HF_DIR OUT.gguf --type f32|q4_0|q8_0

Tensor layout as llama.cpp expects it: q and k rows permuted from HF's rotate-half RoPE order to
interleaved pairs; experts stacked per layer as ffn_gate_exps (w1) and ffn_up_exps (w3) [E, I, D]
and ffn_down_exps (w2) [E, D, I]; the router stays F32. q4_0/q8_0 quantize every other matrix
(embedding and output included: llama-quantize --pure) with the gguf package's quants module.
The vocab is the sentencepiece model in HF_DIR/tokenizer.model (Mixtral v0.1's).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def permute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF q/k rows (per head: first half, second half) -> GGUF rows (per head: pairs interleaved)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_tensors(hf_dir: Path):
    """name -> float32 numpy array from every safetensors shard."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name).float().numpy()
    return tensors


def expert_name(layer: int, expert: int, part: str, tensors: dict) -> str:
    for prefix in ("block_sparse_moe", "mlp"):
        name = f"model.layers.{layer}.{prefix}.experts.{expert}.{part}.weight"
        if name in tensors:
            return name
    raise KeyError(f"layer {layer} expert {expert} {part}: not found")


def add_vocab(writer, tokenizer_path: Path) -> None:
    import gguf
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def convert(hf_dir: Path, out: Path, qtype_name: str) -> None:
    import gguf

    config = json.loads((hf_dir / "config.json").read_text())
    D, L, E = config["hidden_size"], config["num_hidden_layers"], config["num_local_experts"]
    H, KV = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or D // H
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 1e6)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "q4_0": gguf.GGMLQuantizationType.Q4_0,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[qtype_name]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype_name]
    t = read_tensors(hf_dir)

    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("mixtral-mini")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(D)
    writer.add_block_count(L)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(H)
    writer.add_head_count_kv(KV)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float(theta))
    writer.add_expert_count(E)
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    add_vocab(writer, hf_dir / "tokenizer.model")

    def add(name: str, array: np.ndarray, quantize: bool = True) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if quantize and qtype != gguf.GGMLQuantizationType.F32 and array.ndim >= 2:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)

    add("token_embd.weight", t["model.embed_tokens.weight"])
    add("output_norm.weight", t["model.norm.weight"])
    add("output.weight", t["lm_head.weight"])
    for i in range(L):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", permute_rope(t[p + "self_attn.q_proj.weight"], H))
        add(f"blk.{i}.attn_k.weight", permute_rope(t[p + "self_attn.k_proj.weight"], KV))
        add(f"blk.{i}.attn_v.weight", t[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", t[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"])
        gate = p + "block_sparse_moe.gate.weight" if p + "block_sparse_moe.gate.weight" in t else p + "mlp.gate.weight"
        add(f"blk.{i}.ffn_gate_inp.weight", t[gate], quantize=False)
        for part, gguf_name in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
            add(f"blk.{i}.{gguf_name}.weight", np.stack([t[expert_name(i, e, part, t)] for e in range(E)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", choices=["f32", "q4_0", "q8_0"], default="f32")
    args = parser.parse_args()
    convert(args.hf_dir, args.out, args.type)


if __name__ == "__main__":
    main()
