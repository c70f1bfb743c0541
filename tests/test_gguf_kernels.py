"""GGUF block kernels (quant/gguf_kernels.py) against gguf.quants.dequantize, llama.cpp's own NumPy reference."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given, settings
from hypothesis import strategies as st
from gguf.quants import dequantize, quantize
from numba import njit

from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.quant import gguf_int8, gguf_vectors
from mixtral_offload.quant.gguf_bench import random_gguf_matrix
from mixtral_offload.quant.gguf_blocks import BLOCK_TYPES, GGUFMatrix, block_type, check_nbytes
from mixtral_offload.quant.gguf_kernels import gguf_dequantize, gguf_expert_forward, gguf_expert_kernel, gguf_linear_kernel, gguf_matmul

HOST_FEATURES = {name for name, on in __import__("llvmlite.binding").binding.get_host_cpu_features().items() if on}
TYPES = list(BLOCK_TYPES)
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def error_per_term(y, reference, x, w):
    """Largest |y - reference| over the sum of |x| |w| it came from: float32 rounding is bounded by that sum,
    not by the result, which cancellation can bring near zero."""
    return float(np.abs(y - reference).max() / (np.abs(x.astype(np.float64)) @ np.abs(w).T).max())


def make_matrix(qtype, rows, cols, seed):
    """Q4_0/Q8_0/F16/BF16/F32 by gguf's own quantizer from Gaussian weights; K-quants as random valid blocks."""
    if qtype in K_QUANTS:
        return random_gguf_matrix(qtype, (rows, cols), seed)
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return GGUFMatrix(qtype, (rows, cols), np.ascontiguousarray(quantize(w, qtype)))


def weights(m):
    """gguf.quants' float32 [rows, cols] of a matrix's bytes."""
    return dequantize(m.data.reshape(m.rows, m.row_bytes), m.qtype).astype(np.float64)


def int8_reference(m, x):
    """dequantize(W) @ the dequantized int8 x (float types: x itself), in float64."""
    bt = m.block_type
    xd = gguf_int8.dequantized_x(x, bt.act_cols) if bt.quantized else x
    return xd.astype(np.float64) @ weights(m).T


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows,cols", [(8, 256), (37, 512)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_matmul_float_x_equals_dequantize_times_x(qtype, rows, cols, tokens):
    m = make_matrix(qtype, rows, cols, seed=rows + tokens)
    x = np.random.default_rng(tokens).standard_normal((tokens, cols)).astype(np.float32)
    y = gguf_matmul(m, x)
    assert y.shape == (tokens, rows) and y.dtype == np.float32
    assert relative(y, x.astype(np.float64) @ weights(m).T) < 1e-5


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows,cols", [(8, 256), (64, 512)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_matmul_int8_x_equals_dequantize_times_quantized_x(qtype, rows, cols, tokens):
    m = make_matrix(qtype, rows, cols, seed=rows * tokens)
    x = np.random.default_rng(tokens + 7).standard_normal((tokens, cols)).astype(np.float32)
    y = gguf_matmul(m, x, activations="int8")
    assert relative(y, int8_reference(m, x)) < 1e-5
    exact = gguf_matmul(m, x)
    if m.block_type.quantized:
        assert 1e-5 < relative(y, exact) < 0.05  # the activation rounding, and no more
    else:
        assert np.array_equal(y, exact)  # float types compute on float x in both modes


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(qtype=st.sampled_from(TYPES), rows=st.integers(1, 40), blocks=st.integers(1, 5), tokens=st.integers(1, 9),
       seed=st.integers(0, 2**16), x_scale=st.sampled_from([1e-4, 1.0, 1e3]))
