"""int2/int3/int4/int8 x int8-activation kernels (quant/int8x.py) against NumPy references, and their effect on a model."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from mixtral_offload.offload.loading import load
from mixtral_offload.quant import int8x, kernels
from mixtral_offload.quant.bench import random_quantized
from mixtral_offload.quant.format import QuantSpec, kernel_parts
from mixtral_offload.quant.quantize import dequantize, quantize
from mixtral_offload.quant.swiglu import silu

HOST_FEATURES = {name for name, on in __import__("llvmlite.binding").binding.get_host_cpu_features().items() if on}


def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows,blocks", [(1, 1), (7, 2), (67, 3), (131, 8)])
@pytest.mark.parametrize("tokens", [1, 2, 4, 5, 9])
def test_matmul_equals_the_reference(bits, group_size, rows, blocks, tokens):
    cols = max(int8x.BLOCK_COLS[bits], group_size) * blocks
    qm = random_quantized(QuantSpec(bits, group_size), (rows, cols), seed=rows + tokens)
    x = np.random.default_rng(tokens).standard_normal((tokens, cols)).astype(np.float32)
    assert relative(int8x.matmul(qm, x), int8x.reference_matmul(qm, x)) < 1e-5


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=st.integers(1, 150), blocks=st.integers(1, 6), tokens=st.integers(1, 9), bits=st.sampled_from([2, 3, 4, 8]),
       group_size=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2**16),
       x_scale=st.sampled_from([1e-6, 1.0, 1e4]), zero_groups=st.booleans())
def test_matmul_equals_the_reference_fuzzed(rows, blocks, tokens, bits, group_size, seed, x_scale, zero_groups):
    """Each output within float32 rounding of the float64 reference, measured against the sum of |x||w| of
    its products: a few rows of random weights can cancel to 1e-6 of that sum, where a bound relative to
    the result itself would demand more than float32 holds (rows=1, int3, seed 6 did: 4.8e-4)."""
    cols = max(int8x.BLOCK_COLS[bits], group_size) * blocks
    qm = random_quantized(QuantSpec(bits, group_size), (rows, cols), seed=seed)
    x = np.random.default_rng(seed).standard_normal((tokens, cols)).astype(np.float32) * np.float32(x_scale)
    if zero_groups:
        x[:, :group_size] = 0.0
    y, ref = int8x.matmul(qm, x), int8x.reference_matmul(qm, x)
    assert y.shape == (tokens, rows)
    magnitude = np.abs(int8x.dequantized_activations(x, group_size).astype(np.float64)) @ np.abs(dequantize(qm)).T
    assert np.all(np.abs(y - ref) <= 1e-6 * magnitude + 1e-30)


def test_reference_quantizes_x_per_group():
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32) * np.linspace(0.01, 10, 256)
    x[1, :64] = 0.0  # an all-zero group has scale 0 and codes 0
    xd = int8x.dequantized_activations(x, 64)
    groups, deq = x.reshape(3, 4, 64), xd.reshape(3, 4, 64)
    step = np.abs(groups).max(axis=2, keepdims=True) / 127
    assert np.all(np.abs(deq - groups) <= step / 2 * (1 + 1e-5) + 1e-12)
    assert np.all(xd[1, :64] == 0)
    qm = random_quantized(QuantSpec(4, 64), (5, 256))
    assert relative(int8x.matmul(qm, x), int8x.reference_matmul(qm, x)) < 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("isa", [isa for isa in int8x.ISAS if isa != int8x.ISA])
def test_other_instruction_sets_equal_this_one(bits, isa):
    """The integer dots for other CPUs (AVX2 without VNNI, or plain vector IR for any CPU) give the same
    sums; this machine runs them all (the 'vnni' form is skipped where the CPU lacks it)."""
    if isa != "generic" and not ({"vnni": "avx512vnni", "avx2": "avx2"}[isa] in HOST_FEATURES):
        pytest.skip(f"this CPU cannot run the {isa} form")
    generic_rows = int8x.make_rows_kernel(bits, isa=isa)

    @njit
    def all_rows(codes, scales, zeros, xperm, dx, xqsum, out):
        generic_rows(codes, scales, zeros, xperm, dx, xqsum, out, np.uint64(0), np.uint64(out.shape[1]), np.uint64(0),
                     np.uint64(64))

    qm = random_quantized(QuantSpec(bits, 64), (9, 768), seed=3)
    x = np.random.default_rng(3).standard_normal((5, 768)).astype(np.float32)  # a tile of 4 and one more
    xperm, dx, xqsum = int8x.quantize_activations(x, 64, bits)
    out = np.empty((5, 9), np.float32)
    codes, scales, zeros = (part.reshape(-1) for part in kernel_parts(qm))
    all_rows(codes, scales, zeros, xperm, dx, xqsum, out)
    assert relative(out, int8x.reference_matmul(qm, x)) < 1e-5
    assert relative(out, int8x.matmul(qm, x)) < 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_expert_forward_int8_equals_its_reference(bits):
    spec = QuantSpec(bits, 64)
    w1, w3 = random_quantized(spec, (512, 256), 1), random_quantized(spec, (512, 256), 2)
    w2 = random_quantized(spec, (256, 512), 3)
    x = np.random.default_rng(0).standard_normal((6, 256)).astype(np.float32)
    xd = int8x.dequantized_activations(x, 64).astype(np.float64)
    gate, up = xd @ dequantize(w1).T.astype(np.float64), xd @ dequantize(w3).T.astype(np.float64)
    hidden = (gate / (1 + np.exp(-gate)) * up).astype(np.float32)
    expected = int8x.reference_matmul(w2, hidden)
    got = kernels.expert_forward(w1, w3, w2, x, activations="int8")
    # h is quantized from float32 values that differ from the float64 reference in the last bits,
    # so a code may round the other way: a step of 1/254 of a group's largest |h| at most
    assert relative(got, expected) < 1e-3
    exact = kernels.expert_forward(w1, w3, w2, x)
    assert 1e-5 < relative(got, exact) < 0.05  # int8 differs from float32, by the activation rounding


@pytest.mark.parametrize("bits,cols", [(4, 192), (8, 96), (3, 384), (2, 128)])
def test_unsupported_formats_fall_back_to_the_exact_kernel(bits, cols):
    qm = random_quantized(QuantSpec(bits, 32), (10, cols))
    x = np.random.default_rng(1).standard_normal((2, cols)).astype(np.float32)
    assert not int8x.supports(bits, cols)
    assert np.array_equal(kernels.matmul(qm, x, activations="int8"), kernels.matmul(qm, x))


def test_unknown_activations_mode_is_refused():
    from mixtral_offload.errors import MixtralOffloadError

    qm = random_quantized(QuantSpec(4, 64), (4, 128))
    with pytest.raises(MixtralOffloadError, match="activations must be one of"):
        kernels.matmul(qm, np.zeros((1, 128), np.float32), activations="int4")


def test_int8_error_is_small_beside_the_weight_error():
    """On Gaussian weights and x, the activation rounding adds far less error than int4 weights do."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 1024)).astype(np.float32)
    x = rng.standard_normal((8, 1024)).astype(np.float32)
    qm = quantize(w, QuantSpec(4, 64))
    exact = x @ w.T
    weight_error = relative(kernels.matmul(qm, x), exact)
    both_error = relative(kernels.matmul(qm, x, activations="int8"), exact)
    assert both_error < weight_error * 1.1


