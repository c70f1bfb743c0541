"""Opening a model directory of either kind: an HF Mixtral checkpoint, or a converted one with a pool."""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open

from ..cache.expert_cache import ExpertCache
from ..cache.traces import TraceRecorder
from ..cache.nf4_slots import NF4DeviceSlots, import_bitsandbytes, nf4_slot_bytes
from ..cache.slots import DeviceSlots
from ..config import ModelArgs, format_size, parse_size
from ..errors import MixtralOffloadError
from ..validate import check_no_loop, regular_file_size
from .store.checkpoint import dense_shapes, parse_dtype
from .store.pool import CONFIG_NAME, DENSE_NAME, POOL_NAME, TOKENIZER_NAME, ExpertPool
from ..quant.kernels import check_activations_mode
from ..quant.quantize import dequantize_parts_torch
from .memory_plan import SLACK_BYTES, current_rss, plan_memory, return_freed_memory
from .mapped_embedding import FAULT_AROUND_BYTES, MappedEmbedding
from ..quant.linear import is_quantized_dense, quantize_dense, quantized_dense_bytes
from .quant_experts import PoolExperts, expert_forward
from .runtime import PREFILL_CHUNK, SCORE_CHUNK, Runtime, build_model, default_context, load_checkpoint
from .tokenizer import Tokenizer

DEVICE_FORMATS = ("dequantize", "nf4")  # how device slots hold an expert (see load())
DENSE_FORMATS = ("auto", "stored", "int8")  # how the attention and output weights are held (see load())


