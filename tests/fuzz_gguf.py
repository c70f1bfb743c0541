"""The GGUF surface of the input fuzzer: one damaged copy of a small valid GGUF (header fields, metadata,
tensor infos, alignment, tokenizer arrays, truncation, data bytes and block scales), then `verify`, a load
and a forward pass, judged against the undamaged file.

A GGUF holds no checksums: a file that stays valid but describes another model (other weight bytes,
hyperparameters or vocabulary) cannot be told from the original, so different results from a different
description are `unchecked`; `silent-wrong` is different results from a file that, as the loader reads
it, describes the same model.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VType
from gguf_files import finish, random_expert_blocks, rewrite_gguf, start_writer

from mixtral_offload.demo import DEMO_DIR
from mixtral_offload.offload.loading import load
from mixtral_offload.offload.store.gguf import MERGED_EXPERTS, PER_EXPERT, GGUFModel, verify_gguf
from mixtral_offload.quant.gguf_blocks import block_type

CONFIG = dict(vocab_size=260, hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
              rms_norm_eps=1e-5, rope_theta=1e6)
# name -> (dense type, expert type, expert layout, general.alignment key or None)
VARIANTS = {"q8_0 merged": (QType.F16, QType.Q8_0, "merged", None),
            "q4_k per-expert": (QType.Q8_0, QType.Q4_K, "per-expert", 64),
            "q4_0 merged": (QType.F32, QType.Q4_0, "merged", 32)}
PROBE_IDS = [1, 100, 259, 7, 42, 255]
PROBE_TEXT = "Hello world: a probe, with ünïcode and digits 123."
HALF_NAN, HALF_INF, HALF_NEG_INF, HALF_MAX = 0x7e00, 0x7c00, 0xfc00, 0x7bff
INTEGERS = [0, 1, 2, 3, 5, 7, 8, 12, 13, 31, 32, 33, 63, 64, 255, 256, 4096, (1 << 31) - 1, 1 << 31, (1 << 32) - 1,
            1 << 32, 1 << 62, 1 << 63, (1 << 64) - 1]
FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1e-45, 1e-30, 1.0, 1e6, 1e30, 3.4e38]
EXTRA_KEYS = ["general.alignment", "llama.rope.scaling.type", "split.count", "llama.attention.key_length",
              "llama.attention.value_length", "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.padding_token_id"]
INT_KINDS = [VType.UINT8, VType.INT8, VType.UINT16, VType.INT16, VType.UINT32, VType.INT32, VType.UINT64, VType.INT64]


@dataclass
class GGUFBase:
    """One undamaged GGUF, where each of its header values lies, and what it computes and describes."""

    path: Path
    data: bytes
    data_offset: int                     # where the tensor data starts
    values: list[tuple[int, int, str]]   # (offset, bytes, what) of every header number: counts, types, dims, offsets
    tensors: list[tuple[str, QType, int, int]]   # (name, type, offset, bytes)
    alignment: int
    logits: dict[bool, torch.Tensor]     # with an expert cache (True) and without
    ids: list[int]
    description: tuple


def write_variant(out: Path, dense_type: QType, expert_type: QType, layout: str, alignment: int | None) -> Path:
    """A random Mixtral GGUF of CONFIG's shape: dense tensors of dense_type, experts of expert_type."""
    rng = np.random.default_rng(7)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # workers may write the same file at once
    writer = start_writer(tmp, CONFIG, DEMO_DIR / "tokenizer.model", gguf.LlamaFileType.MOSTLY_F16, "fuzz")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    D, I, L, E = (CONFIG[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts"))
    hd, kv = D // CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"]

    def dense(name: str, *shape: int) -> None:
        weight = rng.standard_normal(shape, dtype=np.float32) * 0.05
        if dense_type == QType.F16:
            writer.add_tensor(name, weight.astype(np.float16))
        elif dense_type == QType.F32:
            writer.add_tensor(name, weight)
        else:
            writer.add_tensor(name, gguf.quants.quantize(weight, dense_type), raw_dtype=dense_type)

    dense("token_embd.weight", CONFIG["vocab_size"], D)
    writer.add_tensor("output_norm.weight", np.ones(D, np.float32))
    dense("output.weight", CONFIG["vocab_size"], D)
    for i in range(L):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(D, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(D, np.float32))
        for name, rows, cols in (("attn_q", D, D), ("attn_k", kv * hd, D), ("attn_v", kv * hd, D),
                                 ("attn_output", D, D)):
            dense(f"blk.{i}.{name}.weight", rows, cols)
        writer.add_tensor(f"blk.{i}.ffn_gate_inp.weight", rng.standard_normal((E, D), dtype=np.float32))
        for index, (part, shape) in enumerate((("gate", (I, D)), ("up", (I, D)), ("down", (D, I)))):
            blocks = [random_expert_blocks(expert_type, shape, 100 * i + 10 * e + index, 0.05) for e in range(E)]
            if layout == "merged":
                writer.add_tensor(MERGED_EXPERTS.format(layer=i, part=part), np.stack(blocks), raw_dtype=expert_type)
            else:
                for e in range(E):
                    writer.add_tensor(PER_EXPERT.format(layer=i, part=part, expert=e), blocks[e], raw_dtype=expert_type)
    return finish(writer, tmp, out)


def describe(path: Path) -> tuple:
    """What the loader reads the file to be: hyperparameters, vocabulary, and every tensor with its bytes."""
    model = GGUFModel.open(path)
    tensors = tuple(sorted((t.name, int(t.tensor_type), tuple(int(d) for d in t.shape),
                            hashlib.sha1(np.asarray(model.reader.data[t.data_offset:t.data_offset + t.n_bytes])).digest())
                           for t in model.reader.tensors))
    return model.args, model.tokenizer_model(), tensors


def make_gguf_bases(root: Path) -> dict[str, GGUFBase]:
    """Every variant in root (written unless an earlier call did), with its reference results."""
    bases = {}
    for name, variant in VARIANTS.items():
        path = root / (name.replace(" ", "-") + ".gguf")
        if not path.exists():
            write_variant(path, *variant)
        reader = gguf.GGUFReader(path)
        start = reader.data.ctypes.data
        values = [(0, 4, "magic"), (4, 4, "version"), (8, 8, "tensor count"), (16, 8, "metadata count")]
        for field in reader.fields.values():
            if not field.name.startswith("GGUF."):
                values += [(part.ctypes.data - start, part.nbytes, f"{field.name} part {i}")
                           for i, part in enumerate(field.parts[:6]) if part.dtype.itemsize >= 4]
        for tensor in reader.tensors:
            values += [(part.ctypes.data - start + k * part.dtype.itemsize, part.dtype.itemsize,
                        f"tensor {tensor.name} part {i}")
                       for i, part in enumerate(tensor.field.parts) if i != 1 for k in range(len(part))]
        tensors = [(t.name, t.tensor_type, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
        logits = {cached: load_variant(path, cached).logits(PROBE_IDS) for cached in (False, True)}
        bases[name] = GGUFBase(path, path.read_bytes(), int(reader.data_offset), values, tensors, int(reader.alignment),
                               logits, load(path).tokenizer.encode(PROBE_TEXT), describe(path))
    return bases


def load_variant(path: Path, cached: bool):
    """The file loaded with an expert cache of half the experts (reads through the cache) or computing on the mapping."""
    return load(path, experts_fraction=0.5) if cached else load(path)


# -- mutators: each returns the damaged file's bytes and what it touched ('header' or 'data') --------------
def put(data: bytearray, offset: int, size: int, value: int) -> None:
    data[offset:offset + size] = (value % (1 << 8 * size)).to_bytes(size, "little")


def header_value(base: GGUFBase, rng: np.random.Generator) -> tuple[bytes, str]:
    """A count, length, type tag, dimension, tensor type or offset replaced by a boundary or related value."""
    data = bytearray(base.data)
    for _ in range(int(rng.integers(1, 3))):
        offset, size, what = base.values[int(rng.integers(0, len(base.values)))]
        old = int.from_bytes(data[offset:offset + size], "little")
        tensor_offsets = [t[2] - base.data_offset for t in base.tensors]
        choices = INTEGERS + [old + 1, old - 1, old * 2, old // 2, old + base.alignment, old + 1 + base.alignment,
                              len(data), len(data) - base.data_offset, *rng.choice(tensor_offsets, 2)]
        put(data, offset, size, int(choices[int(rng.integers(0, len(choices)))]))
    return bytes(data), "header"


def header_bytes(base: GGUFBase, rng: np.random.Generator) -> tuple[bytes, str]:
    """Bytes flipped, set, cut, inserted or zeroed in the header (names and strings included)."""
    from fuzz_surfaces import mutate_bytes

    return mutate_bytes(base.data, rng, 0, base.data_offset), "header"


def truncated(base: GGUFBase, rng: np.random.Generator) -> tuple[bytes, str]:
    """The file cut short inside the header, at the data's start, or inside a tensor."""
    where = int(rng.integers(0, 3))
    if where == 0:
        end = int(rng.integers(0, base.data_offset + 1))
    elif where == 1:
        end = base.data_offset + int(rng.integers(-8, 9))
    else:
        _, _, start, nbytes = base.tensors[int(rng.integers(0, len(base.tensors)))]
        end = start + int(rng.integers(0, nbytes + 1))
    return base.data[:end], "header" if end < base.data_offset else "data"


def data_bytes(base: GGUFBase, rng: np.random.Generator) -> tuple[bytes, str]:
    """Weight bytes changed: flipped or random bytes, or a block scale (or float weight) set to NaN, inf or big."""
    from fuzz_surfaces import mutate_bytes

    if rng.random() < 0.4:
        return mutate_bytes(base.data, rng, base.data_offset), "data"
    data = bytearray(base.data)
    name, qtype, start, nbytes = base.tensors[int(rng.integers(0, len(base.tensors)))]
    value = [HALF_NAN, HALF_INF, HALF_NEG_INF, HALF_MAX, 0][int(rng.integers(0, 5))]
    for _ in range(int(rng.integers(1, 4))):
        if qtype == QType.F32:
            where = start + 4 * int(rng.integers(0, nbytes // 4))
            data[where:where + 4] = np.array([value], np.uint16).view(np.float16).astype(np.float32).tobytes()
        elif qtype in (QType.F16, QType.BF16):
            put(data, start + 2 * int(rng.integers(0, nbytes // 2)), 2, value)
        else:
            bt = block_type(qtype)
            block = start + bt.block_bytes * int(rng.integers(0, nbytes // bt.block_bytes))
            put(data, block + int(rng.choice(bt.f16_fields)), 2, value)
    return bytes(data), "data"


def metadata_value(base: GGUFBase, rng: np.random.Generator) -> tuple[bytes, str]:
    """A metadata field dropped, or rewritten with another type, value or array length (a valid file)."""
    reader = gguf.GGUFReader(base.path)
    keys = [key for key in reader.fields if not key.startswith("GGUF.") and key != "general.architecture"]
    keys += EXTRA_KEYS + ["tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"] * 3
    key = keys[int(rng.integers(0, len(keys)))]
    field = reader.fields.get(key)
    old = field.contents() if field is not None else None
    kind = int(rng.integers(0, 7))
    if kind == 0:
        new = None
    elif kind == 1:
        value = int(rng.choice(INTEGERS[:18]))
        new = (value, INT_KINDS[int(rng.integers(4 if value > 127 else 0, len(INT_KINDS)))])
    elif kind == 2:
        new = (float(rng.choice(FLOATS)), [VType.FLOAT32, VType.FLOAT64][int(rng.integers(0, 2))])
    elif kind == 3:
        new = ([True, False][int(rng.integers(0, 2))], VType.BOOL)
    elif kind == 4:
        text = ["", "llama", "none", "linear", "gpt2", "x" * 70000, b"\xff\xfe", "mixtral"][int(rng.integers(0, 8))]
        new = (text, VType.STRING)
    elif isinstance(old, list) and old and kind == 5:  # another length
        length = [len(old) - 1, len(old) + 1, 2, 1, len(old) // 2][int(rng.integers(0, 5))]  # gguf writes no empty array
        new = ((old * 2)[:length], VType.ARRAY, field.types[-1])
    elif isinstance(old, list) and old:  # the same length, another item type
        others = [kind for kind in (VType.STRING, VType.INT32, VType.FLOAT32) if kind != field.types[-1]]
        item_type = others[int(rng.integers(0, len(others)))]
        values = [str(x) for x in old] if item_type == VType.STRING else [i % 5 for i in range(len(old))]
        new = (values if item_type != VType.FLOAT32 else [float(v) for v in values], VType.ARRAY, item_type)
    else:
        new = ([1, 2, 3], VType.ARRAY, VType.INT32)
    out = base.path.with_name(f"rewrite-{rng.integers(1 << 62)}.gguf")
    try:
        rewrite_gguf(base.path, out, {key: new})
        return out.read_bytes(), "header"
    finally:
        out.unlink(missing_ok=True)


MUTATORS = [header_value, header_value, header_bytes, truncated, data_bytes, data_bytes, metadata_value]


def run_gguf(path: Path, base: GGUFBase, region: str, cached: bool) -> tuple[str, str]:
    """verify, load (with an expert cache or on the mapping), compute the probe: the outcome if nothing raised."""
    verify_gguf(path)
    runtime = load_variant(path, cached)
    if (torch.equal(runtime.logits(PROBE_IDS), base.logits[cached])
            and runtime.tokenizer.encode(PROBE_TEXT) == base.ids):
        return "accepted", ""
    return ("unchecked", region) if describe(path) != base.description else ("silent-wrong", region)


def gguf_case(bases: dict[str, GGUFBase], work: Path, rng: np.random.Generator) -> tuple[str, str]:
    from fuzz_surfaces import guarded

    base = list(bases.values())[int(rng.integers(0, len(bases)))]
    mutator = MUTATORS[int(rng.integers(0, len(MUTATORS)))]
    damaged, region = mutator(base, rng)
    path = work / "damaged.gguf"
    path.write_bytes(damaged)
    cached = bool(rng.random() < 0.3)
    outcome, detail = guarded(lambda: run_gguf(path, base, region, cached))
    return outcome, detail if outcome == "unchecked" else f"{mutator.__name__} {base.path.name}: {detail}"
