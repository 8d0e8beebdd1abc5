"""The loops of :mod:`~mergescale.methods.kernels`, compiled by numba on first call (imported only then).

Indices are unsigned or rows sliced where a loop should vectorise: numba checks a signed index for a negative
value at every access, which kept LLVM from vectorising (measured 2.7× slower).
"""

from __future__ import annotations

import numba
import numpy as np

from mergescale.methods.kernels import _TILE  # columns merged together: k rows and the sums stay in L1/L2

_GROUP = 32  # entries tested together: a vectorised test of the group, a scalar look only on a rare hit


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _gather(x, xi, g, stop, lo_bits, span, values, positions, offset, m):
    """Appends the band's entries among [g, stop) at values[m:] (and positions[m:]); returns the new m."""
    for j in range(g, stop):
        if np.uint32((xi[j] & 0x7FFFFFFF) - lo_bits) <= span:
            values[m] = abs(x[j])
            if positions.shape[0] > 0:
                positions[m] = offset + j
            m += 1
    return m


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _band_sweep(x, sub, lo_bits, hi_bits, values, positions, offset):
    n = x.shape[0]
    xi = x.view(np.int32)
    span = np.uint32(hi_bits - lo_bits)
    above = 0
    m = 0
    full = n - n % _GROUP
    subtract = sub.shape[0] > 0
    for g in range(0, full, _GROUP):
        hit = 0
        if subtract:
            for j in range(g, g + _GROUP):
                x[j] = x[j] - sub[j]
                bits = xi[j] & 0x7FFFFFFF
                above += bits > hi_bits
                hit |= np.uint32(bits - lo_bits) <= span
        else:
            for j in range(g, g + _GROUP):
                bits = xi[j] & 0x7FFFFFFF  # |x|'s bits: for |x| ≥ 0 the float order is the integer order
                above += bits > hi_bits
                hit |= np.uint32(bits - lo_bits) <= span
        if hit:  # rare (the band holds ~2 % of the entries): a scalar look at this group only
            m = _gather(x, xi, g, g + _GROUP, lo_bits, span, values, positions, offset, m)
    for j in range(full, n):
        if subtract:
            x[j] = x[j] - sub[j]
        above += (xi[j] & 0x7FFFFFFF) > hi_bits
    return above, _gather(x, xi, full, n, lo_bits, span, values, positions, offset, m)


