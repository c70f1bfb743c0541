"""GGUF files of HF Mixtral checkpoints, written with the gguf package's writer and quantizer (tests, benchmarks).

The layout is llama.cpp's: q and k rows in interleaved RoPE order, experts either merged per layer
(ffn_gate_exps / ffn_up_exps [E, I, D], ffn_down_exps [E, D, I]) or one tensor per expert (older
files, ffn_gate.E ...). Quantized files quantize every matrix (embedding and output included, as
llama-quantize --pure); norms and routers stay F32. The vocabulary is the first vocab_size pieces of
the checkpoint's tokenizer.model.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

QTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
K_MEAN_CODE = {gguf.GGMLQuantizationType.Q4_K: 7.5, gguf.GGMLQuantizationType.Q5_K: 15.5}  # codes 0..15, 0..31
SCALE_SAMPLE_ROWS = 64  # rows of random blocks whose dequantized std sets the scale of the whole matrix


def permute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF q/k rows (per head: first half, second half) -> GGUF rows (per head: pairs interleaved)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """name -> float32 numpy array from every safetensors shard."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name).float().numpy()
    return tensors


def add_vocab(writer: gguf.GGUFWriter, tokenizer_path: Path, vocab_size: int) -> None:
    """The tokenizer.ggml.* fields of the first vocab_size pieces of a sentencepiece model."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
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


def _expert(t: dict, layer: int, expert: int, part: str) -> np.ndarray:
    for prefix in ("block_sparse_moe", "mlp"):
        name = f"model.layers.{layer}.{prefix}.experts.{expert}.{part}.weight"
        if name in t:
            return t[name]
    raise KeyError(f"layer {layer} expert {expert} {part}: not found")


def start_writer(tmp: Path, config: dict, tokenizer_path: Path, file_type, name: str) -> gguf.GGUFWriter:
    """A GGUFWriter for arch 'llama' with experts, its metadata and vocabulary written from an HF config."""
    D, H = config["hidden_size"], config["num_attention_heads"]
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 1e6)
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(D)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(config.get("head_dim") or D // H)
    writer.add_head_count(H)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float(theta))
    writer.add_expert_count(config["num_local_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    add_vocab(writer, tokenizer_path, config["vocab_size"])
    return writer


def finish(writer: gguf.GGUFWriter, tmp: Path, out: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)
    return out


def write_random_gguf(out: Path, config: dict, tokenizer_path: Path, expert_qtype: gguf.GGMLQuantizationType,
                      seed: int = 0) -> Path:
    """A random Mixtral GGUF of any size without an HF checkpoint: F16 dense weights (std 0.02), F32 norms
    and routers, merged experts of random valid blocks of expert_qtype (std 0.02)."""
    rng = np.random.default_rng(seed)
    D, I, L, E = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts"))
    H, KV, V = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    hd = D // H
    tmp = out.with_name(out.name + ".tmp")
    writer = start_writer(tmp, config, tokenizer_path, gguf.LlamaFileType.MOSTLY_F16, "mixtral-random")

    def dense(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16))

    dense("token_embd.weight", V, D)
    writer.add_tensor("output_norm.weight", np.ones(D, np.float32))
    dense("output.weight", V, D)
    for i in range(L):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(D, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(D, np.float32))
        dense(f"blk.{i}.attn_q.weight", H * hd, D)
        dense(f"blk.{i}.attn_k.weight", KV * hd, D)
        dense(f"blk.{i}.attn_v.weight", KV * hd, D)
        dense(f"blk.{i}.attn_output.weight", D, H * hd)
        writer.add_tensor(f"blk.{i}.ffn_gate_inp.weight", rng.standard_normal((E, D), dtype=np.float32))
        for index, (part, shape) in enumerate((("gate", (I, D)), ("up", (I, D)), ("down", (D, I)))):
            blocks = np.stack([random_expert_blocks(expert_qtype, shape, seed * 7 + 100 * i + 10 * e + index, 0.02)
                               for e in range(E)])
            writer.add_tensor(f"blk.{i}.ffn_{part}_exps.weight", blocks, raw_dtype=expert_qtype)
    return finish(writer, tmp, out)


def centre_k_blocks(blocks: np.ndarray, mean_code: float) -> None:
    """Q4_K/Q5_K blocks [rows, n, bytes] made zero-mean as a trained model's: every sub-block's 6-bit min
    set to its scale and dmin to d x the mean code. Random bytes give every weight a mean of ~d sc 7.5 -
    dmin m, which adds up along rows until a few layers of experts overflow float16 activations."""
    scales = blocks[:, :, 4:16]  # get_scale_min_k4: sc from bytes 0-3 and low nibbles of 8-11, m from 4-7 and high
    scales[:, :, 4:8] = scales[:, :, 0:4]
    scales[:, :, 8:12] = (scales[:, :, 8:12] & 15) * 17
    d = blocks[:, :, 0:2].copy().view(np.float16).astype(np.float32)
    blocks[:, :, 2:4] = (d * mean_code).astype(np.float16).view(np.uint8)


def random_expert_blocks(qtype: gguf.GGMLQuantizationType, shape: tuple[int, int], seed: int,
                         std: float = 0.1, centred: bool = False) -> np.ndarray:
    """Random valid blocks of a K-quant (which gguf cannot quantize), scaled so the weights' std is `std`:
    every float16 scale of a block multiplies all its weights, so scaling them scales the matrix.
    centred: Q4_K/Q5_K sub-blocks of mean ~0 (centre_k_blocks), for many layers of them."""
    from mixtral_offload.quant.gguf_bench import random_gguf_matrix
    from mixtral_offload.quant.gguf_blocks import block_type

    bt = block_type(qtype)
    blocks = random_gguf_matrix(qtype, shape, seed).data.reshape(shape[0], -1, bt.block_bytes).copy()
    if centred and qtype in K_MEAN_CODE:
        centre_k_blocks(blocks, K_MEAN_CODE[qtype])
    sample = blocks[:SCALE_SAMPLE_ROWS].reshape(min(shape[0], SCALE_SAMPLE_ROWS), -1)  # enough for the std
    factor = std / float(gguf.quants.dequantize(sample, qtype).std())
    for field in bt.f16_fields:
        scales = blocks[:, :, field:field + 2].copy().view(np.float16).astype(np.float32) * factor
        blocks[:, :, field:field + 2] = scales.astype(np.float16).view(np.uint8)
    return blocks.reshape(shape[0], -1)


def write_gguf(hf_dir: Path, out: Path, qtype: str = "f32", layout: str = "merged", name: str = "mixtral-test",
               expert_qtype: gguf.GGMLQuantizationType | None = None) -> Path:
    """Write the checkpoint in hf_dir as a GGUF at out; qtype in QTYPES, layout 'merged' or 'per-expert'.

    expert_qtype (a K-quant): the experts are random valid blocks of that type instead of the checkpoint's.
    """
    config = json.loads((hf_dir / "config.json").read_text())
    L, E = config["num_hidden_layers"], config["num_local_experts"]
    H, KV = config["num_attention_heads"], config["num_key_value_heads"]
    quant_type = QTYPES[qtype]
    t = read_tensors(hf_dir)
    tmp = out.with_name(out.name + ".tmp")
    writer = start_writer(tmp, config, hf_dir / "tokenizer.model", FILE_TYPES[qtype], name)

    def add(gguf_name: str, array: np.ndarray, quantize: bool = True) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not quantize or array.ndim < 2 or quant_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, array)
        elif quant_type == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, array.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, quant_type), raw_dtype=quant_type)

    add("token_embd.weight", t["model.embed_tokens.weight"])
    add("output_norm.weight", t["model.norm.weight"])
    if not config.get("tie_word_embeddings"):
        add("output.weight", t["lm_head.weight"])
    for i in range(L):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", permute_rope(t[p + "self_attn.q_proj.weight"], H))
        add(f"blk.{i}.attn_k.weight", permute_rope(t[p + "self_attn.k_proj.weight"], KV))
        add(f"blk.{i}.attn_v.weight", t[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", t[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"])
        router = p + "block_sparse_moe.gate.weight" if p + "block_sparse_moe.gate.weight" in t else p + "mlp.gate.weight"
        add(f"blk.{i}.ffn_gate_inp.weight", t[router], quantize=False)
        for part, gguf_part in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            if expert_qtype is not None:
                shape = _expert(t, i, 0, part).shape
                blocks = [random_expert_blocks(expert_qtype, shape, seed=1000 * i + 10 * e + "w1w3w2".index(part) // 2)
                          for e in range(E)]
                if layout == "merged":
                    writer.add_tensor(f"blk.{i}.ffn_{gguf_part}_exps.weight", np.stack(blocks), raw_dtype=expert_qtype)
                else:
                    for e in range(E):
                        writer.add_tensor(f"blk.{i}.ffn_{gguf_part}.{e}.weight", blocks[e], raw_dtype=expert_qtype)
            elif layout == "merged":
                add(f"blk.{i}.ffn_{gguf_part}_exps.weight", np.stack([_expert(t, i, e, part) for e in range(E)]))
            else:
                for e in range(E):
                    add(f"blk.{i}.ffn_{gguf_part}.{e}.weight", _expert(t, i, e, part))
    return finish(writer, tmp, out)


def rewrite_gguf(src: Path, out: Path, fields: dict | None = None, drop_tensors: tuple = ()) -> Path:
    """Copy a GGUF with metadata fields replaced (key -> (value, GGUFValueType)) or dropped (key -> None)."""
    fields = fields or {}
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    writer.data_alignment = reader.alignment  # the source's layout (a replaced general.alignment does not move it)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in fields:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    for key, new in fields.items():
        if new is not None:
            writer.add_key_value(key, *new)
    for tensor in reader.tensors:
        if tensor.name not in drop_tensors:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
