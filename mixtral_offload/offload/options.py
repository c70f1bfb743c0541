"""How a model is loaded: every choice, its default and its check in one frozen dataclass.

The CLI builds its load options from these fields and choice lists; `load()` takes a LoadOptions (or
its fields as keywords) and never validates a choice again.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..cache.miss_choice import RULES
from ..cache.policies import DEFAULT_POLICY, OFFLINE_POLICIES, POLICIES
from ..config import parse_size
from ..errors import MixtralOffloadError
from ..quant.format import ACTIVATIONS

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
DENSE_FORMATS = ("auto", "stored", "int8")     # how the attention and output weights are held
DEVICE_FORMATS = ("dequantize", "nf4")         # how device slots hold an expert
MISS_BITS = ("off", *RULES)                    # low-bit misses: never, or by a rule (cache/miss_choice.py)
ONLINE_POLICIES = tuple(name for name in POLICIES if name not in OFFLINE_POLICIES)

CHOICES = {"dtype": DTYPES, "device": DEVICES, "dense": DENSE_FORMATS, "device_format": DEVICE_FORMATS,
           "activations": ACTIVATIONS, "policy": ONLINE_POLICIES,
           "miss_bits": MISS_BITS}


@dataclass(frozen=True)
class LoadOptions:
    """Every option of `load()`; sizes are bytes or strings such as '6GiB'."""

    dtype: str = "auto"                    # compute dtype of the dense weights; auto: as stored
    max_context: int | None = None         # KV cache length; None: min(4096, the model's maximum)
    memory_budget: int | str | None = None # ceiling of RSS (VRAM with device cuda): experts are cached in what is left
    ram_budget: int | str | None = None    # with device cuda: ceiling of host memory
    experts_fraction: float | None = None  # instead of a budget: size the cache to this fraction of the experts
    policy: str = DEFAULT_POLICY          # expert cache eviction (cache/policies.py)
    prefetch: bool = True                  # read the next layer's likely experts while this layer computes
    device: str = "auto"                   # auto: CUDA when torch sees a GPU
    activations: str = "int8"              # the CPU kernels' input: int8 per group, or float32 (exact)
    dense: str = "auto"                    # auto: int8 for a converted model on the CPU, else stored
    device_format: str = "dequantize"      # device slots: the pool's blocks, or bitsandbytes NF4
    record_trace: bool = False             # record the routing trace (a cache that holds every expert)
    release_pages: bool = False            # without a cache: drop each expert's mapped pages after use
    routing_trace: str | None = None       # a routing trace file whose choices replace the router's (benchmarks)
    miss_bits: str = "auto"                # cache misses the rule picks read the pool's low-bit copy (not auto: it must exist)

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise MixtralOffloadError(f"unknown {name.replace('_', ' ')} {getattr(self, name)!r}: "
                                          f"use {', '.join(allowed)}")
        for name in ("memory_budget", "ram_budget"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, parse_size(getattr(self, name)))
        if self.experts_fraction is not None and not 0 < self.experts_fraction <= 1:
            raise MixtralOffloadError("experts fraction must be in (0, 1]")
        if self.experts_fraction is not None and self.memory_budget is not None:
            raise MixtralOffloadError("give a memory budget or an experts fraction, not both")

    @property
    def cached(self) -> bool:
        """Whether experts go through the expert cache (else they are computed where they lie)."""
        return self.memory_budget is not None or self.experts_fraction is not None or self.record_trace
