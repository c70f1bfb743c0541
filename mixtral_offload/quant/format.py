"""Quantized expert formats: the spec, the packed matrix and its named parts.

Byte layout (rows = out features, cols = in features, G = group size, g = cols // G groups per row):

int4  codes  uint8   [rows, cols // 2]  per group of G columns, byte j (0 <= j < G/2) holds column j
                                          in its low nibble and column j + G/2 in its high nibble,
                                          so a kernel reads both halves of x contiguously.
      scales float16 [rows, g]          w = (q - zero) * scale, q in 0..15 (asymmetric)
      zeros  float16 [rows, g]          float zero point (refinement moves it off the integers)
int8  codes  int8    [rows, cols]
      scales float16 [rows, g]          w = q * scale, q in -127..127 (symmetric)

Every part is C-contiguous and each row's codes are contiguous. Kernels read the float16 parts
through a uint16 view (Numba has no float16) and a 65536-entry float32 table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mixtral_offload.errors import MixtralOffloadError

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
# how the CPU kernels take their input: "float32" as given, exact to the dequantized weights; "int8"
# quantized per group for integer dot products (int8x.py), where the format allows
ACTIVATIONS = ("float32", "int8")


@dataclass(frozen=True)
class QuantSpec:
    """A quantization format: bits per weight (4 or 8) and group size along the input dimension."""

    bits: int = 4
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise MixtralOffloadError(f"quantization bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise MixtralOffloadError(
                f"quantization group size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size!r}"
            )

    def to_dict(self) -> dict[str, int]:
        return {"bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        try:
            return cls(bits=int(data["bits"]), group_size=int(data["group_size"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MixtralOffloadError(f"bad quantization spec {data!r}: {exc}") from None

    def check_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Return (rows, cols) as ints, or raise if this spec cannot hold a matrix of that shape."""
        if len(shape) != 2:
            raise MixtralOffloadError(f"a quantized matrix must be 2D, got shape {tuple(shape)}")
        rows, cols = int(shape[0]), int(shape[1])
        if rows <= 0 or cols <= 0:
            raise MixtralOffloadError(f"a quantized matrix needs a positive shape, got {(rows, cols)}")
        if cols % self.group_size:
            raise MixtralOffloadError(
                f"group size {self.group_size} does not divide the input dimension {cols} "
                f"(shape {(rows, cols)}); choose a group size among {SUPPORTED_GROUP_SIZES} that divides it"
            )
        return rows, cols


def part_layout(spec: QuantSpec, shape: tuple[int, int]) -> dict[str, tuple[np.dtype, tuple[int, int]]]:
    """Each part's name -> (dtype, shape) for a matrix of `shape` in format `spec`, in storage order."""
    rows, cols = spec.check_shape(shape)
    groups = cols // spec.group_size
    if spec.bits == 4:
        return {
            "codes": (np.dtype(np.uint8), (rows, cols // 2)),
            "scales": (np.dtype(np.float16), (rows, groups)),
            "zeros": (np.dtype(np.float16), (rows, groups)),
        }
    return {
        "codes": (np.dtype(np.int8), (rows, cols)),
        "scales": (np.dtype(np.float16), (rows, groups)),
    }


def packed_nbytes(spec: QuantSpec, shape: tuple[int, int]) -> int:
    """Bytes of all parts of a matrix of `shape` in format `spec`."""
    return sum(dtype.itemsize * int(np.prod(part_shape)) for dtype, part_shape in part_layout(spec, shape).values())


@dataclass(frozen=True, eq=False)
class QuantizedMatrix:
    """A [rows, cols] weight (nn.Linear layout: out x in) packed in format `spec`.

    Construction validates every part's dtype, shape and contiguity, because kernels index the
    arrays without bounds checks. Parts may be read-only views into a mapped file.
    """

    spec: QuantSpec
    shape: tuple[int, int]
    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", self.spec.check_shape(self.shape))
        layout = part_layout(self.spec, self.shape)
        if "zeros" not in layout and self.zeros is not None:
            raise MixtralOffloadError(f"{self.spec.bits}-bit format has no zeros part")
        for name, (dtype, part_shape) in layout.items():
            _check_part(name, getattr(self, name), dtype, part_shape)

    @staticmethod
    def part_layout(spec: QuantSpec, shape: tuple[int, int]) -> dict[str, tuple[np.dtype, tuple[int, int]]]:
        """Each part's name -> (dtype, shape); see the module docstring for the byte layout."""
        return part_layout(spec, shape)

    def parts(self) -> dict[str, np.ndarray]:
        """The named C-contiguous arrays, in storage order."""
        return {name: getattr(self, name) for name in part_layout(self.spec, self.shape)}

    @classmethod
    def from_parts(cls, spec: QuantSpec, shape: tuple[int, int], parts: dict[str, np.ndarray]) -> "QuantizedMatrix":
        """Wrap existing arrays (e.g. np.frombuffer views of a mapped pool) without copying them."""
        layout = part_layout(spec, shape)
        if set(parts) != set(layout):
            raise MixtralOffloadError(
                f"parts for {spec.bits}-bit format must be {sorted(layout)}, got {sorted(parts)}"
            )
        return cls(spec=spec, shape=shape, **parts)

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts().values())

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]


def _check_part(name: str, array: object, dtype: np.dtype, shape: tuple[int, int]) -> None:
    if not isinstance(array, np.ndarray):
        raise MixtralOffloadError(f"quantized part {name!r} must be a numpy array, got {type(array).__name__}")
    if array.dtype != dtype:
        raise MixtralOffloadError(f"quantized part {name!r} must have dtype {dtype}, got {array.dtype}")
    if array.shape != shape:
        raise MixtralOffloadError(f"quantized part {name!r} must have shape {shape}, got {array.shape}")
    if not array.flags.c_contiguous:
        raise MixtralOffloadError(f"quantized part {name!r} must be C-contiguous")


_NO_ZEROS = np.zeros((1, 1), np.uint16)  # int8 has no zero points; the kernels never read this


def kernel_parts(qm: QuantizedMatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scales as uint16, zeros as uint16) in the form the Numba kernels take (no float16 there)."""
    zeros = qm.zeros.view(np.uint16) if qm.spec.bits == 4 else _NO_ZEROS
    return qm.codes, qm.scales.view(np.uint16), zeros