def test_both_paths_equal_their_references_fuzzed(qtype, rows, blocks, tokens, seed, x_scale):
    """Any type, shape (whole blocks, odd Q4_0/Q8_0 counts too), token count either side of the prefill route."""
    cols = blocks * (32 if qtype in (Q.Q4_0, Q.Q8_0) else 256)
    m = random_gguf_matrix(qtype, (rows, cols), seed)
    x = np.random.default_rng(seed).standard_normal((tokens, cols)).astype(np.float32) * np.float32(x_scale)
    w = weights(m)
    assert error_per_term(gguf_matmul(m, x), x.astype(np.float64) @ w.T, x, w) < 1e-6
    assert error_per_term(gguf_matmul(m, x, activations="int8"), int8_reference(m, x), x, w) < 1e-6


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0, Q.F16], ids=lambda q: q.name)
@pytest.mark.parametrize("tokens", [3, 5])
def test_rows_ending_mid_vector(qtype, tokens):
    """288 columns: the int8 dot's last 64-byte vector is half past the row (x is zero there)."""
    m = make_matrix(qtype, 9, 288, seed=4)
    x = np.random.default_rng(4).standard_normal((tokens, 288)).astype(np.float32)
    assert relative(gguf_matmul(m, x), x.astype(np.float64) @ weights(m).T) < 1e-5
    assert relative(gguf_matmul(m, x, activations="int8"), int8_reference(m, x)) < 1e-5


def test_matvec_takes_a_vector():
    m = make_matrix(Q.Q4_K, 16, 256, seed=1)
    x = np.random.default_rng(1).standard_normal(256).astype(np.float32)
    assert np.array_equal(gguf_matmul(m, x), gguf_matmul(m, x[None, :])[0])


def test_q8_0_activations_are_llama_cpp_q8_0():
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32) * np.linspace(0.01, 10, 256)
    x[1, :32] = 0.0  # an all-zero block: scale 0, codes 0
    xq, d = gguf_int8.quantize_x(x, 32)
    blocks = quantize(x, Q.Q8_0).reshape(3, 8, 34)
    assert np.array_equal(blocks[:, :, 2:].view(np.int8).reshape(3, 256), xq)
    assert np.array_equal(blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32), d)
    assert np.array_equal(gguf_int8.dequantized_x(x, 32), dequantize(quantize(x, Q.Q8_0), Q.Q8_0))


@pytest.mark.parametrize("w13,w2", [(Q.Q4_K, Q.Q6_K), (Q.Q4_0, Q.Q4_0), (Q.Q5_K, Q.Q8_0), (Q.BF16, Q.F16)],
                         ids=lambda q: q.name)
@pytest.mark.parametrize("tokens", [1, 6])
def test_expert_forward_equals_the_reference(w13, w2, tokens):
    hidden, inter = 256, 512
    w1, w3 = make_matrix(w13, inter, hidden, 1), make_matrix(w13, inter, hidden, 2)
    down = make_matrix(w2, hidden, inter, 3)
    x = np.random.default_rng(tokens).standard_normal((tokens, hidden)).astype(np.float32)
    gate, up = x.astype(np.float64) @ weights(w1).T, x.astype(np.float64) @ weights(w3).T
    hidden_act = gate / (1 + np.exp(-gate)) * up
    assert relative(gguf_expert_forward(w1, w3, down, x), hidden_act @ weights(down).T) < 1e-5
    got = gguf_expert_forward(w1, w3, down, x, activations="int8")
    xd = gguf_int8.dequantized_x(x, w1.block_type.act_cols) if w1.block_type.quantized else x
    gate, up = xd.astype(np.float64) @ weights(w1).T, xd.astype(np.float64) @ weights(w3).T
    h = (gate / (1 + np.exp(-gate)) * up).astype(np.float32)
    # h is quantized from float32 values that differ from this float64 h in the last bits, so a code
    # may round the other way: a step of 1/254 of a block's largest |h| at most
    assert relative(got, int8_reference(down, h)) < 1e-3
    assert relative(gguf_expert_forward(w1, w3, down, x[0]), gguf_expert_forward(w1, w3, down, x[:1])[0]) == 0


