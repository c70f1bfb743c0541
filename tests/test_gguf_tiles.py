"""Q4_0 experts through the int8x tiles (quant/gguf_tiles.py), reading the blocks in place: the results are
the int8x kernels' on the same weights held as a pool matrix (whose weights equal gguf.quants'), within
float32 rounding of the float64 reference."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from mixtral_offload.quant import gguf_tiles, int8x
from mixtral_offload.quant.format import QuantizedMatrix, QuantSpec
from mixtral_offload.quant.gguf_blocks import GGUFMatrix
from mixtral_offload.quant.gguf_kernels import gguf_expert_kernel, gguf_experts_kernel
from mixtral_offload.quant.quantize import dequantize as pool_dequantize


def q4_0(rows, cols, seed, scale=1.0):
    w = (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float32)
    return GGUFMatrix(Q.Q4_0, (rows, cols), np.ascontiguousarray(quantize(w, Q.Q4_0)))


def as_int4(m: GGUFMatrix) -> QuantizedMatrix:
    """The pool's int4 group-32 matrix of a Q4_0 matrix: its code bytes, d as the scales, zeros 8."""
    blocks = m.data.reshape(m.rows, m.cols // 32, 18)
    return QuantizedMatrix(QuantSpec(4, 32), (m.rows, m.cols),
                           np.ascontiguousarray(blocks[:, :, 2:]).reshape(m.rows, m.cols // 2),
                           np.ascontiguousarray(blocks[:, :, :2]).view(np.float16).reshape(m.rows, -1),
                           np.full((m.rows, m.cols // 32), 8.0, np.float16))


def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("rows,cols", [(1, 32), (37, 256), (9, 4096)])
def test_q4_0_blocks_are_the_pools_int4_group_32(rows, cols):
    m = q4_0(rows, cols, seed=rows + cols)
    assert np.array_equal(pool_dequantize(as_int4(m)), dequantize(m.data.reshape(rows, m.row_bytes), Q.Q4_0))


# 640 columns: 20 groups, one whole super-block of 16 and a tail of 4; 67 rows: a partial tile and task
@pytest.mark.parametrize("rows,cols", [(37, 512), (67, 640), (5, 128)])
@pytest.mark.parametrize("tokens", [1, 5, 12, 33])
def test_matmul_equals_the_int8x_reference_on_the_same_weights(rows, cols, tokens):
    m = q4_0(rows, cols, seed=tokens + rows)
    x = np.random.default_rng(tokens).standard_normal((tokens, cols)).astype(np.float32)
    assert relative(gguf_tiles.matmul(m, x), int8x.reference_matmul(as_int4(m), x)) < 1e-5


def test_expert_forward_equals_int8x_on_the_same_weights():
    w1, w3, w2 = q4_0(256, 128, 1, 0.1), q4_0(256, 128, 2, 0.1), q4_0(128, 256, 3, 0.1)
    x = np.random.default_rng(0).standard_normal((30, 128)).astype(np.float32)
    expected = int8x.expert_forward(*(as_int4(m) for m in (w1, w3, w2)), x)
    assert relative(gguf_tiles.expert_forward(w1, w3, w2, x), expected) < 1e-5


def test_the_file_kernel_takes_the_tiles_for_a_prompts_q4_0_tokens_only():
    w1, w3, w2 = q4_0(256, 128, 1, 0.1), q4_0(256, 128, 2, 0.1), q4_0(128, 256, 3, 0.1)
    run, rows = gguf_experts_kernel("int8"), gguf_expert_kernel(Q.Q4_0, Q.Q4_0, "int8")
    rng = np.random.default_rng(1)
    few = rng.standard_normal((gguf_tiles.TILES_MIN_TOKENS - 1, 128)).astype(np.float32)
    many = rng.standard_normal((gguf_tiles.TILES_MIN_TOKENS, 128)).astype(np.float32)
    assert np.array_equal(run(w1, w3, w2, few), rows(w1, w3, w2, few))
    assert np.array_equal(run(w1, w3, w2, many), gguf_tiles.expert_forward(w1, w3, w2, many))
    # both are int8-activation kernels on the same weights: close, not equal (llama.cpp's Q8_0 keeps x's
    # scales in float16, the tiles in float32)
    assert relative(run(w1, w3, w2, many), rows(w1, w3, w2, many)) < 0.02
    # other types, float32 activations, and widths the tiles do not cover keep the row kernels
    q8 = [GGUFMatrix(Q.Q8_0, m.shape, np.ascontiguousarray(quantize(dequantize(m.data.reshape(m.rows, -1), Q.Q4_0), Q.Q8_0)))
          for m in (w1, w3, w2)]
    assert not gguf_tiles.takes(*q8, 64)
    assert not gguf_tiles.takes(q4_0(64, 96, 4), q4_0(64, 96, 5), q4_0(96, 64, 6), 64)
    exact = gguf_experts_kernel("float32")
    assert np.array_equal(exact(w1, w3, w2, many), gguf_expert_kernel(Q.Q4_0, Q.Q4_0, "float32")(w1, w3, w2, many))
