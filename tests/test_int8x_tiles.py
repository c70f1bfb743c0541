"""Many-token int8-activation tiles (quant/int8x_tiles.py) and the int8 peak loop against NumPy references."""
import numpy as np
import pytest
from llvmlite import binding
from numba import njit

from mixtral_offload.quant import compute_peak, int8x, int8x_lanes, int8x_tiles, kernels
from mixtral_offload.quant.bench import random_quantized
from mixtral_offload.quant.format import QuantSpec, kernel_parts

HOST_FEATURES = {name for name, on in binding.get_host_cpu_features().items() if on}
TOKENS = [1, 3, 4, 17, 64]


def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def runnable(isa):
    return isa == "generic" or {"vnni": "avx512vnni", "avx2": "avx2"}[isa] in HOST_FEATURES


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("tokens", TOKENS)
# 1408 columns: super-blocks of 16 groups whole and cut short (G=32, 64) or only cut short (128);
# 2048: only whole ones; 131 rows: three tasks, the last one partial
@pytest.mark.parametrize("rows,cols", [(7, 1408), (131, 2048)])
def test_tiles_equal_the_reference(bits, group_size, tokens, rows, cols):
    qm = random_quantized(QuantSpec(bits, group_size), (rows, cols), seed=rows + tokens)
    x = np.random.default_rng(tokens).standard_normal((tokens, cols)).astype(np.float32)
    x[:, :group_size] *= 1e-3  # groups of very different scales
    assert relative(int8x_tiles.matmul(qm, x), int8x.reference_matmul(qm, x)) < 1e-5


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("isa", int8x.ISAS)
def test_every_instruction_set_equals_the_reference(bits, isa):
    """The VNNI, AVX2 and generic forms (those this CPU can run), on a tile that divides nothing."""
    if not runnable(isa):
        pytest.skip(f"this CPU cannot run the {isa} form")
    tiles = int8x_tiles.make_tiles_kernel(bits, isa=isa, tile=(3, 5))

    @njit
    def some_rows(codes, scales, zeros, xperm, dx, xqsum, out, first, end, cols):
        buf_codes = np.empty(3 * xperm.shape[1], np.uint8)
        buf_scales = np.empty(6 * dx.shape[1], np.float32)
        tiles(codes, scales, zeros, xperm, dx, xqsum, out, buf_codes, buf_scales, np.uint64(first), np.uint64(end),
              np.uint64(0), np.uint64(cols), np.uint64(64))

    cols = 1152  # 18 groups: one whole super-block and one of 2 groups
    qm = random_quantized(QuantSpec(bits, 64), (9, cols), seed=3)
    codes, scales, zeros = (part.reshape(-1) for part in kernel_parts(qm))
    for tokens in TOKENS:
        x = np.random.default_rng(tokens).standard_normal((tokens, cols)).astype(np.float32)
        out = np.full((tokens, 8), np.nan, np.float32)
        some_rows(codes, scales, zeros, *int8x_lanes.quantize_lanes(x, 64, bits), out, 1, 9, cols)  # rows 1..8
        assert relative(out, int8x.reference_matmul(qm, x)[:, 1:]) < 1e-5


@pytest.mark.parametrize("bits", [4, 8])
def test_int8x_dispatches_many_tokens_to_the_tiles(bits, monkeypatch):
    qm = random_quantized(QuantSpec(bits, 64), (70, 256), seed=5)
    rng = np.random.default_rng(5)
    calls, tiles_matmul = [], int8x_tiles.matmul
    monkeypatch.setattr(int8x_tiles, "matmul", lambda qm, x: calls.append(len(x)) or tiles_matmul(qm, x))
    for tokens in (int8x.TILES_MIN_TOKENS[bits] - 1, int8x.TILES_MIN_TOKENS[bits]):
        x = rng.standard_normal((tokens, 256)).astype(np.float32)
        assert relative(int8x.matmul(qm, x), int8x.reference_matmul(qm, x)) < 1e-5
    assert calls == [int8x.TILES_MIN_TOKENS[bits]]


@pytest.mark.parametrize("bits", [4, 8])
def test_expert_forward_through_the_tiles_equals_its_reference(bits):
    spec = QuantSpec(bits, 64)
    w1, w3 = random_quantized(spec, (384, 256), 1), random_quantized(spec, (384, 256), 2)
    w2 = random_quantized(spec, (256, 384), 3)
    x = np.random.default_rng(0).standard_normal((17, 256)).astype(np.float32)
    gate, up = (int8x.reference_matmul(w, x).astype(np.float64) for w in (w1, w3))
    hidden = (gate / (1 + np.exp(-gate)) * up).astype(np.float32)
    got = kernels.expert_forward(w1, w3, w2, x, activations="int8")
    # h is requantized from float32 sums a few ulps off the float64 ones (see test_int8_activations)
    assert relative(got, int8x.reference_matmul(w2, hidden)) < 1e-3


@pytest.mark.parametrize("isa", int8x.ISAS)
def test_peak_loop_computes_the_dot_products(isa):
    """The peak loop's accumulators hold the u8 x s8 sums NumPy computes (codes <= 15: no AVX2 saturation)."""
    if not runnable(isa):
        pytest.skip(f"this CPU cannot run the {isa} form")
    mac_loop = compute_peak.make_mac_loop(isa)

    @njit
    def run(operands, rounds):
        return mac_loop(operands, rounds)

    rng = np.random.default_rng(4)
    operands = np.concatenate([rng.integers(0, 16, 128), rng.integers(-120, 100, 64)]).astype(np.int8)
    codes = operands[:128].astype(np.int64).reshape(2, 64)
    rounds = 5
    expected = sum(int((codes[k % 2] * (operands[128:].astype(np.int64) + i)).sum())
                   for i in range(rounds) for k in range(compute_peak.ACCUMULATORS))
    assert run(operands, np.int64(rounds)) == expected
    assert compute_peak.measure_int8_peak(1, repeats=1) > 0


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (8, 64)])
def test_quantize_lanes_puts_group_l_in_lane_l(bits, group_size):
    """x in the lane order: per super-block of 16 groups, vector k, plane p, lane l holds the 4 codes
    of group l at plane p, bytes 4k..4k+3 (NumPy reshape of the row-order int8 x); padding is zero."""
    cols, planes = 20 * group_size, int8x.PLANES[bits]
    x = np.random.default_rng(1).standard_normal((3, cols)).astype(np.float32)
    xperm, dx, xqsum = int8x_lanes.quantize_lanes(x, group_size, bits)
    scale = np.abs(x.reshape(3, 20, group_size)).max(axis=2) / 127
    q = np.rint(x.reshape(3, 20, group_size) / scale[..., None]).astype(np.int8)
    q = np.concatenate([q, np.zeros((3, 12, group_size), np.int8)], axis=1)  # 2 super-blocks
    vectors = group_size // planes // 4
    expected = q.reshape(3, 2, 16, planes, vectors, 4).transpose(0, 1, 4, 3, 2, 5).reshape(3, 32 * group_size)
    np.testing.assert_array_equal(xperm, expected)
    np.testing.assert_allclose(dx[:, :20], scale, rtol=1e-6)
    assert not dx[:, 20:].any() and not xqsum[:, 20:].any()
