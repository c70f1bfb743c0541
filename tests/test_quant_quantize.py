"""Quantization error on Gaussian weights: RTN levels, refinement never worse and lowers int4 error."""

import numpy as np
import pytest
import torch

from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.quant import QuantSpec, dequantize, dequantize_torch, quantize, relative_error
from mixtral_offload.quant.quantize import unpack_codes


@pytest.fixture(scope="module")
def gaussian():
    return np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)


# RTN relative Frobenius error on Gaussian weights (4096x4096 here: int4 g64 8.96%, int8 g64 0.593%)
RTN_BOUNDS = {(4, 32): (0.07, 0.085), (4, 64): (0.083, 0.097), (4, 128): (0.092, 0.107),
              (8, 32): (0.005, 0.0058), (8, 64): (0.0055, 0.0064), (8, 128): (0.006, 0.007),
              (3, 32): (0.16, 0.175), (3, 64): (0.185, 0.2), (3, 128): (0.205, 0.22),
              (2, 32): (0.38, 0.405), (2, 64): (0.44, 0.46), (2, 128): (0.49, 0.51)}
# refined / RTN at most (measured on this matrix: int4 0.93-0.95, int3 0.85-0.92, int2 0.68-0.78)
REFINED_RATIO = {2: 0.8, 3: 0.93, 4: 0.97, 8: 1.0}


@pytest.mark.parametrize("bits, group_size", sorted(RTN_BOUNDS))
def test_error_levels_and_refinement(gaussian, bits, group_size):
    spec = QuantSpec(bits, group_size)
    rtn = relative_error(gaussian, quantize(gaussian, spec, refine=False))
    refined = relative_error(gaussian, quantize(gaussian, spec, refine=True))
    low, high = RTN_BOUNDS[(bits, group_size)]
    assert low < rtn < high
    assert refined <= REFINED_RATIO[bits] * rtn


MAX_ERROR = {2: 0.35, 3: 0.19, 4: 0.1, 8: 0.01}  # refined, Gaussian, g64


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_in_range_and_torch_input(bits):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    qm = quantize(w, QuantSpec(bits, 64))
    if bits < 8:
        q = unpack_codes(qm.codes, bits, 64)
        assert q.max() == 2**bits - 1 and q.min() == 0
    else:
        assert qm.codes.min() >= -127
    err = relative_error(w.float().numpy(), qm)
    assert err < MAX_ERROR[bits]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_torch_matches_numpy(bits):
    w = np.random.default_rng(2).standard_normal((24, 256)).astype(np.float32)
    qm = quantize(w, QuantSpec(bits, 128))
    ref = dequantize(qm)
    np.testing.assert_array_equal(dequantize_torch(qm).numpy(), ref)
    bf = dequantize_torch(qm, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.allclose(bf.float(), torch.from_numpy(ref), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")
def test_dequantize_torch_on_cuda():
    w = np.random.default_rng(3).standard_normal((32, 128)).astype(np.float32)
    qm = quantize(w, QuantSpec(4, 64))
    on_gpu = dequantize_torch(qm, device="cuda")
    assert on_gpu.device.type == "cuda"
    np.testing.assert_array_equal(on_gpu.cpu().numpy(), dequantize(qm))


def test_special_groups():
    w = np.zeros((4, 64), np.float32)
    w[1] = 3.0  # constant group
    w[2, :32] = 1e-30  # far below float16 range
    w[3] = np.linspace(-2, 2, 64)
    for bits, atol in ((2, 0.4), (3, 0.2), (4, 0.15), (8, 0.01)):  # linspace steps of 4/63 per column
        deq = dequantize(quantize(w, QuantSpec(bits, 32)))
        assert np.isfinite(deq).all()
        np.testing.assert_allclose(deq, w, atol=atol)


@pytest.mark.parametrize("bad", [np.full((2, 32), np.nan, np.float32), np.ones((2, 32), np.int32),
                                 np.ones(32, np.float32), np.full((2, 32), 1e6, np.float32)])
def test_bad_weights_refused(bad):
    with pytest.raises(MixtralOffloadError):
        quantize(bad, QuantSpec(4, 32))
