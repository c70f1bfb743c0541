"""Numba float-activation kernels on QuantizedMatrix: fused dequantize-multiply, exact to the dequantized weights.

Shapes: T = tokens, R = rows (out features), C = cols (in features), G = group size, g = C // G,
D = hidden, I = intermediate. Weights are [R, C] (nn.Linear layout); activations are [T, C].

Every kernel accumulates in float32 and reassociates only sums, so it matches the NumPy reference
on the dequantized weights to ~1e-6 relative. int4 folds the zero point out of the inner loop:
sum_k (q_k - z) s x_k = s (sum_k q_k x_k - z sum_k x_k), with sum_k x_k per group computed once.

Two paths by token count. T < BATCH_MIN_TOKENS (decode): `_dot_rows` decodes 4 rows in the dot
product, one inner loop per format, every parallel driver written once on top of it. T >= it
(prefill, several tokens routed to one expert): `_block_dots` decodes a 4-row x 1024-column block
once into an L1 buffer of exact float32 weights and runs a 4-row x 4-token FMA tile over it.
int2/int3 take that block path at every T (their fast path is int8x.py; this one is for exactness).

Numba/LLVM notes (checked in the assembly): an inner loop that stores through several array views
gets a runtime overlap check per entry; index one flat array per operand with unsigned offsets (no
negative-index wraparound selects, which turn loads into gathers) so the check is hoisted.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mixtral_offload.quant.swiglu import silu as _silu
from mixtral_offload.quant.lowbit import decode_group

ROW_BLOCK = 4  # rows decoded together: they share every load of x
ROWS_PER_TASK = 64  # rows per parallel task (scratch is allocated once per task)
# T >= BATCH_MIN_TOKENS: each 4-row block is decoded once per K_CHUNK columns into an L1-resident
# float32 buffer (4 x 1024 x 4 B = 16 KB) and reused for every token, 4 tokens per pass over it (16
# accumulators, 8 loads per 16 zmm FMAs; 1.05-1.1x over 2 tokens per pass). Fused per-token decode
# wins at T=1 (2-3x) and T=2 on Mixtral shapes; T=3 is even there and 1.2-1.5x for batched on 1024x3584.
BATCH_MIN_TOKENS = 3
K_CHUNK = 1024

# float16 bits -> float32 value: Numba has no float16, so scales/zeros are read as uint16 through this
F16_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


# --- inner loops, one per format: four rows against one x ---


@njit(cache=True, fastmath=True, nogil=True)
def _dot_rows_int4(cflat, ncb, scales, zeros, f16, x, xsum, group_size, r0, r1, r2, r3, lanes):
    # lanes[4 G/2] (1D): one accumulator per row and byte position, each group's products added
    # already scaled, so no horizontal sum per group (measured 1.2-1.6x faster than a per-group float
    # sum at G=64 and G=32); the zero-point terms s*z*sum(x_group) are summed apart and subtracted once.
    # Every access goes through ONE written array (lanes) and one base per read operand (flat codes, x)
    # with unsigned offsets: LLVM versions the inner loop on a runtime overlap check at every group,
    # and with 4 row views, 4 lane views and 2 x views that check was ~30 pointer pairs long, longer
    # than the 2 zmm iterations of a G=64 group (1.3-1.6x faster than per-row views, measured).
    # Unsigned offsets also spare the negative-index wraparound selects that turn loads into gathers.
    half = group_size // 2
    uh = np.uint64(half)
    lanes[: 4 * half] = 0.0
    zx0 = np.float32(0.0)
    zx1 = np.float32(0.0)
    zx2 = np.float32(0.0)
    zx3 = np.float32(0.0)
    sixteenth = np.float32(0.0625)
    sixteen = np.float32(16.0)
    o0 = np.uint64(r0 * ncb)
    o1 = np.uint64(r1 * ncb)
    o2 = np.uint64(r2 * ncb)
    o3 = np.uint64(r3 * ncb)
    for g in range(scales.shape[1]):
        s0 = f16[scales[r0, g]]
        s1 = f16[scales[r1, g]]
        s2 = f16[scales[r2, g]]
        s3 = f16[scales[r3, g]]
        xs = xsum[g]
        zx0 += s0 * f16[zeros[r0, g]] * xs
        zx1 += s1 * f16[zeros[r1, g]] * xs
        zx2 += s2 * f16[zeros[r2, g]] * xs
        zx3 += s3 * f16[zeros[r3, g]] * xs
        cb = np.uint64(g * half)
        xb = np.uint64(g * group_size)
        xc = xb + uh
        a0 = o0 + cb
        a1 = o1 + cb
        a2 = o2 + cb
        a3 = o3 + cb
        for j in range(half):
            u = np.uint64(j)
            xl = x[xb + u]
            xh = x[xc + u]
            # byte b = lo + 16 hi, decoded in float (exact): hi = floor(b / 16), lo = b - 16 hi
            b0 = np.float32(cflat[a0 + u])
            b1 = np.float32(cflat[a1 + u])
            b2 = np.float32(cflat[a2 + u])
            b3 = np.float32(cflat[a3 + u])
            h0 = np.floor(b0 * sixteenth)
            h1 = np.floor(b1 * sixteenth)
            h2 = np.floor(b2 * sixteenth)
            h3 = np.floor(b3 * sixteenth)
            lanes[u] += s0 * ((b0 - sixteen * h0) * xl + h0 * xh)
            lanes[uh + u] += s1 * ((b1 - sixteen * h1) * xl + h1 * xh)
            lanes[uh + uh + u] += s2 * ((b2 - sixteen * h2) * xl + h2 * xh)
            lanes[uh + uh + uh + u] += s3 * ((b3 - sixteen * h3) * xl + h3 * xh)
    return (
        lanes[:half].sum() - zx0,
        lanes[half : 2 * half].sum() - zx1,
        lanes[2 * half : 3 * half].sum() - zx2,
        lanes[3 * half : 4 * half].sum() - zx3,
    )


@njit(cache=True, fastmath=True, nogil=True)
def _dot_rows_int8(codes, scales, f16, x, group_size, r0, r1, r2, r3):
    # a float sum per group and row over row views (no stores in the inner loop, so no overlap check);
    # int4's lanes scheme measured 0.85-0.98x of this for int8, flat codes with unsigned offsets 0.75-1x
    c0 = codes[r0]
    c1 = codes[r1]
    c2 = codes[r2]
    c3 = codes[r3]
    acc0 = np.float32(0.0)
    acc1 = np.float32(0.0)
    acc2 = np.float32(0.0)
    acc3 = np.float32(0.0)
    for g in range(scales.shape[1]):
        base = g * group_size
        xg = x[base : base + group_size]
        p0 = np.float32(0.0)
        p1 = np.float32(0.0)
        p2 = np.float32(0.0)
        p3 = np.float32(0.0)
        for j in range(group_size):
            p0 += np.float32(c0[base + j]) * xg[j]
            p1 += np.float32(c1[base + j]) * xg[j]
            p2 += np.float32(c2[base + j]) * xg[j]
            p3 += np.float32(c3[base + j]) * xg[j]
        acc0 += f16[scales[r0, g]] * p0
        acc1 += f16[scales[r1, g]] * p1
        acc2 += f16[scales[r2, g]] * p2
        acc3 += f16[scales[r3, g]] * p3
    return acc0, acc1, acc2, acc3


@njit(cache=True, fastmath=True, nogil=True)
def _dot_rows(bits, codes, cflat, ncb, scales, zeros, f16, x, xsum, group_size, r0, lanes):
    """Dot products of rows r0..r0+3 with x; rows past the end repeat the last row (caller drops them).

    cflat: the same codes as one flat array (int4 indexes it, see _dot_rows_int4), ncb: codes per row.
    """
    last = scales.shape[0] - 1
    r1 = min(r0 + 1, last)
    r2 = min(r0 + 2, last)
    r3 = min(r0 + 3, last)
    if bits == 4:
        return _dot_rows_int4(cflat, ncb, scales, zeros, f16, x, xsum, group_size, r0, r1, r2, r3, lanes)
    return _dot_rows_int8(codes, scales, f16, x, group_size, r0, r1, r2, r3)


@njit(cache=True, fastmath=True, nogil=True)
def _store_rows(out, r0, a0, a1, a2, a3):
    n = out.shape[0]
    out[r0] = a0
    if r0 + 1 < n:
        out[r0 + 1] = a1
    if r0 + 2 < n:
        out[r0 + 2] = a2
    if r0 + 3 < n:
        out[r0 + 3] = a3


# --- batched inner loops: decode a block once, reuse it for all tokens ---


@njit(cache=True, fastmath=True, nogil=True)
def _decode_block(bits, codes, scales, zeros, f16, group_size, r0, k0, kc, w):
    """w[i, :kc] = float32 weights of row min(r0+i, last), columns k0..k0+kc (exact dequantized values)."""
    last = codes.shape[0] - 1
    half = group_size // 2
    sixteenth = np.float32(0.0625)
    sixteen = np.float32(16.0)
    g0 = k0 // group_size
    for i in range(4):
        r = min(r0 + i, last)
        wi = w[i]
        for gq in range(kc // group_size):
            g = g0 + gq
            s = f16[scales[r, g]]
            ob = np.uint64(gq * group_size)
            if bits < 4:
                decode_group(codes[r], bits, group_size, g, wi, gq * group_size)
                z = f16[zeros[r, g]]
                for j in range(group_size):
                    wi[ob + np.uint64(j)] = (wi[ob + np.uint64(j)] - z) * s
            elif bits == 4:
                z = f16[zeros[r, g]]
                crow = codes[r]
                cb = np.uint64(g * half)
                oh = ob + np.uint64(half)
                for j in range(half):
                    u = np.uint64(j)
                    b = np.float32(crow[cb + u])
                    hi = np.floor(b * sixteenth)
                    wi[ob + u] = (b - sixteen * hi - z) * s
                    wi[oh + u] = (hi - z) * s
            else:
                crow = codes[r]
                cb = np.uint64(g * group_size)
                for j in range(group_size):
                    u = np.uint64(j)
                    wi[ob + u] = np.float32(crow[cb + u]) * s


@njit(cache=True, fastmath=True, nogil=True)
def _block_dots(bits, codes, scales, zeros, f16, x, group_size, r0, w, acc):
    """acc[t, i] = x[t] . row(r0 + i) for i < 4, each 4-row block decoded once per K_CHUNK columns."""
    cols = x.shape[1]
    ntok = x.shape[0]
    chunk = max(group_size, (K_CHUNK // group_size) * group_size)
    acc[:, :] = 0.0
    for k0 in range(0, cols, chunk):
        kc = min(chunk, cols - k0)
        _decode_block(bits, codes, scales, zeros, f16, group_size, r0, k0, kc, w)
        w0 = w[0, :kc]; w1 = w[1, :kc]; w2 = w[2, :kc]; w3 = w[3, :kc]
        t = 0
        while t + 3 < ntok:
            xa = x[t, k0:k0 + kc]; xb = x[t + 1, k0:k0 + kc]; xc = x[t + 2, k0:k0 + kc]; xd = x[t + 3, k0:k0 + kc]
            a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)
            b0 = np.float32(0.0); b1 = np.float32(0.0); b2 = np.float32(0.0); b3 = np.float32(0.0)
            c0 = np.float32(0.0); c1 = np.float32(0.0); c2 = np.float32(0.0); c3 = np.float32(0.0)
            d0 = np.float32(0.0); d1 = np.float32(0.0); d2 = np.float32(0.0); d3 = np.float32(0.0)
            for k in range(kc):
                v0 = w0[k]; v1 = w1[k]; v2 = w2[k]; v3 = w3[k]
                xak = xa[k]; xbk = xb[k]; xck = xc[k]; xdk = xd[k]
                a0 += v0 * xak; a1 += v1 * xak; a2 += v2 * xak; a3 += v3 * xak
                b0 += v0 * xbk; b1 += v1 * xbk; b2 += v2 * xbk; b3 += v3 * xbk
                c0 += v0 * xck; c1 += v1 * xck; c2 += v2 * xck; c3 += v3 * xck
                d0 += v0 * xdk; d1 += v1 * xdk; d2 += v2 * xdk; d3 += v3 * xdk
            acc[t, 0] += a0; acc[t, 1] += a1; acc[t, 2] += a2; acc[t, 3] += a3
            acc[t + 1, 0] += b0; acc[t + 1, 1] += b1; acc[t + 1, 2] += b2; acc[t + 1, 3] += b3
            acc[t + 2, 0] += c0; acc[t + 2, 1] += c1; acc[t + 2, 2] += c2; acc[t + 2, 3] += c3
            acc[t + 3, 0] += d0; acc[t + 3, 1] += d1; acc[t + 3, 2] += d2; acc[t + 3, 3] += d3
            t += 4
        while t + 1 < ntok:
            xa = x[t, k0:k0 + kc]
            xb = x[t + 1, k0:k0 + kc]
            a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)
            b0 = np.float32(0.0); b1 = np.float32(0.0); b2 = np.float32(0.0); b3 = np.float32(0.0)
            for k in range(kc):
                xak = xa[k]; xbk = xb[k]
                a0 += w0[k] * xak; a1 += w1[k] * xak; a2 += w2[k] * xak; a3 += w3[k] * xak
                b0 += w0[k] * xbk; b1 += w1[k] * xbk; b2 += w2[k] * xbk; b3 += w3[k] * xbk
            acc[t, 0] += a0; acc[t, 1] += a1; acc[t, 2] += a2; acc[t, 3] += a3
            acc[t + 1, 0] += b0; acc[t + 1, 1] += b1; acc[t + 1, 2] += b2; acc[t + 1, 3] += b3
            t += 2
        if t < ntok:
            xa = x[t, k0:k0 + kc]
            a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)
            for k in range(kc):
                xak = xa[k]
                a0 += w0[k] * xak; a1 += w1[k] * xak; a2 += w2[k] * xak; a3 += w3[k] * xak
            acc[t, 0] += a0; acc[t, 1] += a1; acc[t, 2] += a2; acc[t, 3] += a3


# --- parallel drivers ---


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _matmul_kernel(bits, codes, scales, zeros, f16, x, xsum, group_size, out):
    """out[T, R] = x[T, C] @ W.T; each block of rows is decoded from L1 once per token."""
    rows, ncb = codes.shape
    cflat = codes.reshape(rows * ncb)
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        lanes = np.empty(4 * group_size, np.float32)
        for r0 in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK), 4):
            for t in range(x.shape[0]):
                a0, a1, a2, a3 = _dot_rows(
                    bits, codes, cflat, ncb, scales, zeros, f16, x[t], xsum[t], group_size, r0, lanes
                )
                _store_rows(out[t], r0, a0, a1, a2, a3)


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _matmul_batched_kernel(bits, codes, scales, zeros, f16, x, group_size, out):
    """out[T, R] = x[T, C] @ W.T for T >= BATCH_MIN_TOKENS: each block decoded once for all tokens."""
    rows = codes.shape[0]
    chunk = max(group_size, (K_CHUNK // group_size) * group_size)
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        w = np.empty((4, chunk), np.float32)
        acc = np.empty((x.shape[0], 4), np.float32)
        for r0 in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK), 4):
            _block_dots(bits, codes, scales, zeros, f16, x, group_size, r0, w, acc)
            for t in range(x.shape[0]):
                _store_rows(out[t], r0, acc[t, 0], acc[t, 1], acc[t, 2], acc[t, 3])


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _gate_up_kernel(bits, codes1, scales1, zeros1, codes3, scales3, zeros3, f16, x, xsum, group_size, h):
    """h[T, I] = silu(x @ w1.T) * (x @ w3.T), w1 and w3 rows read in the same pass."""
    rows, ncb = codes1.shape
    cflat1 = codes1.reshape(rows * ncb)
    cflat3 = codes3.reshape(rows * ncb)
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        lanes = np.empty(4 * group_size, np.float32)
        for r0 in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK), 4):
            for t in range(x.shape[0]):
                a0, a1, a2, a3 = _dot_rows(
                    bits, codes1, cflat1, ncb, scales1, zeros1, f16, x[t], xsum[t], group_size, r0, lanes
                )
                b0, b1, b2, b3 = _dot_rows(
                    bits, codes3, cflat3, ncb, scales3, zeros3, f16, x[t], xsum[t], group_size, r0, lanes
                )
                _store_rows(h[t], r0, _silu(a0) * b0, _silu(a1) * b1, _silu(a2) * b2, _silu(a3) * b3)


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _gate_up_batched_kernel(bits, codes1, scales1, zeros1, codes3, scales3, zeros3, f16, x, group_size, h):
    """_gate_up_kernel for T >= BATCH_MIN_TOKENS, blocks decoded once for all tokens."""
    rows = codes1.shape[0]
    chunk = max(group_size, (K_CHUNK // group_size) * group_size)
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        w = np.empty((4, chunk), np.float32)
        a = np.empty((x.shape[0], 4), np.float32)
        b = np.empty((x.shape[0], 4), np.float32)
        for r0 in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK), 4):
            _block_dots(bits, codes1, scales1, zeros1, f16, x, group_size, r0, w, a)
            _block_dots(bits, codes3, scales3, zeros3, f16, x, group_size, r0, w, b)
            for t in range(x.shape[0]):
                _store_rows(
                    h[t], r0, _silu(a[t, 0]) * b[t, 0], _silu(a[t, 1]) * b[t, 1],
                    _silu(a[t, 2]) * b[t, 2], _silu(a[t, 3]) * b[t, 3],
                )


@njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _dequantize_rows_kernel(bits, codes, scales, zeros, f16, group_size, r_start, out):
    """out[n, C] = the float32 weights of rows r_start .. r_start + n."""
    half = group_size // 2
    for i in prange(out.shape[0]):
        r = r_start + i
        row = out[i]
        for g in range(scales.shape[1]):
            s = f16[scales[r, g]]
            base = g * group_size
            if bits < 4:
                decode_group(codes[r], bits, group_size, g, row, base)
                z = f16[zeros[r, g]]
                for j in range(group_size):
                    row[base + j] = (row[base + j] - z) * s
            elif bits == 4:
                z = f16[zeros[r, g]]
                for j in range(half):
                    b = np.float32(codes[r, g * half + j])
                    hi = np.floor(b * np.float32(0.0625))
                    row[base + j] = (b - np.float32(16.0) * hi - z) * s
                    row[base + half + j] = (hi - z) * s
            else:
                for j in range(group_size):
                    row[base + j] = np.float32(codes[r, base + j]) * s


