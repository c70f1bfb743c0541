"""llama.cpp's GGUF tensor types this runtime computes on, and a weight matrix held as their raw blocks.

A [rows, cols] weight (nn.Linear layout: out x in; GGUF lists it as ne = [cols, rows]) is stored as
rows of cols / block_cols blocks, each block_bytes long, rows one after another. Block layouts:
docs/gguf.md. The kernels (gguf_kernels.py) read the bytes as they are, so a GGUFMatrix checks the
byte count against the shape before any kernel sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mixtral_offload.errors import MixtralOffloadError


@dataclass(frozen=True)
class BlockType:
    """One GGUF tensor type as the kernels see it.

    Quantized types decode a block to unsigned codes u (signed for Q8_0) with one float scale and
    one float offset per `sub_cols` columns: w = scale * u - offset. `act_cols` is the block of x
    that int8 activations share a scale over (llama.cpp's Q8_0: 32, Q8_K: 256); float types have
    no codes (sub_cols = act_cols = 0) and compute on float x in both activation modes.
    """

    qtype: GGMLQuantizationType
    kind: int  # the kernels' branch index
    block_cols: int
    block_bytes: int
    sub_cols: int
    act_cols: int
    f16_fields: tuple[int, ...] = ()  # byte offsets of a block's float16 scales (d, dmin)
    signed_codes: bool = False

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def quantized(self) -> bool:
        return self.sub_cols > 0


_Q = GGMLQuantizationType
BLOCK_TYPES: dict[GGMLQuantizationType, BlockType] = {
    bt.qtype: bt
    for bt in (
        BlockType(_Q.Q4_0, 0, 32, 18, sub_cols=32, act_cols=32, f16_fields=(0,)),
        BlockType(_Q.Q8_0, 1, 32, 34, sub_cols=32, act_cols=32, f16_fields=(0,), signed_codes=True),
        BlockType(_Q.Q4_K, 2, 256, 144, sub_cols=32, act_cols=256, f16_fields=(0, 2)),
        BlockType(_Q.Q5_K, 3, 256, 176, sub_cols=32, act_cols=256, f16_fields=(0, 2)),
        BlockType(_Q.Q6_K, 4, 256, 210, sub_cols=16, act_cols=256, f16_fields=(208,)),
        BlockType(_Q.F32, 5, 1, 4, sub_cols=0, act_cols=0),
        BlockType(_Q.F16, 6, 1, 2, sub_cols=0, act_cols=0),
        BlockType(_Q.BF16, 7, 1, 2, sub_cols=0, act_cols=0),
    )
}
# the table agrees with llama.cpp's sizes as the gguf package states them
assert all(GGML_QUANT_SIZES[q] == (bt.block_cols, bt.block_bytes) for q, bt in BLOCK_TYPES.items())


def block_type(qtype: int | GGMLQuantizationType) -> BlockType:
    """The BlockType of a GGUF type id, or a one-line error naming a type the kernels cannot run."""
    try:
        qtype = GGMLQuantizationType(int(qtype))
    except (TypeError, ValueError):
        raise MixtralOffloadError(f"unknown GGUF tensor type {qtype!r}") from None
    if qtype not in BLOCK_TYPES:
        supported = ", ".join(bt.name for bt in BLOCK_TYPES.values())
        raise MixtralOffloadError(
            f"GGUF tensor type {qtype.name} has no kernel here (supported: {supported}); "
            f"convert the model with `mixtral-offload convert` instead"
        )
    return BLOCK_TYPES[qtype]


def row_nbytes(qtype: int | GGMLQuantizationType, cols: int) -> int:
    """Bytes of one row of `cols` weights of this type (cols must be whole blocks)."""
    bt = block_type(qtype)
    if cols <= 0 or cols % bt.block_cols:
        raise MixtralOffloadError(f"a {bt.name} row holds whole blocks of {bt.block_cols} weights; got {cols} columns")
    return cols // bt.block_cols * bt.block_bytes


def check_nbytes(qtype: int | GGMLQuantizationType, shape: tuple[int, ...], nbytes: int) -> int:
    """The byte length a tensor of `shape` (rows first, cols last) and this type must have; raise if not `nbytes`."""
    if len(shape) < 1 or any(int(n) <= 0 for n in shape):
        raise MixtralOffloadError(f"a GGUF tensor needs a positive shape, got {tuple(shape)}")
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    expected = rows * row_nbytes(qtype, int(shape[-1]))
    if nbytes != expected:
        raise MixtralOffloadError(
            f"{block_type(qtype).name} tensor of shape {tuple(shape)} must be {expected} bytes, got {nbytes}"
        )
    return expected


@dataclass(frozen=True, eq=False)
class GGUFMatrix:
    """A [rows, cols] weight (out x in) held as llama.cpp blocks of `qtype`, as `data`: the raw bytes.

    `data` may be any C-contiguous array over those bytes (a mapped file's uint8 view, or the gguf
    reader's float16/float32 array); it is kept as a flat uint8 view, never copied.
    """

    qtype: GGMLQuantizationType
    shape: tuple[int, int]
    data: np.ndarray

    def __post_init__(self) -> None:
        bt = block_type(self.qtype)
        if len(self.shape) != 2:
            raise MixtralOffloadError(f"a GGUF weight matrix must be 2D, got shape {tuple(self.shape)}")
        shape = (int(self.shape[0]), int(self.shape[1]))
        if not isinstance(self.data, np.ndarray) or not self.data.flags.c_contiguous:
            raise MixtralOffloadError(f"a {bt.name} matrix's data must be a C-contiguous numpy array")
        check_nbytes(bt.qtype, shape, self.data.nbytes)
        object.__setattr__(self, "qtype", bt.qtype)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "data", self.data.reshape(-1).view(np.uint8))

    @property
    def block_type(self) -> BlockType:
        return BLOCK_TYPES[self.qtype]

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def row_bytes(self) -> int:
        return row_nbytes(self.qtype, self.cols)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes
