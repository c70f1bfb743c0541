"""Q4_0 experts through the int8x tiles (quant/gguf_tiles.py): the repack is exact, and the results are the
int8x kernels' on the same weights, against references nobody here wrote (gguf.quants) and the float64 one."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from mixtral_offload.quant import gguf_tiles, int8x
from mixtral_offload.quant.gguf_blocks import GGUFMatrix
from mixtral_offload.quant.gguf_kernels import gguf_expert_kernel, gguf_experts_kernel
from mixtral_offload.quant.quantize import dequantize as pool_dequantize


def q4_0(rows, cols, seed, scale=1.0):
    w = (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float32)
    return GGUFMatrix(Q.Q4_0, (rows, cols), np.ascontiguousarray(quantize(w, Q.Q4_0)))


def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("rows,cols,first,count", [(1, 32, 0, 1), (37, 256, 0, 37), (37, 256, 5, 20), (9, 4096, 8, 1)])
def test_repacked_rows_are_gguf_quants_weights(rows, cols, first, count):
    m = q4_0(rows, cols, seed=rows + cols)
    expected = dequantize(m.data.reshape(rows, m.row_bytes), Q.Q4_0)[first:first + count]
    assert np.array_equal(pool_dequantize(gguf_tiles.as_int4(m, first, count)), expected)


@pytest.mark.parametrize("tokens", [1, 5, 24, 33])
def test_matmul_in_chunks_equals_the_int8x_reference(monkeypatch, tokens):
    monkeypatch.setattr(gguf_tiles, "CHUNK_ROWS", 16)  # 37 rows: chunks of 16, 16 and 5
    m = q4_0(37, 512, seed=tokens)
    x = np.random.default_rng(tokens).standard_normal((tokens, 512)).astype(np.float32)
    assert relative(gguf_tiles.matmul(m, x), int8x.reference_matmul(gguf_tiles.as_int4(m), x)) < 1e-5


def test_expert_forward_equals_int8x_on_the_repacked_weights(monkeypatch):
    monkeypatch.setattr(gguf_tiles, "CHUNK_ROWS", 64)
    w1, w3, w2 = q4_0(256, 128, 1, 0.1), q4_0(256, 128, 2, 0.1), q4_0(128, 256, 3, 0.1)
    x = np.random.default_rng(0).standard_normal((30, 128)).astype(np.float32)
    expected = int8x.expert_forward(*(gguf_tiles.as_int4(m) for m in (w1, w3, w2)), x)
    assert relative(gguf_tiles.expert_forward(w1, w3, w2, x), expected) < 1e-6


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
