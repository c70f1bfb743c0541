"""QuantSpec validation, part layouts, from_parts without copies, and its refusals."""

import mmap

import numpy as np
import pytest

from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.quant import QuantizedMatrix, QuantSpec, dequantize, packed_nbytes, part_layout, quantize


@pytest.mark.parametrize("bits, group_size", [(1, 64), (5, 64), (16, 64), (4, 16), (8, 48), (4, 256)])
def test_bad_spec_refused(bits, group_size):
    with pytest.raises(MixtralOffloadError):
        QuantSpec(bits, group_size)


def test_group_size_must_divide_input_dim():
    with pytest.raises(MixtralOffloadError, match="does not divide the input dimension 96"):
        part_layout(QuantSpec(4, 64), (8, 96))
    with pytest.raises(MixtralOffloadError, match="does not divide"):
        quantize(np.zeros((8, 96), np.float32), QuantSpec(8, 64))


def test_part_layout_sizes():
    layout = part_layout(QuantSpec(4, 64), (14336, 4096))
    assert layout == {
        "codes": (np.dtype(np.uint8), (14336, 2048)),
        "scales": (np.dtype(np.float16), (14336, 64)),
        "zeros": (np.dtype(np.float16), (14336, 64)),
    }
    assert packed_nbytes(QuantSpec(4, 64), (14336, 4096)) == 14336 * (2048 + 256)
    assert part_layout(QuantSpec(3, 64), (14336, 4096))["codes"] == (np.dtype(np.uint8), (14336, 1536))
    assert part_layout(QuantSpec(2, 32), (14336, 4096))["codes"] == (np.dtype(np.uint8), (14336, 1024))
    assert set(part_layout(QuantSpec(2, 32), (4, 64))) == {"codes", "scales", "zeros"}
    assert set(part_layout(QuantSpec(8, 32), (4, 64))) == {"codes", "scales"}
    assert QuantizedMatrix.part_layout(QuantSpec(8, 32), (4, 64))["codes"] == (np.dtype(np.int8), (4, 64))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_from_parts_views_a_buffer_without_copying(bits):
    spec, shape = QuantSpec(bits, 32), (6, 64)
    qm = quantize(np.random.default_rng(0).standard_normal(shape).astype(np.float32), spec)
    blob = b"".join(part.tobytes() for part in qm.parts().values())
    buf = mmap.mmap(-1, len(blob))
    buf.write(blob)
    views, offset = {}, 0
    for name, (dtype, part_shape) in part_layout(spec, shape).items():
        count = int(np.prod(part_shape))
        views[name] = np.frombuffer(buf, dtype, count, offset).reshape(part_shape)
        offset += count * dtype.itemsize
    loaded = QuantizedMatrix.from_parts(spec, shape, views)
    for name, view in views.items():
        assert loaded.parts()[name] is view and np.shares_memory(loaded.parts()[name], buf)
    assert loaded.nbytes == qm.nbytes == packed_nbytes(spec, shape)
    np.testing.assert_array_equal(dequantize(loaded), dequantize(qm))


def _parts(bits=4):
    qm = quantize(np.ones((4, 64), np.float32), QuantSpec(bits, 32))
    return {name: part.copy() for name, part in qm.parts().items()}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.update(codes=p["codes"].astype(np.int8)), "dtype"),
        (lambda p: p.update(scales=p["scales"].astype(np.float32)), "dtype"),
        (lambda p: p.update(codes=p["codes"][:, :-1].copy()), "shape"),
        (lambda p: p.update(zeros=p["zeros"][:3].copy()), "shape"),
        (lambda p: p.update(codes=np.asfortranarray(p["codes"])), None),
        (lambda p: p.update(codes=np.zeros((4, 64), np.uint8)[:, ::2]), "contiguous"),
        (lambda p: p.pop("zeros"), "parts"),
        (lambda p: p.update(extra=np.zeros(1)), "parts"),
        (lambda p: p.update(codes=p["codes"].tolist()), "numpy array"),
    ],
)
def test_from_parts_rejects_bad_parts(change, message):
    parts = _parts()
    change(parts)
    if message is None:  # a Fortran-ordered 2D array with >1 row and column is not C-contiguous
        message = "contiguous"
    with pytest.raises(MixtralOffloadError, match=message):
        QuantizedMatrix.from_parts(QuantSpec(4, 32), (4, 64), parts)


def test_int8_has_no_zeros():
    parts = _parts(bits=8)
    with pytest.raises(MixtralOffloadError):
        QuantizedMatrix(QuantSpec(8, 32), (4, 64), parts["codes"], parts["scales"], np.zeros((4, 2), np.float16))


def test_spec_dict_roundtrip():
    spec = QuantSpec(8, 128)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(MixtralOffloadError):
        QuantSpec.from_dict({"bits": 4})
