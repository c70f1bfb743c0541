"""Numba kernels against the NumPy reference on the dequantized weights (1e-5 relative contract)."""

import numpy as np
import pytest

from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.quant import QuantSpec, dequantize, dequantize_fast, expert_forward, matmul, quantize
from mixtral_offload.quant.float_kernels import K_CHUNK

SPECS = [QuantSpec(b, g) for b in (4, 8) for g in (32, 64, 128)]


def _rel(y, ref):
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 37])  # not multiples of the 4-row block
@pytest.mark.parametrize("tokens", [1, 3, 9])
def test_matmul_matches_reference(spec, rows, tokens):
    rng = np.random.default_rng(rows * 100 + tokens + spec.bits + spec.group_size)
    cols = spec.group_size * 3
    qm = quantize(rng.standard_normal((rows, cols)).astype(np.float32), spec)
    w = dequantize(qm)
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    y = matmul(qm, x)
    assert y.shape == (tokens, rows) and y.dtype == np.float32
    assert _rel(y, x @ w.T) < 1e-5
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-5 * np.abs(x @ w.T).max())
    if tokens == 1:
        y1 = matmul(qm, x[0])
        assert y1.shape == (rows,) and _rel(y1, w @ x[0]) < 1e-5


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("tokens", [2, 3, 4, 5, 64])  # around the batched path's threshold, odd and even
def test_batched_matmul_spans_column_chunks(spec, tokens):
    # cols over one K_CHUNK and not a multiple of it: a full chunk, then a partial one
    rng = np.random.default_rng(tokens + spec.bits * 7 + spec.group_size)
    rows, cols = 13, K_CHUNK + 3 * spec.group_size
    qm = quantize(rng.standard_normal((rows, cols)).astype(np.float32), spec)
    w = dequantize(qm)
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    assert _rel(matmul(qm, x), x @ w.T) < 1e-5


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_dequantize_fast_equals_reference(spec):
    qm = quantize(np.random.default_rng(5).standard_normal((9, 256)).astype(np.float32), spec)
    np.testing.assert_array_equal(dequantize_fast(qm), dequantize(qm))


def _expert_reference(w1, w3, w2, x):
    a = x @ dequantize(w1).T
    b = x @ dequantize(w3).T
    return (a / (1.0 + np.exp(-a)) * b) @ dequantize(w2).T


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 64), QuantSpec(8, 64), QuantSpec(8, 128)], ids=str)
@pytest.mark.parametrize("tokens", [1, 5])
def test_expert_forward_matches_reference(spec, tokens):
    rng = np.random.default_rng(tokens + spec.bits)
    hidden, inter = 128, 384 + 2 * spec.group_size  # I not a multiple of 4 rows x group in general
    w1, w3 = (quantize(rng.standard_normal((inter, hidden)).astype(np.float32) * 0.1, spec) for _ in range(2))
    w2 = quantize(rng.standard_normal((hidden, inter)).astype(np.float32) * 0.1, spec)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    y = expert_forward(w1, w3, w2, x)
    assert y.shape == (tokens, hidden)
    assert _rel(y, _expert_reference(w1, w3, w2, x)) < 1e-5
    if tokens == 1:
        assert _rel(expert_forward(w1, w3, w2, x[0]), _expert_reference(w1, w3, w2, x)[0]) < 1e-5


def test_bad_activations_and_shapes_refused():
    spec = QuantSpec(4, 32)
    qm = quantize(np.ones((8, 64), np.float32), spec)
    with pytest.raises(MixtralOffloadError):
        matmul(qm, np.ones((2, 32), np.float32))
    with pytest.raises(MixtralOffloadError):
        matmul(qm, [1.0] * 64)
    with pytest.raises(MixtralOffloadError):
        matmul(qm, np.ones(64, np.float32), activations="int4")
    with pytest.raises(MixtralOffloadError):
        expert_forward(qm, qm, qm, np.ones((1, 64), np.float32))
