"""The device tier of the expert cache: slots in a torch device's memory, torch dequantization,
and the measured choice between filling a slot and computing on the pool.

The same code runs on the CPU device here; the CUDA-only parts (pinned staging, copy stream) run in
the test marked for a GPU.
"""
import pytest
import torch

from mixtral_offload.cache.expert_cache import ExpertCache, MissCosts
from mixtral_offload.cache.device_slots import DeviceSlots
from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.loading import load, resolve_device
from mixtral_offload.quant.kernels import expert_kernel
from mixtral_offload.quant.quantize import dequantize_parts_torch

IDS = [1, 415, 5565, 302, 4843, 349, 5465, 28723, 330, 1215, 264, 1215]


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("slots,prefetch", [(2, 0), (4, 2), (24, 2)])
def test_device_slots_on_cpu_match_the_pool(converted_int4, slots, prefetch):
    runtime = load(converted_int4, dtype="float32", device="cpu", activations="float32")
    expected = runtime.logits(IDS)
    pool = runtime.model.experts.source
    kernel = expert_kernel(pool.spec, pool.args.hidden_size, pool.args.intermediate_size, "float32")
    store = DeviceSlots(pool, slots, "cpu", torch.float32, dequantize_parts_torch, kernel)
    cache = ExpertCache(pool, 4, 2, store, policy="lru", prefetch=prefetch)
    runtime.model.experts, runtime.model.prefetch_hints = cache, prefetch > 0
    got = runtime.logits(IDS)
    cache.close()
    assert relative_error(got, expected) < 1e-5
    assert cache.stats.direct >= 1  # each answer to a miss was measured at least once
    assert cache.costs.fill is not None and cache.costs.direct is not None


def test_miss_costs_choose_the_cheaper_answer():
    costs = MissCosts()
    assert not costs.prefer_direct()
    costs.record("fill", 2.0, 1000)
    costs.record("direct", 1.0, 1000)
    assert costs.prefer_direct()
    for _ in range(20):
        costs.record("direct", 4.0, 1000)
    assert not costs.prefer_direct()


def test_cuda_refused_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(MixtralOffloadError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: pinned staging and the copy stream")
def test_cuda_tier_matches_the_cpu(converted_int4):
    # the exact CPU path (float activations, dense weights as stored) is what the GPU's torch math computes
    expected = load(converted_int4, dtype="float32", device="cpu", activations="float32", dense="stored").logits(IDS)
    runtime = load(converted_int4, dtype="float32", device="cuda", memory_budget="1GiB", ram_budget="64GiB")
    assert isinstance(runtime.model.experts.store, DeviceSlots)
    assert relative_error(runtime.logits(IDS), expected) < 1e-4
    assert torch.cuda.max_memory_reserved() <= 2**30
