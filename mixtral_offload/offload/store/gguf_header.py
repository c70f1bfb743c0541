"""Opening a GGUF header safely: the gguf package's own reader, with guards against damaged files.

Typed access to the metadata fields, and the ModelArgs of a Mixtral GGUF (architecture "llama" with
llama.expert_count). Every failure is one MixtralOffloadError line naming the file and the field.
"""
from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VType

from ...config import ModelArgs
from ...errors import MixtralOffloadError

MAX_ARRAY_ENTRIES = 1 << 20   # a metadata array longer than this is refused (vocabularies hold < 300k)
MAX_TENSOR_DIMS = 4           # GGML_MAX_DIMS

# Tensor types this reader accepts: those gguf.quants dequantizes (tests/test_gguf_reader.py checks it).
READABLE_TYPES = frozenset((
    QType.F32, QType.F16, QType.BF16, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
    QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ1_S, QType.IQ1_M, QType.IQ2_XXS,
    QType.IQ2_XS, QType.IQ2_S, QType.IQ3_XXS, QType.IQ3_S, QType.IQ4_NL, QType.IQ4_XS))
_READABLE_NUMBERS = frozenset(int(t) for t in READABLE_TYPES)

_INT_TYPES = frozenset((VType.UINT8, VType.INT8, VType.UINT16, VType.INT16, VType.UINT32, VType.INT32,
                        VType.UINT64, VType.INT64))
_FLOAT_TYPES = frozenset((VType.FLOAT32, VType.FLOAT64))
# Exceptions GGUFReader raises on a damaged file (UnicodeDecodeError is a ValueError).
_READER_ERRORS = (ValueError, KeyError, IndexError, OverflowError, TypeError, OSError)


