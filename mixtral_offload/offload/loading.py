"""Loading a model: open its files, choose everything from LoadOptions (plan), then build the Runtime.

A GGUF file and a directory holding experts.pool load with dense weights resident and experts in the
file's mapping or an expert cache; any other directory as an HF checkpoint with every expert in torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..cache.device_slots import DeviceSlots, NF4DeviceSlots, import_bitsandbytes, nf4_slot_bytes
from ..cache.expert_cache import ExpertCache, HostSlots
from ..cache.reader import read_extents
from ..cache.lowbit_misses import LowBitMisses
from ..cache.miss_choice import RULES
from ..cache.source import MATRICES, page_rounded
from ..cache.traces import TraceRecorder
from ..config import ModelArgs, format_size
from ..errors import MixtralOffloadError
from ..quant.gguf_kernels import gguf_experts_kernel
from ..validate import check_no_loop
from ..quant.kernels import ExpertKernel, expert_kernel
from ..quant.linear import TensorLinear, is_quantized_dense, quantize_dense
from ..quant.quantize import dequantize_parts_torch
from .experts import PoolExperts, TorchExperts
from .memory_plan import SLACK_BYTES, MemoryPlan, current_rss, dense_nbytes, plan_memory
from .model import LayerWeights, Mixtral, RoutingOverride, TensorEmbedding
from .options import LoadOptions
from .trace_routing import open_routing_trace
from .runtime import PREFILL_CHUNK, SCORE_CHUNK, Runtime, default_context
from .store.checkpoint import Checkpoint, parse_dtype
from .store.dense import hold_dense, read_dense
from .store.gguf import GGUFModel, is_gguf
from .store.gguf_experts import GGUFExperts
from .store.pool import CONFIG_NAME, COPIES, DENSE_NAME, POOL_NAME, TOKENIZER_NAME, ExpertPool
from .tokenizer import Tokenizer


def load(path: str | Path, options: LoadOptions | None = None, *, log: Callable[[str], None] | None = None,
         **fields) -> Runtime:
    """Load the model at path for generation, with options (or LoadOptions' fields as keywords).

    log receives the memory plan of a cached load.
    """
    options = options if options is not None else LoadOptions(**fields)
    path = Path(path)
    if not path.exists():
        raise MixtralOffloadError(f"{path}: no such model directory")
    check_no_loop(path / POOL_NAME)  # a looping link is not "no pool": say so
    device = resolve_device(options.device)
    if path.is_file():
        if not is_gguf(path):
            raise MixtralOffloadError(f"{path}: a file, but not a GGUF (no GGUF magic); a model is a GGUF file "
                                      "or a directory")
        return build_runtime(open_gguf(path, options), options, device, log)
    if (path / POOL_NAME).exists():
        return build_runtime(open_converted(path, options), options, device, log)
    for wanted, why in ((options.device_format == "nf4", "--device-format nf4"), (options.dense == "int8", "--dense int8"),
                        (options.cached and not options.record_trace, "--memory-budget"),
                        (options.routing_trace, "--routing-trace")):
        if wanted:
            raise MixtralOffloadError(f"{path}: {why} needs a converted model: run 'mixtral-offload convert {path} OUT_DIR' first")
    return load_checkpoint(path, resolve_dtype(options.dtype, path), options.max_context, device)


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when torch sees a GPU, else the CPU; 'cuda' without a GPU is refused."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MixtralOffloadError("--device cuda: torch sees no CUDA device (is this a CPU-only torch build?)")
    return torch.device(device)


def resolve_dtype(dtype: str, path: Path) -> str:
    """The compute dtype: as asked, or with 'auto' the dtype the weights are stored in."""
    return ModelArgs.from_file(path / CONFIG_NAME).torch_dtype if dtype == "auto" else dtype


def build_model(args: ModelArgs, dense: dict, experts, max_context: int, dtype: torch.dtype,
                device: torch.device, prefetch_hints: bool = False,
                routing: RoutingOverride | None = None) -> Mixtral:
    """A Mixtral from dense weights keyed by runtime name (checkpoint.dense_shapes): tensors become layers."""
    def layer(weight):
        return TensorLinear(weight) if isinstance(weight, torch.Tensor) else weight

    def embedding(table):
        return TensorEmbedding(table) if isinstance(table, torch.Tensor) else table

    layers = [LayerWeights(**{name: dense[f"layers.{i}.{name}"] for name in LayerWeights.__dataclass_fields__})
              for i in range(args.num_hidden_layers)]
    for weights in layers:
        weights.wq, weights.wk, weights.wv, weights.wo = map(layer, (weights.wq, weights.wk, weights.wv, weights.wo))
    lm_head = layer(dense["embed"] if args.tie_word_embeddings else dense["lm_head"])
    return Mixtral(args, embedding(dense["embed"]), layers, dense["norm"], lm_head, experts, max_context, dtype,
                   device, prefetch_hints, routing)


def load_checkpoint(path: str | Path, dtype: str = "float32", max_context: int | None = None,
                    device: torch.device | str = "cpu") -> Runtime:
    """An HF Mixtral checkpoint directory with every expert resident as torch tensors on device."""
    checkpoint = Checkpoint.open(path)
    args, torch_dtype, device = checkpoint.args, parse_dtype(dtype), torch.device(device)
    dense = {name: tensor.to(device) for name, tensor in checkpoint.dense_tensors(torch_dtype)}
    stacks = {part: [] for part in MATRICES}
    for layer in range(args.num_hidden_layers):
        for part, stack in stacks.items():
            stack.append(torch.stack([checkpoint.expert_tensor(layer, e, part, torch_dtype)
                                      for e in range(args.num_local_experts)]).to(device))
    experts = TorchExperts(stacks["w1"], stacks["w3"], stacks["w2"])
    model = build_model(args, dense, experts, default_context(args, max_context), torch_dtype, device)
    return Runtime(model, Tokenizer(checkpoint.tokenizer_path), Path(path))


@dataclass(frozen=True)
class ExpertFiles:
    """What an opened model file gives the build step: experts in a BlockSource, dense weights on request."""

    path: Path
    args: ModelArgs
    source: object                 # cache.source.BlockSource: an ExpertPool or GGUFExperts
    kernel: ExpertKernel           # the expert kernel for the source's matrices, chosen once
    tokenizer: Tokenizer
    stored_dtype: str              # the compute dtype 'auto' resolves to
    read_dense: Callable           # (plan) -> dense weights by runtime name, as plan_experts decided
    mappable_embedding: bool       # whether the table can be gathered from the file mapping
    device_slots: bool             # whether device slots can hold the source's blocks
    miss_source: object = None     # the low-bit copy of the experts (a BlockSource) when --miss-bits may use it
    miss_kernel: ExpertKernel | None = None


@dataclass(frozen=True)
class LoadPlan:
    """What a load decided, before any weight is read."""

    dtype: torch.dtype
    context: int
    on_gpu: bool
    quantized_dense: bool    # attention and output weights as int8 for the CPU kernels
    mapped_embedding: bool   # the embedding table read from the file mapping
    prefetch_slots: int
    memory: MemoryPlan | None  # None: experts computed where they lie (no cache)
    low_bit: bool = False      # misses may read the low-bit copy (files.miss_source)


def plan_experts(files: ExpertFiles, options: LoadOptions, device: torch.device) -> LoadPlan:
    """Every choice of the load from the options, checked; the memory plan when experts are cached.

    A cached load must call it after the kernels are loaded (warm_up_kernels): the baseline RSS counts them.
    """
    args, on_gpu = files.args, device.type == "cuda"
    if on_gpu and not files.device_slots:
        raise MixtralOffloadError(f"{files.path}: device slots hold converted pools only; for --device cuda "
                                  f"convert it first (mixtral-offload convert {files.path} OUT_DIR)")
    if options.device_format == "nf4" and not on_gpu:
        raise MixtralOffloadError("--device-format nf4 needs the experts on a device tier: add --device cuda")
    if options.dense == "int8" and on_gpu:
        raise MixtralOffloadError("--dense int8 runs on the CPU kernels; with --device cuda keep --dense stored")
    dtype = parse_dtype(files.stored_dtype if options.dtype == "auto" else options.dtype)
    quantized = options.dense == "int8" or (options.dense == "auto" and not on_gpu)
    # a tied table is the output head too: resident
    mapped = files.mappable_embedding and not on_gpu and not args.tie_word_embeddings
    context = default_context(args, options.max_context)
    prefetch = args.num_experts_per_tok if options.prefetch else 0
    budgeted = options.memory_budget is not None or options.experts_fraction is not None
    if options.miss_bits not in ("off", "auto") and (on_gpu or not budgeted):
        raise MixtralOffloadError(f"--miss-bits {options.miss_bits} computes expert cache misses with the CPU kernels: "
                                  + ("use it without --device cuda" if on_gpu else "give --memory-budget"))
    low_bit = files.miss_source is not None and budgeted and not on_gpu
    if not (options.cached or on_gpu):
        return LoadPlan(dtype, context, on_gpu, quantized, mapped, prefetch, None)
    itemsize = torch.empty((), dtype=dtype).element_size()
    source = files.source
    slot_bytes = nf4_slot_bytes(source) if options.device_format == "nf4" else page_rounded(source.block_nbytes)
    sizes = dict(args=args, dense_bytes=dense_nbytes(args, itemsize, quantized, mapped, PREFILL_CHUNK),
                 slot_bytes=slot_bytes, max_context=context, itemsize=itemsize, chunk=PREFILL_CHUNK,
                 prefetch=prefetch, score_chunk=SCORE_CHUNK,
                 scratch_bytes=page_rounded(files.miss_source.block_nbytes) if low_bit else 0,
                 baseline=torch.cuda.memory_reserved(device) if on_gpu else current_rss())
    total = args.num_hidden_layers * args.num_local_experts
    if options.experts_fraction is not None:  # the budget a user would pass for that many slots
        probe = plan_memory(budget=1 << 60, **sizes)
        wanted = max(probe.min_slots, math.ceil(options.experts_fraction * total))
        memory = plan_memory(budget=probe.fixed + wanted * slot_bytes + slot_bytes // 2, **sizes)
    elif options.memory_budget is not None:
        memory = plan_memory(budget=options.memory_budget, **sizes)
    elif on_gpu:  # what is free now, less a tenth for the allocator
        memory = plan_memory(budget=int(torch.cuda.mem_get_info(device)[0] * 0.9), **sizes)
    else:  # tracing without a budget: a cache that holds every expert
        memory = plan_memory(budget=1 << 60, **sizes)
    return LoadPlan(dtype, context, on_gpu, quantized, mapped, prefetch, memory, low_bit)


def open_converted(path: Path, options: LoadOptions) -> ExpertFiles:
    """A converted model directory: the pool, its kernel, dense.safetensors and tokenizer.model."""
    args = ModelArgs.from_file(path / CONFIG_NAME)
    pool = ExpertPool.open(path)
    kernel = expert_kernel(pool.spec, args.hidden_size, args.intermediate_size, options.activations)
    miss = open_miss_copy(path, options.miss_bits)
    miss_kernel = miss and expert_kernel(miss.spec, args.hidden_size, args.intermediate_size, options.activations)

    def dense(plan: LoadPlan) -> dict:
        return read_dense(path / DENSE_NAME, args, plan.dtype, plan.quantized_dense, options.activations,
                          plan.mapped_embedding)

    return ExpertFiles(path, args, pool, kernel, Tokenizer(path / TOKENIZER_NAME), resolve_dtype("auto", path),
                       dense, mappable_embedding=True, device_slots=True, miss_source=miss, miss_kernel=miss_kernel)


def open_miss_copy(path: Path, miss_bits: str) -> ExpertPool | None:
    """The low-bit copy --miss-bits asks for: none when off (or auto on a pool without one); others must find it."""
    if miss_bits == "off" or (miss_bits == "auto" and not (path / COPIES["miss"][0]).exists()):
        return None
    if miss_bits != "auto" and not (path / COPIES["miss"][0]).exists():
        bits = miss_bits if miss_bits in ("2", "3") else "2|3"
        raise MixtralOffloadError(f"{path}: --miss-bits {miss_bits} needs a low-bit copy of the experts, and this pool "
                                  f"has none: convert or synth it with --miss-bits {bits}")
    miss = ExpertPool.open(path, "miss")
    if miss_bits in ("2", "3") and miss.spec.bits != int(miss_bits):
        raise MixtralOffloadError(f"{path}: --miss-bits {miss_bits}, but its low-bit copy is int{miss.spec.bits}: "
                                  f"use --miss-bits {miss.spec.bits} or auto")
    return miss


def open_gguf(path: Path, options: LoadOptions) -> ExpertFiles:
    """A llama.cpp GGUF file: its experts stay in the file, dense weights dequantized as they are read."""
    model = GGUFModel.open(path)
    source = GGUFExperts(model)

    def dense(plan: LoadPlan) -> dict:
        return hold_dense(model.dense_tensors(plan.dtype), plan.dtype, plan.quantized_dense, options.activations)

    if options.miss_bits not in ("off", "auto"):
        raise MixtralOffloadError(f"{path}: --miss-bits {options.miss_bits} needs a converted pool with a low-bit "
                                  "copy; a GGUF has none")
    return ExpertFiles(path, model.args, source, gguf_experts_kernel(options.activations), model.tokenizer(),
                       model.float_dtype(), dense, mappable_embedding=False, device_slots=False)


def build_runtime(files: ExpertFiles, options: LoadOptions, device: torch.device,
                  log: Callable[[str], None] | None) -> Runtime:
    """Dense weights resident, experts computed where they lie or through an expert cache."""
    args, source, kernel = files.args, files.source, files.kernel
    routing = open_routing_trace(options.routing_trace, args) if options.routing_trace else None
    if options.device_format == "nf4":
        import_bitsandbytes()  # fail before the weights are read
    if options.cached or device.type == "cuda":  # compiled kernels count in the baseline the plan measures
        warm_up_kernels(source, kernel, options.activations if options.dense != "stored" else None)
        if files.miss_source is not None and device.type == "cpu":
            warm_up_kernels(files.miss_source, files.miss_kernel)
    plan = plan_experts(files, options, device)
    if plan.memory is not None and log is not None:
        log(plan.memory.describe())
    if plan.on_gpu and options.ram_budget is not None:
        check_host_budget(options.ram_budget, source.block_nbytes)
    # The slots exist before the dense weights are read, so their pages are faulted in (cache/reader.py
    # populate) while the dense weights convert; the conversion's temporaries fit in the work
    # buffers the plan counts, which no prompt uses until the load returns.
    populating = None
    if plan.memory is None:
        experts = PoolExperts(source, kernel, options.release_pages)
    else:
        slots = plan.memory.slots
        if plan.on_gpu:
            store_class = NF4DeviceSlots if options.device_format == "nf4" else DeviceSlots
            store = store_class(source, slots, device, plan.dtype, dequantize_parts_torch, kernel)
        else:
            store = HostSlots(source, slots, kernel)
            populating = store.populating
        recorder = (TraceRecorder(args.num_hidden_layers, args.num_local_experts, source=str(files.path))
                    if options.record_trace else None)
        low_bit = LowBitMisses(files.miss_source, files.miss_kernel, RULES[options.miss_bits],
                               args.num_experts_per_tok) if plan.low_bit else None
        experts = ExpertCache(source, args.num_hidden_layers, args.num_experts_per_tok, store, policy=options.policy,
                              prefetch=plan.prefetch_slots, recorder=recorder, low_bit=low_bit)
    dense = {name: w.to(device) if isinstance(w, torch.Tensor) else w for name, w in files.read_dense(plan).items()}
    if populating is not None:  # the load returns with the slots' pages in place: a prompt sent at once reads
        populating.join()       # at full rate, not faulting pages in on the reader threads (BENCHMARKS.md)
    model = build_model(args, dense, experts, plan.context, plan.dtype, device,
                        prefetch_hints=plan.memory is not None and (options.prefetch or options.record_trace),
                        routing=routing)
    return Runtime(model, files.tokenizer, files.path, plan.memory)


def check_host_budget(ram_budget: int, block_bytes: int) -> None:
    """With the experts on a GPU, host memory holds the baseline and two staging buffers."""
    needed = current_rss() + 2 * block_bytes + SLACK_BYTES
    if ram_budget < needed:
        raise MixtralOffloadError(f"--ram-budget {format_size(ram_budget)} is below the minimum of "
                                  f"{format_size(needed)} (baseline, two staging buffers and slack)")


def warm_up_kernels(source, kernel: ExpertKernel, dense_activations: str | None = None) -> None:
    """Load (or compile) every kernel variant a run will call, before the baseline is measured.

    Numba compiles per argument type: one token and a batch take different kernels, and views on an
    owned slot (writable) and on the mapped pool (read-only) are different types. A compile after the
    baseline would be memory the plan never counted.
    """
    hidden = source.args.hidden_size
    buffer = np.empty(page_rounded(source.block_nbytes), np.uint8)
    read_extents(source, (0, 0), buffer)
    for matrices in (source.views(buffer, (0, 0)), source.mapped((0, 0))):
        for tokens in (1, 64):
            kernel(*matrices, np.zeros((tokens, hidden), np.float32))
    source.release((0, 0))
    if dense_activations is not None and is_quantized_dense("lm_head", (8, hidden)):  # int8 dense weights' kernels
        weight = quantize_dense(torch.ones(8, hidden), dense_activations)
        for tokens in (1, 64):
            weight(torch.zeros(tokens, hidden))
