"""Dense weights (attention projections, the output head) held as int8 per group for the CPU kernels.

`--dense int8` quantizes them at load, one tensor at a time as they are read (round-to-nearest,
symmetric, groups of 64 along the input: 0.59% relative error on a Gaussian matrix, the format of
llama.cpp's Q8_0 with a float16 scale). Decode then reads 1.03 bytes per weight instead of 2, through
the int8-activation kernels; the model calls `linear` without knowing the format.
"""
from __future__ import annotations

import numpy as np
import torch

from .format import QuantizedMatrix, QuantSpec, packed_nbytes, part_layout
from .kernels import matmul
from .quantize import dequantize, quantize

DENSE_SPEC = QuantSpec(bits=8, group_size=64)
QUANTIZED_DENSE = ("wq", "wk", "wv", "wo", "lm_head")  # runtime names (last part); embed and router stay
QUANTIZE_ELEMENTS = 1 << 22  # weights quantized per step: a 16 MB float32 chunk


class QuantizedLinear:
    """A [out, in] weight as int8 per group; `linear(x)` is x @ W.T in x's dtype.

    activations: as for the experts ('int8': the integer kernels; 'float32': exact to the dequantized weight).
    """

    def __init__(self, matrix: QuantizedMatrix, activations: str = "int8"):
        self.matrix, self.activations = matrix, activations
        self.shape = torch.Size(matrix.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes and scales."""
        return self.matrix.nbytes

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] @ W.T -> [T, out], by the CPU kernels on int8 activations."""
        x32 = np.ascontiguousarray(x.detach().to(torch.float32).numpy())
        return torch.from_numpy(matmul(self.matrix, x32, activations=self.activations)).to(x.dtype)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the kernels see it, [out, in] (for tests and references)."""
        return torch.from_numpy(dequantize(self.matrix)).to(dtype)


def is_quantized_dense(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the dense tensor of this runtime name ('layers.3.wq', 'lm_head') and shape is held as int8
    (its input width must be whole groups)."""
    return name.rsplit(".", 1)[-1] in QUANTIZED_DENSE and shape[-1] % DENSE_SPEC.group_size == 0


def quantize_dense(tensor: torch.Tensor, activations: str = "int8") -> QuantizedLinear:
    """The int8 form of one dense weight [out, in] (round-to-nearest: refinement gains little at 8 bits).

    Rows go QUANTIZE_ELEMENTS at a time, so the float32 copy a quantizer works on stays small
    (Mixtral's output head whole would be 0.5 GB more RSS during load than the memory plan counts).
    """
    rows, cols = tensor.shape
    parts = {name: np.empty(shape, dtype) for name, (dtype, shape) in part_layout(DENSE_SPEC, (rows, cols)).items()}
    step = max(1, QUANTIZE_ELEMENTS // cols)
    for start in range(0, rows, step):
        chunk = quantize(tensor[start:start + step].to(torch.float32).numpy(), DENSE_SPEC, refine=False)
        parts["codes"][start:start + step] = chunk.codes
        parts["scales"][start:start + step] = chunk.scales
    return QuantizedLinear(QuantizedMatrix.from_parts(DENSE_SPEC, (rows, cols), parts), activations)


def quantized_dense_bytes(shape: tuple[int, int]) -> int:
    """Bytes of one [out, in] weight in DENSE_SPEC: int8 codes and a float16 scale per group."""
    return packed_nbytes(DENSE_SPEC, shape)