def test_model_nll_int8_close_to_float32_teacher_forced(converted_int4):
    text = "Experts that are not in the cache are computed where they lie. " * 4
    exact = np.array(load(converted_int4, dtype="float32", activations="float32", dense="stored").perplexity(text).nll)
    fast = np.array(load(converted_int4, dtype="float32", activations="int8", dense="stored").perplexity(text).nll)
    assert np.corrcoef(exact, fast)[0, 1] > 0.99
    assert np.abs(exact - fast).mean() < 0.05


@njit(cache=True)
def _silu_each(a):
    out = np.empty_like(a)
    for i in range(a.size):
        out[i] = silu(a[i])
    return out


def test_silu_matches_float64_and_keeps_nonfinite():
    """The polynomial exp2 inside silu: within 1e-6 of float64 silu (absolute below |silu| = 1, relative
    above) over the range activations reach, and NaN or an infinity never comes out finite."""
    a = np.concatenate([np.linspace(-120, 120, 400_001), np.geomspace(1e-30, 1e30, 1001),
                        -np.geomspace(1e-30, 1e30, 1001)]).astype(np.float32)
    with np.errstate(over="ignore"):
        exact = a.astype(np.float64) / (1.0 + np.exp(-a.astype(np.float64)))
    got = _silu_each(a).astype(np.float64)
    assert np.all(np.abs(got - exact) <= 1e-6 * np.maximum(1.0, np.abs(exact)))
    for special in (np.nan, np.inf, -np.inf):
        assert not np.isfinite(_silu_each(np.array([special], np.float32))[0])