def load(path: str | Path, dtype: str = "auto", max_context: int | None = None, *,
         memory_budget: int | str | None = None, ram_budget: int | str | None = None, policy: str = "gate",
         prefetch: bool = True, device: str = "auto", record_trace: bool = False,
         log: Callable[[str], None] | None = None, release_pages: bool = False,
         activations: str = "int8", device_format: str = "dequantize", dense: str = "auto") -> Runtime:
    """Load the model at path for generation.

    A directory holding experts.pool loads as a converted model, anything else as an HF checkpoint.
    dtype is the compute dtype of the dense weights ('auto': as stored). With memory_budget (bytes or
    '6GiB'), experts are paged into as many cache slots as the budget leaves (policy: lru, lfu, gate):
    RAM on the CPU, VRAM with device 'cuda' (then ram_budget bounds host memory). Without a budget on
    the CPU, experts are computed where they lie in the mapped pool. log receives the memory plan.
    activations: how the CPU kernels take an expert's input: 'int8' (quantized per group, integer dot
    products, the fast path for int4 pools) or 'float32' (exact to the dequantized weights).
    device_format: how device slots hold an expert: 'dequantize' (the pool's block, dequantized per call)
    or 'nf4' (re-quantized to bitsandbytes NF4 at fill, computed by matmul_4bit; needs a device tier).
    dense: 'stored' (attention and output weights in the compute dtype), 'int8' (quantized per group at
    load and computed by the CPU kernels: half the bytes per token and of their memory), or 'auto':
    int8 for a converted model computed on the CPU, else stored. activations='float32' with
    dense='stored' computes exactly what the dequantized weights define.
    """
    check_activations_mode(activations)
    if device_format not in DEVICE_FORMATS:
        raise MixtralOffloadError(f"unknown device format {device_format!r}: use {' or '.join(DEVICE_FORMATS)}")
    if dense not in DENSE_FORMATS:
        raise MixtralOffloadError(f"unknown dense format {dense!r}: use {' or '.join(DENSE_FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise MixtralOffloadError(f"{path}: no such model directory")
    check_no_loop(path / POOL_NAME)
    if ram_budget is not None:
        parse_size(ram_budget)  # a bad value is refused even on the CPU, where the budget goes unused
    torch_device = resolve_device(device)
    if (path / POOL_NAME).exists():
        return load_converted(path, dtype, max_context, memory_budget=memory_budget, ram_budget=ram_budget,
                              policy=policy, prefetch=prefetch, device=torch_device, record_trace=record_trace,
                              log=log, release_pages=release_pages, activations=activations,
                              device_format=device_format, dense=dense)
    if device_format == "nf4":
        raise MixtralOffloadError(f"{path}: --device-format nf4 needs a converted model (experts in a pool)")
    if dense == "int8":
        raise MixtralOffloadError(f"{path}: --dense int8 needs a converted model: run 'mixtral-offload convert' first")
    if memory_budget is not None:
        raise MixtralOffloadError(
            f"{path}: --memory-budget needs a converted model: run 'mixtral-offload convert {path} OUT_DIR' first")
    return load_checkpoint(path, dtype=resolve_dtype(dtype, path), max_context=max_context, device=torch_device)


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when torch sees a GPU, else the CPU; 'cuda' without a GPU is refused."""
    if device not in ("auto", "cpu", "cuda"):
        raise MixtralOffloadError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MixtralOffloadError("--device cuda: torch sees no CUDA device (is this a CPU-only torch build?)")
    return torch.device(device)


def resolve_dtype(dtype: str, path: Path) -> str:
    """The compute dtype: as asked, or with 'auto' the dtype the weights are stored in."""
    if dtype != "auto":
        return dtype
    return ModelArgs.from_file(path / CONFIG_NAME).torch_dtype


def load_converted(path: str | Path, dtype: str = "auto", max_context: int | None = None, *,
                   memory_budget: int | str | None = None, ram_budget: int | str | None = None,
                   policy: str = "gate", prefetch: bool = True, device: torch.device = torch.device("cpu"),
                   record_trace: bool = False, log: Callable[[str], None] | None = None,
                   release_pages: bool = False, activations: str = "int8",
                   device_format: str = "dequantize", dense: str = "auto") -> Runtime:
    """Load a converted model directory: dense weights resident, experts in the mapped pool or a cache."""
    run_expert = functools.partial(expert_forward, activations=activations)
    path = Path(path)
    args = ModelArgs.from_file(path / CONFIG_NAME)
    pool = ExpertPool.open(path)
    tokenizer = Tokenizer(path / TOKENIZER_NAME)
    torch_dtype = parse_dtype(resolve_dtype(dtype, path))
    context = default_context(args, max_context)
    on_gpu = device.type == "cuda"
    if device_format == "nf4" and not on_gpu:
        raise MixtralOffloadError("--device-format nf4 needs the experts on a device tier: add --device cuda")
    if device_format == "nf4":
        import_bitsandbytes()  # fail before the weights are read
    quantized = dense == "int8" or (dense == "auto" and not on_gpu)
    if dense == "int8" and on_gpu:
        raise MixtralOffloadError("--dense int8 runs on the CPU kernels; with --device cuda keep --dense stored")
    mapped = not on_gpu and not args.tie_word_embeddings  # a tied table is the output head too: resident
    if memory_budget is None and not record_trace and not on_gpu:
        experts = PoolExperts(pool, release_pages, activations)
        weights = read_dense(path / DENSE_NAME, args, torch_dtype, quantized, activations, mapped)
        return Runtime(build_model(args, weights, experts, context), tokenizer, path)
    prefetch_slots = args.num_experts_per_tok if prefetch else 0
    warm_up_kernels(pool, run_expert, activations if quantized else None)  # compiled kernels count in the baseline
    if memory_budget is None and not on_gpu:  # tracing without a budget: a cache that holds every expert
        slots = args.num_hidden_layers * args.num_local_experts
    else:
        if memory_budget is None:  # on a GPU: what is free now, less a tenth for the allocator
            memory_budget = int(torch.cuda.mem_get_info(device)[0] * 0.9)
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        dense_bytes = dense_nbytes(args, itemsize, quantized, mapped)
        # on the GPU the budget bounds what torch allocates there; the host's baseline counts for ram_budget
        baseline = torch.cuda.memory_reserved(device) if on_gpu else None
        slot_bytes = nf4_slot_bytes(pool) if device_format == "nf4" else pool.block_nbytes
        plan = plan_memory(args, parse_size(memory_budget), dense_bytes, slot_bytes, context, itemsize,
                           PREFILL_CHUNK, prefetch_slots, baseline=baseline, score_chunk=SCORE_CHUNK)
        if log is not None:
            log(plan.describe())
        slots = plan.slots
    if on_gpu:
        check_host_budget(ram_budget, pool.block_nbytes)
    weights = {name: tensor.to(device) if isinstance(tensor, torch.Tensor) else tensor
               for name, tensor in read_dense(path / DENSE_NAME, args, torch_dtype, quantized, activations,
                                              mapped).items()}
    store_class = NF4DeviceSlots if device_format == "nf4" else DeviceSlots
    store = store_class(pool, slots, device, torch_dtype, dequantize_parts_torch, run_expert) if on_gpu else None
    recorder = TraceRecorder(args.num_hidden_layers, args.num_local_experts, source=str(path)) if record_trace else None
    experts = ExpertCache(pool, args.num_hidden_layers, args.num_experts_per_tok, slots, run_expert,
                          policy=policy, prefetch=prefetch_slots, recorder=recorder, store=store)
    model = build_model(args, weights, experts, context, prefetch_hints=prefetch or record_trace)
    return Runtime(model, tokenizer, path)


def dense_nbytes(args: ModelArgs, itemsize: int, quantized: bool, mapped_embedding: bool = False) -> int:
    """Bytes the dense weights take resident: itemsize per weight, or int8 per group where quantized;
    a mapped embedding table only the rows one prefill chunk looks up (its pages are released after)."""
    total = 0
    for name, shape in dense_shapes(args).items():
        if name == "embed" and mapped_embedding:
            total += PREFILL_CHUNK * (shape[1] * itemsize + FAULT_AROUND_BYTES)  # each row's fault maps up to 64 KiB
        elif quantized and is_quantized_dense(name, shape):
            total += quantized_dense_bytes(shape)
        else:
            total += itemsize * math.prod(shape)
    return total


def check_host_budget(ram_budget: int | str | None, block_bytes: int) -> None:
    """With the experts on a GPU, host memory holds the baseline and two staging buffers."""
    if ram_budget is None:
        return
    needed = current_rss() + 2 * block_bytes + SLACK_BYTES
    if parse_size(ram_budget) < needed:
        raise MixtralOffloadError(f"--ram-budget {format_size(parse_size(ram_budget))} is below the minimum of "
                                  f"{format_size(needed)} (baseline, two staging buffers and slack)")


def warm_up_kernels(pool: ExpertPool, run_expert: Callable = expert_forward, dense_activations: str | None = None) -> None:
    """Load (or compile) every kernel variant a run will call, before the baseline is measured.

    Numba compiles per argument type: one token and a batch take different kernels, and views on an
    owned slot (writable) and on the mapped pool (read-only) are different types. A compile after the
    baseline would be memory the plan never counted.
    """
    hidden = pool.args.hidden_size
    buffer = np.empty(pool.block_nbytes, np.uint8)
    pool.read_block_into(0, 0, buffer)
    for matrices in (pool.views_from_buffer(buffer), pool.expert(0, 0)):
        for tokens in (1, 64):
            run_expert(*matrices, np.zeros((tokens, hidden), np.float32))
    pool.release(0, 0)
    if dense_activations is not None and is_quantized_dense("lm_head", (8, hidden)):  # int8 dense weights' kernels
        weight = quantize_dense(torch.ones(8, hidden), dense_activations)
        for tokens in (1, 64):
            weight.linear(torch.zeros(tokens, hidden))


def read_dense(file: Path, args: ModelArgs, dtype: torch.dtype, quantized: bool = False,
               activations: str = "int8", mapped_embedding: bool = False) -> dict:
    """Every dense tensor of dense.safetensors in dtype, checked against the config's shapes; with
    quantized, the attention and output weights as QuantizedLinear (int8, computed with `activations`),
    each as soon as it is read; with mapped_embedding, the embedding table as a MappedEmbedding.

    The file is mapped for one tensor at a time, so its pages never all count in RSS at once.
    """
    shapes = dense_shapes(args)
    dense = {}
    regular_file_size(file, DENSE_NAME)  # a FIFO or a device would hang or fill memory
    try:
        with safe_open(file, framework="pt") as handle:
            missing = sorted(set(shapes) - set(handle.keys()))
        if missing:
            raise MixtralOffloadError(f"{file}: tensor {missing[0]} is missing ({len(missing)} missing)")
        for name, shape in shapes.items():
            if name == "embed" and mapped_embedding:
                dense[name] = MappedEmbedding(file, name, shape, dtype)
                continue
            with safe_open(file, framework="pt") as handle:
                tensor = handle.get_tensor(name)
                if tuple(tensor.shape) != tuple(shape):
                    raise MixtralOffloadError(f"{file}: tensor {name} has shape {tuple(tensor.shape)}, "
                                              f"expected {tuple(shape)} from {CONFIG_NAME}")
                if quantized and is_quantized_dense(name, shape):
                    dense[name] = quantize_dense(tensor, activations)
                    del tensor
                    return_freed_memory()
                else:
                    dense[name] = tensor.to(dtype=dtype, copy=True)
    except MixtralOffloadError:
        raise
    except Exception as exc:  # safetensors raises several types for damaged files
        raise MixtralOffloadError(f"{file}: cannot read ({exc})") from None
    return dense