# Rows are sliced before the inner loops: indexing x[row + j] directly costs numba a negative-index check
# per access, which keeps LLVM from vectorising (measured 2.7× slower).
@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _merge_tile(x, rs, k, t0, T, coefs, signs, abs_coefs, weights, clamp_to, out, lam, e, d, w):
    e, d, w = e[:T], d[:T], w[:T]
    o = out[t0 : t0 + T]
    for j in range(T):
        e[j] = np.float32(0.0)
        d[j] = np.float32(0.0)
        w[j] = np.float32(0.0)
    for i in range(k):  # e = Σ cᵢxᵢ, in model order
        ci = coefs[i]
        xr = x[i * rs + t0 : i * rs + t0 + T]
        for j in range(T):
            e[j] = e[j] + ci * xr[j]
    for j in range(T):  # the elected sign, ±1 (a tie, 0, elects +)
        e[j] = np.float32(1.0) if e[j] >= np.float32(0.0) else np.float32(-1.0)
    for i in range(k):
        si, ai, wi = signs[i], abs_coefs[i], weights[i]
        xr = x[i * rs + t0 : i * rs + t0 + T]
        for j in range(T):
            a = max(xr[j] * si * e[j], np.float32(0.0))  # |xᵢ| where cᵢxᵢ agrees with e, else 0
            d[j] = d[j] + ai * a
            w[j] = w[j] + (wi if a > np.float32(0.0) else np.float32(0.0))
    if clamp_to > np.float32(0.0):
        for j in range(T):
            o[j] = o[j] + lam * (d[j] * e[j] / max(w[j], clamp_to))
    else:  # a divisor of 0 counts as 1
        for j in range(T):
            o[j] = o[j] + lam * (d[j] * e[j] / (w[j] + np.float32(w[j] == np.float32(0.0))))


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _disjoint_merge(x, rs, k, c, coefs, signs, abs_coefs, weights, clamp_to, out, lam, e, d, w):
    full = c - c % _TILE
    for t0 in range(0, full, _TILE):
        _merge_tile(x, rs, k, t0, _TILE, coefs, signs, abs_coefs, weights, clamp_to, out, lam, e, d, w)
    if c > full:
        _merge_tile(x, rs, k, full, c - full, coefs, signs, abs_coefs, weights, clamp_to, out, lam, e, d, w)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _lane_total(acc):
    total = 0.0
    for j in range(_GROUP):
        total += acc[j]
    return total


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _abs_sum(x):
    n = x.shape[0]
    acc = np.zeros(_GROUP, np.float64)
    full = n - n % _GROUP
    for g in range(0, full, _GROUP):
        for j in range(_GROUP):
            acc[j] += abs(np.float64(x[g + j]))
    for j in range(full, n):
        acc[j - full] += abs(np.float64(x[j]))
    return _lane_total(acc)


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _dare_group(x, b, u, g, size, digit, before, after, tau, flags):
    """Entries [g, g + size) (lane j = entry g + j): τ = x − b kept in ``tau``, Σ|τ| into the lanes ``before``,
    x = τ·(first byte < digit) and Σ|x| into ``after``, the verdicts as 0/1 bytes in ``flags``. Returns
    whether an entry is undecided (its byte equals the digit)."""
    hit = np.int32(0)
    for j in range(size):
        k = g + np.uint64(j)  # unsigned: no negative-index checks, so the loop vectorises
        t = x[k] - b[k]
        tau[j] = t
        before[j] += abs(np.float64(t))
        byte = u[k]
        hit |= np.int32(byte == digit)
        keep = byte < digit
        flags[j] = np.uint8(keep)
        t = t * np.float32(keep)
        x[k] = t
        after[j] += abs(np.float64(t))
    return hit


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _dare_tied(u, g, size, digit, tau, tied_pos, tied_val, offset, m):
    """Appends the group's undecided entries (position, τ) at index m; returns the new m."""
    for j in range(size):
        if u[g + j] == digit:
            tied_pos[m] = offset + g + j
            tied_val[m] = tau[j]
            m += 1
    return m


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _dare_sweep(x, b, u, digit, bits, tied_pos, tied_val, offset, sums):
    n = x.shape[0]
    before = np.zeros(_GROUP, np.float64)
    after = np.zeros(_GROUP, np.float64)
    tau = np.zeros(_GROUP, np.float32)
    flags = np.zeros(_GROUP, np.uint8)  # the group's verdicts, 0/1 bytes
    words = flags.view(np.uint64)  # (4,) 8 verdicts each, little endian: verdict r in byte r
    pack = bits.shape[0] > 0
    m = 0
    full = n - n % _GROUP
    for g0 in range(0, full, _GROUP):
        if _dare_group(x, b, u, np.uint64(g0), _GROUP, digit, before, after, tau, flags):
            m = _dare_tied(u, g0, _GROUP, digit, tau, tied_pos, tied_val, offset, m)
        if pack:  # 8 verdicts to a byte, verdict r at bit r (pack_bits' layout): one multiply per byte
            for q in range(_GROUP // 8):
                bits[(g0 >> 3) + q] = np.uint8((words[q] * np.uint64(0x0102040810204080)) >> np.uint64(56))
    if n > full:
        flags[:] = 0
        if _dare_group(x, b, u, np.uint64(full), n - full, digit, before, after, tau, flags):
            m = _dare_tied(u, full, n - full, digit, tau, tied_pos, tied_val, offset, m)
        if pack:
            for q in range((n - full + 7) // 8):
                bits[(full >> 3) + q] = np.uint8((words[q] * np.uint64(0x0102040810204080)) >> np.uint64(56))
    sums[0] = _lane_total(before)
    sums[1] = _lane_total(after)
    return m


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _dare_apply(x, b, bits, skip):
    n = x.shape[0]
    head = min(n, (8 - skip) % 8)  # entries before the first whole byte of verdicts
    for j in range(head):
        x[j] = (x[j] - b[j]) * np.float32((bits[0] >> (skip + j)) & 1)
    q0 = 1 if head else 0  # the byte holding entry `head`'s verdict
    for q in range((n - head) // 8):
        byte = bits[q0 + q]
        base = np.uint64(head + 8 * q)
        for r in range(8):
            k = base + np.uint64(r)
            x[k] = (x[k] - b[k]) * np.float32((byte >> r) & 1)
    done = head + (n - head) // 8 * 8
    for j in range(done, n):
        p = skip + j
        x[j] = (x[j] - b[j]) * np.float32((bits[p >> 3] >> (p & 7)) & 1)