class GuardedReader(gguf.GGUFReader):
    """GGUFReader refusing reads past the end of the file, over-long or nested arrays, and > 4 dims.

    Unguarded, a flipped array length makes the reader loop over empty reads past the end (a hang),
    and a flipped dimension count builds a list as long as the file.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        offset, count = int(offset), int(count)
        end = offset + np.dtype(dtype).itemsize * count
        if offset < 0 or count < 0 or end > len(self.data):
            raise ValueError(f"a read of {count} x {np.dtype(dtype).name} at byte {offset} "
                             f"runs past the end of the file ({len(self.data)} bytes)")
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type == VType.ARRAY:
            item_type = int(self._get(orig_offs, np.uint32)[0])
            length = int(self._get(orig_offs + 4, np.uint64)[0])
            if item_type == VType.ARRAY:
                raise ValueError(f"a nested metadata array at byte {orig_offs}")
            if length > MAX_ARRAY_ENTRIES:
                raise ValueError(f"a metadata array of {length} entries at byte {orig_offs} "
                                 f"(more than {MAX_ARRAY_ENTRIES})")
            scalar = self.gguf_scalar_to_np.get(item_type)
            least_bytes = length * (8 if item_type == VType.STRING or scalar is None else np.dtype(scalar).itemsize)
            if orig_offs + 12 + least_bytes > len(self.data):
                raise ValueError(f"a metadata array of {length} entries at byte {orig_offs} "
                                 f"runs past the end of the file ({len(self.data)} bytes)")
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_tensors(self, start_offs, fields):
        for field in fields:
            n_dims, raw_type = int(field.parts[2][0]), int(field.parts[4][0])
            if not 1 <= n_dims <= MAX_TENSOR_DIMS:
                raise ValueError(f"tensor {field.name} has {n_dims} dimensions")
            if raw_type not in _READABLE_NUMBERS:
                raise ValueError(f"tensor {field.name} has type {_qtype_name(raw_type)}, which this reader does not know")
        super()._build_tensors(start_offs, fields)


def open_reader(path: Path) -> GuardedReader:
    """Map a GGUF file and parse its header; a missing, special or damaged file is one error line."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise MixtralOffloadError(f"{path}: file not found") from None
    except OSError as exc:
        raise MixtralOffloadError(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise MixtralOffloadError(f"{path}: not a regular file")
    try:
        reader = GuardedReader(path)
    except _READER_ERRORS as exc:
        raise MixtralOffloadError(f"{path}: not a readable GGUF file ({exc})") from None
    if reader.byte_order != "I":
        raise MixtralOffloadError(f"{path}: a GGUF of the other byte order (big-endian): not supported")
    return reader


class Metadata:
    """Typed, range-checked reads of a GGUF's metadata fields."""

    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self.reader, self.path = reader, path

    def fail(self, key: str, problem: str) -> MixtralOffloadError:
        return MixtralOffloadError(f"{self.path}: metadata {key} {problem}")

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def _scalar(self, key: str, kinds: frozenset, kind_name: str, default: Any) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is None:
                raise self.fail(key, "is missing")
            return default
        if len(field.types) != 1 or field.types[0] not in kinds:
            raise self.fail(key, f"has type {_type_name(field.types)}, expected {kind_name}")
        if field.types[0] == VType.STRING:
            try:
                return bytes(field.parts[-1]).decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail(key, "is not valid UTF-8") from None
        value = field.parts[-1][0]
        # a float32 as the decimal it was written from (1e-05, not 9.99999974e-06)
        return float(str(value)) if field.types[0] == VType.FLOAT32 else value.item()

    def integer(self, key: str, low: int, high: int, default: int | None = None) -> int:
        """An integer field in [low, high]; default when absent (None: required)."""
        value = int(self._scalar(key, _INT_TYPES, "an integer", default))
        if not low <= value <= high:
            raise self.fail(key, f"is {value}, outside [{low}, {high}]")
        return value

    def number(self, key: str, low: float, high: float, default: float | None = None) -> float:
        """A finite float field in (low, high]; default when absent (None: required)."""
        value = float(self._scalar(key, _FLOAT_TYPES, "a float", default))
        if not (math.isfinite(value) and low < value <= high):
            raise self.fail(key, f"is {value}, outside ({low}, {high}]")
        return value

    def string(self, key: str, default: str | None = None) -> str:
        """A string field; default when absent (None: required)."""
        return self._scalar(key, frozenset((VType.STRING,)), "a string", default)

    def boolean(self, key: str, default: bool) -> bool:
        """A bool field; default when absent."""
        return bool(self._scalar(key, frozenset((VType.BOOL,)), "a bool", default))

    def array(self, key: str, kinds: frozenset, kind_name: str, length: int | None = None) -> list:
        """A required array field of one item kind, of the given length when given."""
        field = self.reader.fields.get(key)
        if field is None:
            raise self.fail(key, "is missing")
        if field.types[0] != VType.ARRAY or len(field.types) != 2 or field.types[1] not in kinds:
            raise self.fail(key, f"has type {_type_name(field.types)}, expected an array of {kind_name}")
        if length is not None and len(field.data) != length:
            raise self.fail(key, f"has {len(field.data)} entries, expected {length}")
        if field.types[1] == VType.STRING:
            try:
                return [bytes(field.parts[index]).decode("utf-8") for index in field.data]
            except UnicodeDecodeError:
                raise self.fail(key, "holds a string that is not valid UTF-8") from None
        return np.concatenate([field.parts[index] for index in field.data]).tolist()

    def strings(self, key: str, length: int | None = None) -> list[str]:
        return self.array(key, frozenset((VType.STRING,)), "strings", length)

    def floats(self, key: str, length: int | None = None) -> list[float]:
        return self.array(key, _FLOAT_TYPES, "floats", length)

    def integers(self, key: str, length: int | None = None) -> list[int]:
        return self.array(key, _INT_TYPES, "integers", length)


def _qtype_name(raw_type: int) -> str:
    try:
        return QType(raw_type).name
    except ValueError:
        return f"number {raw_type}"


def _type_name(types: list) -> str:
    return "[" + ", ".join(VType(t).name for t in types) + "]" if len(types) > 1 else VType(types[0]).name


_STORAGE_DTYPES = {QType.F32: "float32", QType.F16: "float16", QType.BF16: "bfloat16"}


def model_args(meta: Metadata, vocab_size: int, embed_type: QType, tied: bool) -> ModelArgs:
    """ModelArgs of a Mixtral GGUF from its llama.* metadata.

    vocab_size counts the tokenizer's tokens; embed_type (the embedding table's type) decides the
    storage dtype: the float type it is stored in, float16 for a quantized table.
    """
    architecture = meta.string("general.architecture")
    if architecture != "llama":
        raise meta.fail("general.architecture", f"is {architecture!r}: only Mixtral ('llama' with experts) is supported")
    if not meta.has("llama.expert_count"):
        raise meta.fail("llama.expert_count", "is missing: a dense llama model, not a Mixtral mixture of experts")
    hidden = meta.integer("llama.embedding_length", 1, 1 << 16)
    heads = meta.integer("llama.attention.head_count", 1, 1024)
    head_dim = meta.integer("llama.attention.key_length", 2, 1024, default=hidden // heads or 1)
    if meta.integer("llama.attention.value_length", 1, 1024, default=head_dim) != head_dim:
        raise meta.fail("llama.attention.value_length", f"differs from the key length {head_dim}")
    if head_dim % 2:
        raise meta.fail("llama.attention.key_length", f"is {head_dim}: RoPE needs an even head size")
    if meta.integer("llama.rope.dimension_count", 1, 1024, default=head_dim) != head_dim:
        raise meta.fail("llama.rope.dimension_count", f"differs from the head size {head_dim}: partial RoPE is not supported")
    if meta.string("llama.rope.scaling.type", default="none") != "none":
        raise meta.fail("llama.rope.scaling.type", "is set: RoPE scaling is not supported")
    experts = meta.integer("llama.expert_count", 1, 1024)
    values = dict(
        vocab_size=meta.integer("llama.vocab_size", vocab_size, vocab_size, default=vocab_size),
        hidden_size=hidden,
        intermediate_size=meta.integer("llama.feed_forward_length", 1, 1 << 18),
        num_hidden_layers=meta.integer("llama.block_count", 1, 1024),
        num_attention_heads=heads,
        num_key_value_heads=meta.integer("llama.attention.head_count_kv", 1, heads, default=heads),
        head_dim=head_dim,
        max_position_embeddings=meta.integer("llama.context_length", 1, 1 << 24),
        rms_norm_eps=meta.number("llama.attention.layer_norm_rms_epsilon", 0.0, 1.0),
        rope_theta=meta.number("llama.rope.freq_base", 0.0, 1e12, default=10000.0),  # llama.cpp's default
        num_local_experts=experts,
        num_experts_per_tok=meta.integer("llama.expert_used_count", 1, experts),
        tie_word_embeddings=tied,
        torch_dtype=_STORAGE_DTYPES.get(embed_type, "float16"),
        bos_token_id=meta.integer("tokenizer.ggml.bos_token_id", 0, vocab_size - 1, default=1),
        eos_token_id=meta.integer("tokenizer.ggml.eos_token_id", 0, vocab_size - 1, default=2),
    )
    try:
        return ModelArgs(**values)
    except MixtralOffloadError as exc:
        raise MixtralOffloadError(f"{meta.path}: {exc}") from None
