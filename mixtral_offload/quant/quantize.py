"""Quantize float weights into a QuantizedMatrix, and the plain reference dequantizers.

Round-to-nearest (RTN) first; then, with refine=True, alternating least squares per group: with the
codes fixed, the scale (and offset) minimizing the squared error has a closed form; with those fixed,
the codes are re-rounded. Each group keeps whichever candidate has the lower squared error, so
refinement does not make a group worse (up to the float16 rounding of its parameters when stored;
docs/quant.md says where that rounding happens). No calibration data.

The work is one fused Numba pass per row (a group stays in L1 through all steps): a torch version of
the same steps allocated a fresh tensor per op and took ~30 s for a 14336x4096 matrix here.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from numba import njit, prange

from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.quant.format import ASYMMETRIC_BITS, QuantizedMatrix, QuantSpec
from mixtral_offload.quant.lowbit import array_module, pack_row, unpack_lowbit

REFINE_STEPS = 4  # ALS steps; on Gaussian weights the error stops falling after 3-4
# Starting ranges tried before ALS (1.0: min..max; f < 1: shrunk by f about the middle); see docs/quant.md
RANGE_SHRINKS = {4: (1.0,), 3: (1.0, 0.9, 0.8, 0.7, 0.6), 2: (1.0, 0.9, 0.8, 0.7, 0.6)}
_FP16_MAX = 65504.0
_FP16_MIN_NORMAL = 2.0**-14


def quantize(weight: np.ndarray | torch.Tensor, spec: QuantSpec, refine: bool = True) -> QuantizedMatrix:
    """Pack a 2D float weight [rows=out, cols=in] into `spec`'s format."""
    w = _as_float32_array(weight)
    rows, cols = spec.check_shape(w.shape)
    high, low = w.max(), w.min()  # both propagate NaN: one pass each, no temporaries
    if not (np.isfinite(high) and np.isfinite(low)):
        raise MixtralOffloadError("cannot quantize a weight holding NaN or infinite values")
    if max(high, -low) > _FP16_MAX:
        raise MixtralOffloadError(f"weight values beyond {_FP16_MAX} do not fit float16 scales")
    groups = cols // spec.group_size
    steps = REFINE_STEPS if refine else 0
    scales = np.empty((rows, groups), np.float32)
    if spec.bits in ASYMMETRIC_BITS:
        codes = np.empty((rows, cols * spec.bits // 8), np.uint8)
        zeros = np.empty((rows, groups), np.float32)
        shrinks = np.array(RANGE_SHRINKS[spec.bits] if refine else (1.0,), np.float32)
        _quantize_asym_rows(w, spec.bits, spec.group_size, steps, shrinks, codes, scales, zeros)
        zeros16 = zeros.astype(np.float16)
    else:
        codes = np.empty((rows, cols), np.int8)
        _quantize_int8_rows(w, spec.group_size, steps, codes, scales)
        zeros16 = None
    return QuantizedMatrix(spec=spec, shape=(rows, cols), codes=codes, scales=scales.astype(np.float16), zeros=zeros16)


def _as_float32_array(weight: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        if not weight.is_floating_point():
            raise MixtralOffloadError(f"weight must be a float tensor, got dtype {weight.dtype}")
        weight = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    elif isinstance(weight, np.ndarray):
        if weight.dtype.kind != "f":
            raise MixtralOffloadError(f"weight must be a float array, got dtype {weight.dtype}")
    else:
        raise MixtralOffloadError(f"weight must be a numpy array or torch tensor, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise MixtralOffloadError(f"weight must be 2D [out, in], got shape {tuple(weight.shape)}")
    return np.ascontiguousarray(weight, dtype=np.float32)


@njit(cache=True, nogil=True)
def _round_fp16(x):
    """float32 -> nearest float16 value, as float32 (Veltkamp split; no fastmath, it would fold it)."""
    ax = abs(x)
    if ax < _FP16_MIN_NORMAL:  # subnormal float16: multiples of 2^-24
        return np.float32(np.round(np.float64(x) * 16777216.0) / 16777216.0)
    c = np.float64(x) * 8193.0  # 2^13 + 1 splits a float32 significand at 11 bits
    c = np.float32(c)
    hi = np.float32(c - np.float32(c - x))
    return min(max(hi, np.float32(-_FP16_MAX)), np.float32(_FP16_MAX))


# --- int2/int3/int4: asymmetric, w = (q - z) * s, q in 0..qmax ---


@njit(cache=True, fastmath=True, nogil=True)
def _asym_codes_error(wg, s, z, qmax, q):
    """Fill q with the codes for (s, z); return the squared error of the dequantized group."""
    inv = np.float32(1.0) / s
    err = np.float32(0.0)
    for j in range(wg.shape[0]):
        c = min(max(np.round(wg[j] * inv + z), np.float32(0.0)), qmax)
        q[j] = c
        d = (c - z) * s - wg[j]
        err += d * d
    return err


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _quantize_asym_rows(w, bits, group_size, steps, shrinks, codes, scales, zeros):
    """Per group: RTN from each starting range in `shrinks` (min..max shrunk by the factor about its
    middle, clipping the tails), the best start kept, then `steps` ALS steps; codes packed per row.
    Scale and zero are searched in float32 and rounded to float16 when stored (see docs/quant.md).
    """
    rows, cols = w.shape
    half = group_size // 2
    n = np.float32(group_size)
    qmax = np.float32(2**bits - 1)
    for r in prange(rows):
        q = np.empty(group_size, np.float32)
        row_q = np.empty(cols, np.float32)
        for g in range(cols // group_size):
            wg = w[r, g * group_size : (g + 1) * group_size]
            best_q = row_q[g * group_size : (g + 1) * group_size]
            lo = wg.min()
            hi = wg.max()
            floor = max(max(abs(lo), abs(hi)) / np.float32(1024.0), np.float32(2.0**-24))  # |zero| <= 1024
            best_err = np.float32(np.inf)
            best_s = best_z = np.float32(0.0)
            for k in range(shrinks.shape[0]):
                cut = (hi - lo) * (np.float32(1.0) - shrinks[k]) * np.float32(0.5)
                s = max((hi - lo - 2 * cut) * (np.float32(1.0) / qmax), floor)
                z = -(lo + cut) / s
                err = _asym_codes_error(wg, s, z, qmax, q)
                if err < best_err:
                    best_err, best_s, best_z = err, s, z
                    best_q[:] = q
            q[:] = best_q
            for _ in range(steps):
                sq = np.float32(0.0)
                sqq = np.float32(0.0)
                sw = np.float32(0.0)
                sqw = np.float32(0.0)
                for j in range(group_size):
                    sq += q[j]
                    sqq += q[j] * q[j]
                    sw += wg[j]
                    sqw += q[j] * wg[j]
                det = n * sqq - sq * sq
                if det <= 0:
                    break
                s_ls = (n * sqw - sq * sw) / det
                if s_ls <= 0:
                    break
                s = max(s_ls, floor)
                z = min(max((sq - sw / s) / n, np.float32(-2048.0)), np.float32(2048.0))
                err = _asym_codes_error(wg, s, z, qmax, q)
                if err < best_err:
                    best_err, best_s, best_z = err, s, z
                    best_q[:] = q
            scales[r, g] = best_s
            zeros[r, g] = best_z
        if bits == 4:
            for g in range(cols // group_size):
                for j in range(half):
                    lo4 = np.uint8(row_q[g * group_size + j])
                    hi4 = np.uint8(row_q[g * group_size + half + j])
                    codes[r, g * half + j] = lo4 | (hi4 << np.uint8(4))
        else:
            pack_row(row_q, bits, group_size, codes[r])


# --- int8: symmetric, w = q * s, q in -127..127 ---


@njit(cache=True, fastmath=True, nogil=True)
def _int8_codes_error(wg, s, q):
    inv = np.float32(1.0) / s
    err = np.float32(0.0)
    for j in range(wg.shape[0]):
        c = min(max(np.round(wg[j] * inv), np.float32(-127.0)), np.float32(127.0))
        q[j] = c
        d = c * s - wg[j]
        err += d * d
    return err


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _quantize_int8_rows(w, group_size, steps, codes, scales):
    rows, cols = w.shape
    for r in prange(rows):
        q = np.empty(group_size, np.float32)
        best_q = np.empty(group_size, np.float32)
        for g in range(cols // group_size):
            wg = w[r, g * group_size : (g + 1) * group_size]
            peak = np.abs(wg).max()
            s = _round_fp16(max(peak / np.float32(127.0), np.float32(2.0**-24)))
            best_err = _int8_codes_error(wg, s, best_q)
            best_s = s
            q[:] = best_q
            for _ in range(steps):
                qq = np.float32(0.0)
                qw = np.float32(0.0)
                for j in range(group_size):
                    qq += q[j] * q[j]
                    qw += q[j] * wg[j]
                if qq <= 0 or qw <= 0:
                    break
                s = _round_fp16(max(qw / qq, np.float32(2.0**-24)))
                err = _int8_codes_error(wg, s, q)
                if err < best_err:
                    best_err, best_s = err, s
                    best_q[:] = q
            for j in range(group_size):
                codes[r, g * group_size + j] = np.int8(best_q[j])
            scales[r, g] = best_s


# --- reference dequantizers ---


def unpack_int4(codes, group_size: int):
    """[rows, cols/2] packed bytes -> [rows, cols] uint8 codes 0..15 (inverse of the packing above)."""
    rows = codes.shape[0]
    grouped = codes.reshape(rows, -1, group_size // 2)
    return array_module(codes).concatenate([grouped & 15, grouped >> 4], axis=2).reshape(rows, -1)


def unpack_codes(codes, bits: int, group_size: int):
    """Packed codes of an asymmetric format -> [rows, cols] uint8 codes (numpy or torch, as given)."""
    return unpack_int4(codes, group_size) if bits == 4 else unpack_lowbit(codes, bits, group_size)


def dequantize(qm: QuantizedMatrix) -> np.ndarray:
    """The plain NumPy reference: the float32 [rows, cols] matrix the codes stand for."""
    rows, cols = qm.shape
    g = qm.spec.group_size
    scales = qm.scales.astype(np.float32)[:, :, None]
    if qm.spec.bits in ASYMMETRIC_BITS:
        q = unpack_codes(qm.codes, qm.spec.bits, g).astype(np.float32).reshape(rows, -1, g)
        w = (q - qm.zeros.astype(np.float32)[:, :, None]) * scales
    else:
        w = qm.codes.astype(np.float32).reshape(rows, -1, g) * scales
    return w.reshape(rows, cols)


def dequantize_torch(
    qm: QuantizedMatrix, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Dequantize on `device` (the packed bytes are copied there, then unpacked): [rows, cols] of `dtype`."""
    parts = {name: _tensor(part, device) for name, part in qm.parts().items()}
    return dequantize_parts_torch(qm.spec, qm.shape, parts, dtype)


def dequantize_parts_torch(spec: QuantSpec, shape: tuple[int, int], parts: dict[str, torch.Tensor],
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize parts that already lie on a torch device (codes, scales[, zeros]): [rows, cols] of dtype."""
    rows, cols = shape
    g = spec.group_size
    scales = parts["scales"].float()[:, :, None]
    if spec.bits in ASYMMETRIC_BITS:
        q = unpack_codes(parts["codes"], spec.bits, g).float().reshape(rows, -1, g)
        w = (q - parts["zeros"].float()[:, :, None]) * scales
    else:
        w = parts["codes"].float().reshape(rows, -1, g) * scales
    return w.reshape(rows, cols).to(dtype)


def _tensor(array: np.ndarray, device) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")  # read-only mmap views; never written
        return torch.from_numpy(array).to(device)


def relative_error(weight: np.ndarray | torch.Tensor, qm: QuantizedMatrix) -> float:
    """Relative Frobenius error ||W - dequantize(qm)|| / ||W||."""
    w = _as_float32_array(weight)
    return float(np.linalg.norm(w - dequantize(qm)) / np.linalg.norm(w))
