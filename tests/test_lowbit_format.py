"""int2/int3 packing (quant/lowbit.py): the Numba packer and decoder against the layout written out by hand."""
import numpy as np
import pytest
import torch

from mixtral_offload.quant import QuantSpec, dequantize, dequantize_torch, packed_nbytes, quantize
from mixtral_offload.quant.lowbit import decode_group, pack_row, unpack_lowbit


def layout_by_hand(q: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """One row's packed bytes, element by element from the layout in quant/lowbit.py's docstring."""
    cols = q.shape[0]
    quarter = group_size // 4
    planes = np.zeros(cols // 4, np.uint8)
    high = np.zeros((4, cols // 4), np.uint8)
    for e in range(cols):
        g, p, j = e // group_size, (e % group_size) // quarter, e % quarter
        planes[g * quarter + j] |= (q[e] & 3) << (2 * p)
        high[p, g * quarter + j] = q[e] >> 2
    if bits == 2:
        return planes
    out = []
    for c0 in range(0, cols // 4, 64):
        n = min(64, cols // 4 - c0)
        out += list(planes[c0:c0 + n])
        for p in range(4):
            mask = sum(int(high[p, c0 + i]) << i for i in range(n))  # bit i: position i of plane p
            out += list(mask.to_bytes(n // 8, "little"))
    return np.array(out, np.uint8)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("groups", [1, 3, 8, 9])  # with int3 a whole 64-byte chunk, a partial one, or both
def test_pack_matches_the_layout_and_unpacks(bits, group_size, groups):
    cols = group_size * groups
    q = np.random.default_rng(cols + bits).integers(0, 2**bits, (3, cols)).astype(np.uint8)
    packed = np.full((3, cols * bits // 8), 0xA5, np.uint8)  # the packer must overwrite every byte
    for r in range(3):
        pack_row(q[r].astype(np.float32), bits, group_size, packed[r])
        np.testing.assert_array_equal(packed[r], layout_by_hand(q[r], bits, group_size))
        decoded = np.zeros(cols, np.float32)
        for g in range(groups):
            decode_group(packed[r], bits, group_size, g, decoded, g * group_size)
        np.testing.assert_array_equal(decoded, q[r])
    np.testing.assert_array_equal(unpack_lowbit(packed, bits, group_size), q)
    np.testing.assert_array_equal(unpack_lowbit(torch.from_numpy(packed), bits, group_size).numpy(), q)


@pytest.mark.parametrize("bits", [2, 3])
def test_quantized_sizes_and_torch_dequantize(bits):
    w = np.random.default_rng(bits).standard_normal((6, 320)).astype(np.float32)
    qm = quantize(w, QuantSpec(bits, 32))
    assert qm.codes.shape == (6, 320 * bits // 8)
    assert qm.nbytes == packed_nbytes(qm.spec, qm.shape) == 6 * (320 * bits // 8 + 2 * 2 * 10)
    np.testing.assert_array_equal(dequantize_torch(qm).numpy(), dequantize(qm))


def test_cli_offers_every_supported_width():
    from mixtral_offload.cli.convert import BITS
    from mixtral_offload.quant.format import SUPPORTED_BITS

    assert tuple(int(b) for b in BITS) == SUPPORTED_BITS