@pytest.mark.parametrize("sub_cols,signed", [(32, False), (16, False), (32, True)])
@pytest.mark.parametrize("isa", ["vnni", "avx2", "generic"])
def test_every_instruction_set_gives_the_integer_sums(sub_cols, signed, isa):
    """The chunk dot for each CPU family (run here where this CPU can) equals NumPy's integer sums."""
    if isa != "generic" and {"vnni": "avx512vnni", "avx2": "avx2"}[isa] not in HOST_FEATURES:
        pytest.skip(f"this CPU cannot run the {isa} form")
    chunk_dot = gguf_int8.make_chunk_dot(sub_cols, signed, isa=isa)

    @njit
    def run(u, scale, offset, xq, dsub, xoff):
        return chunk_dot(u, 0, scale, offset, xq, dsub, xoff, 64, 64 // sub_cols, u.shape[0] // 64)

    rng = np.random.default_rng(sub_cols)
    u = rng.integers(-128, 128, 512).astype(np.int8).view(np.uint8) if signed else rng.integers(0, 64, 512, np.uint8)
    xq = rng.integers(-127, 128, 64 + 512).astype(np.int8)  # read from element 64 on
    scale, offset = rng.random(512 // sub_cols, np.float32), rng.random(512 // sub_cols, np.float32)
    dsub, xoff = rng.random((2, (64 + 512) // sub_cols), np.float32)
    codes = (u.view(np.int8) if signed else u).astype(np.int64)
    sums = (codes * xq[64:]).reshape(-1, sub_cols).sum(axis=1)
    terms = np.concatenate([sums * scale.astype(np.float64) * dsub[64 // sub_cols:],
                            -offset.astype(np.float64) * xoff[64 // sub_cols:]])
    assert abs(run(u, scale, offset, xq, dsub, xoff) - terms.sum()) <= 1e-5 * np.abs(terms).sum()


@pytest.mark.parametrize("qtype,sub_cols,signed", [(Q.Q8_0, 32, True), (Q.Q6_K, 16, False)], ids=["Q8_0", "Q6_K"])
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_block_reading_dots_for_other_cpus(qtype, sub_cols, signed, isa):
    """The dots that read codes and scales straight from the blocks, built for other CPUs, give one row's dot."""
    if isa != "generic" and "avx2" not in HOST_FEATURES:
        pytest.skip("this CPU cannot run the avx2 form")
    unit = {Q.Q8_0: gguf_vectors.Q8_0_UNIT, Q.Q6_K: gguf_vectors.Q6_K_UNIT}[qtype]
    dot = gguf_int8.make_chunk_dot(sub_cols, signed, unit, isa=isa)

    @njit
    def run(raw, xq, dsub, xoff, units):
        unused = np.zeros(1, np.float32)
        return dot(raw, 0, unused, unused, xq, dsub, xoff, 0, 0, units)

    m = make_matrix(qtype, 1, 512, seed=5)
    x = np.random.default_rng(5).standard_normal((1, 512)).astype(np.float32)
    xq, dsub, xoff = gguf_int8.kernel_activations(x, m.block_type)
    got = run(m.data, xq.reshape(-1), dsub.reshape(-1), xoff.reshape(-1), 512 // unit.cols)
    assert relative(np.array([got]), int8_reference(m, x)[0]) < 1e-5


def test_kernels_chosen_at_load_equal_the_checked_entry_points():
    w1, w3, w2 = make_matrix(Q.Q4_K, 512, 256, 1), make_matrix(Q.Q4_K, 512, 256, 2), make_matrix(Q.Q6_K, 256, 512, 3)
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    for mode in ("float32", "int8"):
        assert np.array_equal(gguf_linear_kernel(Q.Q4_K, mode)(w1, x), gguf_matmul(w1, x, mode))
        expert = gguf_expert_kernel(int(Q.Q4_K), int(Q.Q6_K), mode)
        assert np.array_equal(expert(w1, w3, w2, x), gguf_expert_forward(w1, w3, w2, x, mode))
    with pytest.raises(MixtralOffloadError, match="IQ2_XXS has no kernel here"):
        gguf_linear_kernel(Q.IQ2_XXS, "int8")


def test_unknown_and_unsupported_types_are_one_line_errors():
    with pytest.raises(MixtralOffloadError, match="unknown GGUF tensor type 999"):
        block_type(999)
    with pytest.raises(MixtralOffloadError, match="Q2_K has no kernel here.*convert"):
        GGUFMatrix(Q.Q2_K, (4, 256), np.zeros(4 * 84, np.uint8))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_bad_byte_lengths_are_refused(qtype):
    bt = block_type(qtype)
    nbytes = check_nbytes(qtype, (4, 256), 4 * 256 // bt.block_cols * bt.block_bytes)
    for wrong in (nbytes - 1, nbytes + bt.block_bytes, 0):
        with pytest.raises(MixtralOffloadError, match=f"{bt.name} tensor of shape"):
            GGUFMatrix(qtype, (4, 256), np.zeros(wrong, np.uint8))
    if bt.block_cols > 1:
        with pytest.raises(MixtralOffloadError, match="whole blocks"):
            GGUFMatrix(qtype, (4, 16), np.zeros(nbytes, np.uint8))


def test_bad_shapes_and_activations_are_refused():
    m = make_matrix(Q.Q4_0, 8, 256, seed=0)
    with pytest.raises(MixtralOffloadError, match="must be 2D"):
        GGUFMatrix(Q.Q4_0, (2, 4, 256), np.zeros(8 * 144, np.uint8))
    with pytest.raises(MixtralOffloadError, match=r"shape \[T, 256\]"):
        gguf_matmul(m, np.zeros((1, 128), np.float32))
    with pytest.raises(MixtralOffloadError, match="activations must be one of"):
        gguf_matmul(m, np.zeros((1, 256), np.float32), activations="int4")
    w3 = make_matrix(Q.Q8_0, 8, 256, seed=1)
    with pytest.raises(MixtralOffloadError, match="share a GGUF type"):
        gguf_expert_forward(m, w3, make_matrix(Q.F32, 256, 8, 2), np.zeros(256, np.float32))


def test_gguf_bench_rows_cover_every_type(monkeypatch):
    from mixtral_offload.quant import bench as quant_bench
    from mixtral_offload.quant.gguf_bench import run_gguf_bench

    monkeypatch.setattr(quant_bench, "ROTATION_BYTES", 1 << 20)
    rows = run_gguf_bench((1,), (1, 3), repeats=2, bandwidth={1: 10.0}, peak={1: 100.0},
                          shapes=((64, 256),))
    quantized = [bt for bt in BLOCK_TYPES.values() if bt.quantized]
    assert len(rows) == 2 * (2 * len(quantized) + len(BLOCK_TYPES) - len(quantized))
    assert {r["kernel"] for r in rows} >= {"gguf Q4_K matvec", "gguf Q6_K matmul T=3 int8-x", "gguf BF16 matvec"}
    q4_k = next(r for r in rows if r["kernel"] == "gguf Q4_K matvec")
    # gbs counts the matrix bytes: 64 rows of one 144-byte block (ms is rounded to 1 us, hence rel)
    assert q4_k["bits"] == 4.5 and q4_k["gbs"] == pytest.approx(64 * 144 / (q4_k["ms"] / 1e3) / 1e9, rel=0.1)


def test_bench_kernels_gguf_flag_adds_the_rows(monkeypatch):
    from click.testing import CliRunner

    from mixtral_offload.cli.main import cli
    from mixtral_offload.quant import bench as quant_bench

    calls = []
    monkeypatch.setattr(quant_bench, "run_kernel_bench", lambda **kw: calls.append(kw) or {"results": []})
    result = CliRunner().invoke(cli, ["bench", "kernels", "--gguf", "--json"])
    assert result.exit_code == 0, result.output
    assert calls[0]["gguf"] is True


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows,cols", [(1, 256), (37, 512), (70, 1024)])
def test_dequantize_equals_gguf_quants_exactly(qtype, rows, cols):
    """The load's decoder of dense GGUF tensors against gguf-py's: the same float32 values, every row
    (d * 0 may come out as -0 there and +0 here: equal as numbers)."""
    m = make_matrix(qtype, rows, cols, seed=rows * cols)
    got = gguf_dequantize(m)
    assert got.dtype == np.float32 and got.shape == (rows, cols)
    assert np.array_equal(got, dequantize(m.data.reshape(rows, m.row_bytes), m.qtype))
