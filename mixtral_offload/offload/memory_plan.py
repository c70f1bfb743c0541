"""Planning resident memory under --memory-budget: what is fixed, and how many expert slots fit."""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import psutil

from ..config import ModelArgs, format_size
from ..errors import MixtralOffloadError
from ..quant.linear import is_quantized_dense, quantized_dense_bytes
from .mapped_embedding import FAULT_AROUND_BYTES
from .store.checkpoint import dense_shapes

# Allocator slack, thread stacks and library scratch not visible in any tensor size; measured on
# tiny models as the gap between the plan and the peak RSS of a budgeted child process.
SLACK_BYTES = 64 << 20


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of each resident part; `slots` expert slots of `slot_bytes` fill what the budget leaves."""

    budget: int
    baseline: int        # RSS after imports and kernel loading, before any weight
    dense: int           # attention, norms, router, embeddings, lm_head in the compute dtype
    kv_cache: int
    work: int            # activations, logits and attention scores of one prefill chunk, a prompt's
                         # hidden states, plus slack
    slot_bytes: int
    slots: int
    min_slots: int       # top_k plus the prefetch slots
    total_experts: int
    scratch: int = 0     # buffers misses read the low-bit copy into (--miss-bits): top_k of its block
    scratch_buffers: int = 0

    @property
    def fixed(self) -> int:
        """Everything but the expert slots."""
        return self.baseline + self.dense + self.kv_cache + self.work + self.scratch

    @property
    def minimum_budget(self) -> int:
        """The smallest budget that holds the minimum working set."""
        return self.fixed + self.min_slots * self.slot_bytes

    def describe(self) -> str:
        """A small table of the plan, for -v."""
        rows = [("budget", self.budget), ("baseline (after imports)", self.baseline), ("dense weights", self.dense),
                ("KV cache", self.kv_cache), ("work buffers", self.work),
                *([(f"low-bit miss buffers: {self.scratch_buffers} x "
                    f"{format_size(self.scratch // self.scratch_buffers)}", self.scratch)] if self.scratch else []),
                (f"expert slots: {self.slots} x {format_size(self.slot_bytes)} "
                 f"({self.slots}/{self.total_experts} experts)", self.slots * self.slot_bytes)]
        return "\n".join(f"  {name:<44} {format_size(value):>12}" for name, value in rows)


def work_bytes(args: ModelArgs, max_context: int, chunk: int, itemsize: int, score_chunk: int) -> int:
    """Peak transient bytes of a prompt fed layer by layer in pieces of `chunk` tokens (a prompt keeps only
    its last logits; scoring a text keeps every position's, `score_chunk` tokens at a time)."""
    D, I, V, H = args.hidden_size, args.intermediate_size, args.vocab_size, args.num_attention_heads
    logits = 3 * max(1, score_chunk) * V * 4         # logits, log-softmax, a copy
    scores = 2 * H * chunk * max_context * 4         # attention scores and probabilities
    activations = chunk * (4 * I + 12 * D) * 4       # expert intermediates and residual copies, float32
    hidden = max_context * D * itemsize              # the whole prompt's hidden states between layers
    rope = 2 * max_context * args.head_dim * 4
    return logits + scores + activations + hidden + rope + SLACK_BYTES


def dense_nbytes(args: ModelArgs, itemsize: int, quantized: bool, mapped_embedding: bool = False,
                 chunk: int = 256) -> int:
    """Bytes the dense weights take resident: itemsize per weight, or int8 per group where quantized;
    a mapped embedding table only the rows one prefill chunk looks up (its pages are released after)."""
    total = 0
    for name, shape in dense_shapes(args).items():
        if name == "embed" and mapped_embedding:
            total += chunk * (shape[1] * itemsize + FAULT_AROUND_BYTES)  # each row's fault maps up to 64 KiB
        elif quantized and is_quantized_dense(name, shape):
            total += quantized_dense_bytes(shape)
        else:
            total += itemsize * math.prod(shape)
    return total


def kv_cache_bytes(args: ModelArgs, max_context: int, itemsize: int) -> int:
    """Bytes of the K and V caches."""
    return 2 * args.num_hidden_layers * args.num_key_value_heads * max_context * args.head_dim * itemsize


def current_rss() -> int:
    """This process's resident set size now."""
    return psutil.Process().memory_info().rss


def return_freed_memory() -> None:
    """Give the C heap's freed pages back to the system (glibc's malloc_trim; a no-op elsewhere).

    Quantizing the dense weights at load frees a temporary per tensor; glibc kept 0.9 GB of them
    resident at Mixtral-8x7B geometry (2.6 GB of RSS for 1.7 GB of weights), memory the plan never
    counted, until trimmed.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def plan_memory(args: ModelArgs, budget: int, dense_bytes: int, slot_bytes: int, max_context: int,
                itemsize: int, chunk: int, prefetch: int, baseline: int | None = None,
                score_chunk: int = 64, scratch_bytes: int = 0) -> MemoryPlan:
    """How many expert slots fit in the budget; refuses a budget below the minimum working set.

    scratch_bytes: one low-bit block (page-rounded) per expert a token chooses, when misses may read it.
    """
    total = args.num_hidden_layers * args.num_local_experts
    plan = MemoryPlan(
        budget=budget,
        baseline=current_rss() if baseline is None else baseline,
        dense=dense_bytes,
        kv_cache=kv_cache_bytes(args, max_context, itemsize),
        work=work_bytes(args, max_context, chunk, itemsize, score_chunk),
        slot_bytes=slot_bytes,
        slots=0,
        min_slots=args.num_experts_per_tok + prefetch,
        total_experts=total,
        scratch=args.num_experts_per_tok * scratch_bytes,
        scratch_buffers=args.num_experts_per_tok if scratch_bytes else 0,
    )
    slots = min(total, max(0, (budget - plan.fixed) // slot_bytes))
    if slots < plan.min_slots:
        raise MixtralOffloadError(
            f"--memory-budget {format_size(budget)} is below the minimum of {format_size(plan.minimum_budget)} "
            f"for this model and context ({format_size(plan.fixed)} fixed + {plan.min_slots} expert slots of "
            f"{format_size(slot_bytes)}); raise the budget or lower --max-context")
    return MemoryPlan(**{**plan.__dict__, "slots": int(slots)})
