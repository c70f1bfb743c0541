"""Model hyper-parameters read from a checkpoint's config.json, and human size strings."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import MixtralOffloadError
from .validate import bool_field, float_field, int_field, read_json_object, show, str_field

_MAX_DIM = 1 << 20  # far above any released model's width; bounds the memory a config can ask for
_INT_RANGES = {  # field: (lowest, highest) accepted from config.json
    "vocab_size": (1, 1 << 22), "hidden_size": (1, _MAX_DIM), "intermediate_size": (1, _MAX_DIM),
    "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024),
    "max_position_embeddings": (1, 1 << 24), "num_local_experts": (1, 1024), "num_experts_per_tok": (1, 1024),
    "bos_token_id": (0, 1 << 22), "eos_token_id": (0, 1 << 22),
}


@dataclass(frozen=True)
class ModelArgs:
    """Mixtral hyper-parameters, named as in HF config.json."""

    vocab_size: int = 32000
    hidden_size: int = 4096            # D: width of the residual stream
    intermediate_size: int = 14336     # I: width of one expert's SwiGLU
    num_hidden_layers: int = 32        # L
    num_attention_heads: int = 32      # H: query heads
    num_key_value_heads: int = 8       # KV heads (GQA: H is a multiple of it)
    head_dim: int | None = None        # defaults to hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    num_local_experts: int = 8         # E
    num_experts_per_tok: int = 2       # K: top-k routing
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"      # the checkpoint's storage dtype
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        for name, (low, high) in _INT_RANGES.items():
            int_field(getattr(self, name), name, low, high)
        # stored as floats: an integer rope_theta of 2**64 would overflow torch's pow
        object.__setattr__(self, "rms_norm_eps", float_field(self.rms_norm_eps, "rms_norm_eps", 0, 1, low_open=True))
        object.__setattr__(self, "rope_theta", float_field(self.rope_theta, "rope_theta", 0, low_open=True))
        bool_field(self.tie_word_embeddings, "tie_word_embeddings")
        str_field(self.torch_dtype, "torch_dtype")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise MixtralOffloadError(f"hidden_size ({self.hidden_size}) is not a multiple of "
                                          f"num_attention_heads ({self.num_attention_heads}): give head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        int_field(self.head_dim, "head_dim", 2, 1 << 14)
        if self.head_dim % 2:
            raise MixtralOffloadError(f"head_dim ({self.head_dim}) must be even (rotary embeddings pair dimensions)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MixtralOffloadError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise MixtralOffloadError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                f"num_local_experts ({self.num_local_experts})")
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                raise MixtralOffloadError(f"{name} ({getattr(self, name)}) is outside the vocabulary "
                                          f"of {self.vocab_size}")

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelArgs":
        """Build from a config.json dict: original Mixtral keys or transformers 5 keys; unknown keys dropped."""
        model_type = raw.get("model_type", "mixtral")
        if model_type != "mixtral":
            raise MixtralOffloadError(f"model_type is {model_type!r}, not 'mixtral': only Mixtral checkpoints are supported")
        values = dict(raw)
        rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
        if "rope_theta" not in values and isinstance(rope, dict) and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if "torch_dtype" not in values and "dtype" in values:
            values["torch_dtype"] = values["dtype"]
        if isinstance(values.get("eos_token_id"), list):  # several stop ids: the first is </s>
            if not values["eos_token_id"]:
                raise MixtralOffloadError("eos_token_id is an empty list")
            values["eos_token_id"] = values["eos_token_id"][0]
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in values.items() if k in names and v is not None}
        try:
            return cls(**kept)
        except TypeError as exc:
            raise MixtralOffloadError(str(exc)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        """Read a config.json file; a bad field is an error naming the file."""
        raw = read_json_object(path)
        try:
            return cls.from_dict(raw)
        except MixtralOffloadError as exc:
            raise MixtralOffloadError(f"{path}: {exc}") from None

    def to_dict(self) -> dict:
        """The HF config.json form (original Mixtral key names)."""
        out = dataclasses.asdict(self)
        out.update(model_type="mixtral", architectures=["MixtralForCausalLM"])
        return out

    @property
    def expert_params(self) -> int:
        """Parameters in one expert (w1, w3, w2)."""
        return 3 * self.hidden_size * self.intermediate_size


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from a size such as '6GiB', '6000MB', '512M' or '1048576'."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] >= 2**63:
        raise MixtralOffloadError(f"cannot read size {show(text)}: use a number with a unit, e.g. 6GiB or 6000MB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(num_bytes: float) -> str:
    """A short human form of a byte count, e.g. '1.50 GiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{int(num_bytes)} B"
