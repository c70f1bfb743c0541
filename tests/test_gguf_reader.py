"""The GGUF reader against the HF checkpoints its files were written from, and gguf.quants as reference."""
import dataclasses

import gguf
import numpy as np
import pytest
import torch
from checkpoints import write_checkpoint
from gguf_files import QTYPES, permute_rope, rewrite_gguf, write_gguf

from mixtral_offload.config import ModelArgs
from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.store.checkpoint import Checkpoint, hf_expert_name
from mixtral_offload.offload.store import gguf as gguf_store
from mixtral_offload.offload.store.gguf import GGUFModel, deinterleave_rope, gguf_dense_name, verify_gguf
from mixtral_offload.offload.store.gguf_header import READABLE_TYPES

SMALL_VOCAB = 300   # the first 300 pieces of Mixtral's vocabulary: 259 specials and bytes, then merges
VType = gguf.GGUFValueType


class Files:
    """A small random checkpoint and its GGUF files, written on first use."""

    def __init__(self, root):
        self.root, self.hf = root, root / "hf"
        write_checkpoint(self.hf, vocab_size=SMALL_VOCAB)
        self.made = {}

    def gguf(self, qtype="f32", layout="merged"):
        if (qtype, layout) not in self.made:
            self.made[(qtype, layout)] = write_gguf(self.hf, self.root / f"{qtype}-{layout}.gguf", qtype, layout)
        return self.made[(qtype, layout)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return Files(tmp_path_factory.mktemp("gguf"))


def test_model_args_equal_the_checkpoint_config(files):
    args = GGUFModel.open(files.gguf("f32")).args
    assert args == ModelArgs.from_file(files.hf / "config.json")
    assert GGUFModel.open(files.gguf("q4_0")).args == dataclasses.replace(args, torch_dtype="float16")


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_dense_tensors(files, qtype, monkeypatch):
    monkeypatch.setattr(gguf_store, "DEQUANTIZE_CHUNK", 200)   # 3 rows of 64 at a time: chunk edges
    model = GGUFModel.open(files.gguf(qtype))
    checkpoint = Checkpoint.open(files.hf)
    heads = {"wq": model.args.num_attention_heads, "wk": model.args.num_key_value_heads}
    for name, ours in model.dense_tensors(torch.float32):
        ours, expected = ours.numpy(), checkpoint.dense_tensor(name, torch.float32).numpy()
        stored = model.tensors[gguf_dense_name(name)]
        if qtype == "f32" or stored.tensor_type == gguf.GGMLQuantizationType.F32:   # norms and routers
            np.testing.assert_array_equal(ours, expected, err_msg=name)
        elif qtype == "f16":
            np.testing.assert_array_equal(ours, expected.astype(np.float16).astype(np.float32), err_msg=name)
        else:   # the stored blocks as gguf.quants reads them, in the file's row order
            kind = name.rsplit(".", 1)[-1]
            in_file_order = permute_rope(ours, heads[kind]) if kind in heads else ours
            np.testing.assert_array_equal(in_file_order, gguf.quants.dequantize(stored.data, stored.tensor_type),
                                          err_msg=name)
            np.testing.assert_allclose(ours, expected, atol=0.25 * np.abs(expected).max(), err_msg=name)
    assert model.dense_tensor("layers.0.wq", torch.bfloat16).dtype == torch.bfloat16


def test_rope_order_round_trip():
    weight = np.random.default_rng(0).standard_normal((6 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(deinterleave_rope(permute_rope(weight, 6), 6), weight)
    assert not np.array_equal(permute_rope(weight, 6), weight)


def test_rope_orders_rotate_alike():
    """HF's rotate-half RoPE on HF rows equals ggml's pairwise RoPE on GGUF rows, de-interleaved."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    heads, head_dim, hidden, base = 4, 16, 24, 10000.0
    rng = np.random.default_rng(1)
    weight, x = rng.standard_normal((heads * head_dim, hidden)), rng.standard_normal((3, hidden))
    positions = np.arange(3)[:, None]
    angles = positions * base ** (-np.arange(0, head_dim, 2) / head_dim)          # [T, hd/2]
    # HF: q [1, H, T, hd]; cos/sin [1, T, hd] repeat the hd/2 angles twice
    q_hf = torch.from_numpy((x @ weight.T).reshape(3, heads, head_dim).transpose(1, 0, 2)[None])
    cos = torch.from_numpy(np.concatenate([np.cos(angles)] * 2, axis=1)[None])
    sin = torch.from_numpy(np.concatenate([np.sin(angles)] * 2, axis=1)[None])
    hf, _ = apply_rotary_pos_emb(q_hf, q_hf, cos, sin)
    hf = hf[0].numpy().transpose(1, 0, 2)                                          # [T, H, hd]
    # ggml (rope mode 0): each adjacent pair (2i, 2i+1) rotated by angle i
    q = (x @ permute_rope(weight, heads).T).reshape(3, heads, head_dim // 2, 2)
    c, s = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    pairs = np.stack([q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c], axis=-1)
    ggml = deinterleave_rope(pairs.reshape(3, heads * head_dim).T, heads).T.reshape(3, heads, head_dim)
    np.testing.assert_allclose(ggml, hf, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("qtype,layout", [("q4_0", "merged"), ("q4_0", "per-expert"), ("f32", "per-expert"),
                                          ("q8_0", "merged")])
def test_expert_extents_hold_the_expert(files, qtype, layout):
    path = files.gguf(qtype, layout)
    model = GGUFModel.open(path)
    assert model.layout == layout
    raw = path.read_bytes()
    checkpoint = Checkpoint.open(files.hf)
    reference = gguf.GGUFReader(path)
    by_name = {tensor.name: tensor for tensor in reference.tensors}
    gguf_parts = {"w1": "gate", "w3": "up", "w2": "down"}
    args = model.args
    for layer in range(args.num_hidden_layers):
        for expert in range(args.num_local_experts):
            views = model.expert_views(layer, expert)
            for part, (qtype_found, shape, view) in views.items():
                extent = model.experts[(layer, expert, part)]
                got = raw[extent.offset:extent.offset + extent.nbytes]
                assert view.tobytes() == got and not view.flags.writeable
                if layout == "merged":
                    stored = by_name[f"blk.{layer}.ffn_{gguf_parts[part]}_exps.weight"].data[expert]
                else:
                    stored = by_name[f"blk.{layer}.ffn_{gguf_parts[part]}.{expert}.weight"].data
                assert got == stored.tobytes()
                weight = checkpoint.expert_tensor(layer, expert, part, torch.float32).numpy()
                assert shape == weight.shape and qtype_found == QTYPES[qtype]
                blocks = np.frombuffer(got, np.uint8).reshape(gguf.quant_shape_to_byte_shape(shape, qtype_found))
                expected = gguf.quants.dequantize(gguf.quants.quantize(weight, qtype_found), qtype_found)
                np.testing.assert_array_equal(gguf.quants.dequantize(blocks, qtype_found), expected,
                                              err_msg=hf_expert_name(layer, expert, part))


def test_readable_types_dequantize():
    for qtype in READABLE_TYPES:
        block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
        values = gguf.quants.dequantize(np.zeros((1, type_bytes), np.uint8), qtype)
        assert values.shape == (1, block), qtype.name


def test_verify_report(files):
    report = verify_gguf(files.gguf("q4_0", "per-expert"))
    assert "no checksums" in report and "experts per-expert" in report and "Q4_0 x" in report
    assert f"vocab {SMALL_VOCAB}" in report


BAD_FIELDS = [
    ({"general.architecture": ("gpt2", VType.STRING)}, "general.architecture is 'gpt2'"),
    ({"llama.expert_count": None}, "llama.expert_count is missing: a dense llama"),
    ({"llama.embedding_length": None}, "llama.embedding_length is missing"),
    ({"llama.block_count": ("2", VType.STRING)}, "llama.block_count has type STRING, expected an integer"),
    ({"llama.feed_forward_length": (128, VType.UINT32)}, "ffn_gate_exps.weight has shape [4, 96, 64], expected [4, 128, 64]"),
    ({"llama.attention.head_count_kv": (3, VType.UINT32)}, "is not a multiple of num_key_value_heads"),
    ({"llama.expert_used_count": (5, VType.UINT32)}, "llama.expert_used_count is 5, outside [1, 4]"),
    ({"llama.attention.layer_norm_rms_epsilon": (float("nan"), VType.FLOAT32)}, "is nan"),
    ({"llama.vocab_size": (301, VType.UINT32)}, "llama.vocab_size is 301"),
    ({"tokenizer.ggml.tokens": (["a", "b"], VType.ARRAY, VType.STRING)}, "llama.vocab_size is 300, outside [2, 2]"),
    ({"tokenizer.ggml.bos_token_id": (500, VType.UINT32)}, "tokenizer.ggml.bos_token_id is 500"),
    ({"split.count": (3, VType.UINT16)}, "split.count is 3: one part of a split GGUF"),
]


@pytest.mark.parametrize("fields,message", BAD_FIELDS, ids=[m for _, m in BAD_FIELDS])
def test_bad_metadata_is_one_line(files, tmp_path, fields, message):
    bad = rewrite_gguf(files.gguf(), tmp_path / "bad.gguf", fields)
    with pytest.raises(MixtralOffloadError, match=str(bad)) as caught:
        GGUFModel.open(bad)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("fields,message", [
    ({"tokenizer.ggml.model": ("gpt2", VType.STRING)}, "tokenizer.ggml.model is 'gpt2'"),
    ({"tokenizer.ggml.eos_token_id": (5, VType.UINT32)}, "eos_token_id is token 5 of type BYTE, expected CONTROL"),
    ({"tokenizer.ggml.scores": ([0.0] * 299, VType.ARRAY, VType.FLOAT32)}, "scores has 299 entries, expected 300"),
])
def test_bad_tokenizer_metadata(files, tmp_path, fields, message):
    model = GGUFModel.open(rewrite_gguf(files.gguf(), tmp_path / "bad.gguf", fields))
    with pytest.raises(MixtralOffloadError, match=message):
        model.tokenizer()


def test_missing_tensor(files, tmp_path):
    bad = rewrite_gguf(files.gguf(), tmp_path / "bad.gguf", drop_tensors=("blk.1.attn_k.weight",))
    with pytest.raises(MixtralOffloadError, match="tensor blk.1.attn_k.weight is missing"):
        GGUFModel.open(bad)
    tied = rewrite_gguf(files.gguf(), tmp_path / "tied.gguf", drop_tensors=("output.weight",))
    assert GGUFModel.open(tied).args.tie_word_embeddings


def test_not_a_gguf(tmp_path):
    import os

    fifo, empty, text = tmp_path / "fifo.gguf", tmp_path / "empty.gguf", tmp_path / "text.gguf"
    os.mkfifo(fifo)
    empty.write_bytes(b"")
    text.write_text("hello, not a model")
    cases = {fifo: "not a regular file", tmp_path: "not a regular file", tmp_path / "none.gguf": "file not found",
             empty: "not a readable GGUF", text: "not a readable GGUF"}
    for path, message in cases.items():
        with pytest.raises(MixtralOffloadError, match=message):
            GGUFModel.open(path)
