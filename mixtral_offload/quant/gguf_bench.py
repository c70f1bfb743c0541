"""GGUF kernel benchmark rows for `mixtral-offload bench kernels --gguf`, and random valid GGUF matrices.

Rows have quant/bench.py's schema; kernel names read "gguf Q4_K matvec [int8-x]" and `bits` holds
the type's bits per weight (bytes per block x 8 / weights per block). Every call reads a different
copy of its matrix (quant/bench.py's rotation), so the weights come from DRAM.
"""

from __future__ import annotations

import numpy as np

from mixtral_offload.quant.bench import MIXTRAL_SHAPES, _copies, _rotating_median, _row
from mixtral_offload.quant.gguf_blocks import BLOCK_TYPES, GGMLQuantizationType, GGUFMatrix, block_type
from mixtral_offload.quant.gguf_kernels import gguf_matmul


def random_gguf_matrix(qtype: GGMLQuantizationType, shape: tuple[int, int], seed: int = 0) -> GGUFMatrix:
    """A matrix of random valid blocks: random code bytes, float16 scales in [1e-3, 2e-3); float types N(0, 1)."""
    bt = block_type(qtype)
    rng = np.random.default_rng(seed)
    rows, cols = shape
    if not bt.quantized:
        w = rng.standard_normal((rows, cols), dtype=np.float32)
        if bt.qtype == GGMLQuantizationType.F16:
            return GGUFMatrix(qtype, shape, w.astype(np.float16))
        if bt.qtype == GGMLQuantizationType.BF16:
            return GGUFMatrix(qtype, shape, np.ascontiguousarray(w.view(np.uint16)[:, 1::2]))
        return GGUFMatrix(qtype, shape, w)
    blocks = rng.integers(0, 256, (rows, cols // bt.block_cols, bt.block_bytes), dtype=np.uint8)
    for field in bt.f16_fields:
        scales = (rng.random(blocks.shape[:2], dtype=np.float32) * 1e-3 + 1e-3).astype(np.float16)
        blocks[:, :, field:field + 2] = scales.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return GGUFMatrix(qtype, shape, blocks)


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    bt = block_type(qtype)
    return bt.block_bytes * 8 / bt.block_cols


def run_gguf_bench(threads: tuple[int, ...], tokens: tuple[int, ...], repeats: int, bandwidth: dict[int, float],
                   peak: dict[int, float], shapes: tuple[tuple[int, int], ...] = MIXTRAL_SHAPES) -> list[dict]:
    """Rows timing gguf_matmul for every supported type on `shapes` (bandwidth: GB/s and peak: int8 G MAC/s,
    by thread count)."""
    results = []
    for shape in shapes:
        x_all = np.random.default_rng(1).standard_normal((max(tokens), shape[1])).astype(np.float32)
        for qtype, bt in BLOCK_TYPES.items():
            nbytes = shape[0] * shape[1] // bt.block_cols * bt.block_bytes
            copies = [random_gguf_matrix(qtype, shape, seed) for seed in range(_copies(nbytes))]
            for activations in ("float32", "int8") if bt.quantized else ("float32",):
                for t in threads:
                    for n in tokens:
                        x = x_all[:n]
                        seconds = _rotating_median(lambda m: gguf_matmul(m, x, activations), copies, repeats, t)
                        name = f"gguf {bt.name} " + ("matvec" if n == 1 else f"matmul T={n}")
                        name += " int8-x" if activations == "int8" else ""
                        results.append(_row(name, round(bits_per_weight(qtype), 2), shape, t, n, seconds, nbytes,
                                            bandwidth[t], activations, shape[0] * shape[1] * n, peak[t]))
            del copies
    return results
