"""Fused loops over the entries of a CPU tensor, compiled by numba, for the sweeps that dominate blocked merges.

Each step of a sweep written with torch ops (subtract, ``abs``, two comparisons, a count, a gather) is its own
kernel: over a cache-sized piece each costs 0.2-0.6 ns per entry, and a dozen of them made TIES' threshold
search 3.5-4.4 ns per entry per model on our 2-core machine. The same steps in one loop cost ~0.55 ns. The
loops only do what the torch ops did, in the same IEEE float32 arithmetic (no fast-math), and compare float
bits as integers, so their results are bit for bit the torch ops' (tests check both paths on the same input).

Without numba (it is a dependency, but a platform may lack it), or for tensors off the CPU, callers use their
torch ops. :data:`ENABLED` is read at each call, so tests can switch the fused loops off.
"""

from __future__ import annotations

import torch

try:  # pragma: no cover - exercised by whichever branch the platform takes
    import numba
    import numpy as np
except ImportError:  # pragma: no cover
    numba = None

ENABLED = True

_GROUP = 32  # entries of the band sweep tested together: vectorised, with a scalar gather only on a hit
_TILE = 512  # columns merged together: their k rows and the sums stay in L1/L2 between the two passes
MERGE_SCRATCH = 3 * _TILE  # float32 entries of scratch :func:`disjoint_merge_` needs


def available(*tensors: torch.Tensor) -> bool:
    """Whether the fused loops can run on these tensors: numba present, every tensor contiguous on the CPU."""
    return ENABLED and numba is not None and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


if numba is not None:

    @numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
    def _gather(x, xi, g, stop, lo_bits, span, values, positions, offset, m):  # pragma: no cover - compiled
        """Appends the band's entries among [g, stop) at values[m:] (and positions[m:]); returns the new m."""
        for j in range(g, stop):
            if np.uint32((xi[j] & 0x7FFFFFFF) - lo_bits) <= span:
                values[m] = abs(x[j])
                if positions.shape[0] > 0:
                    positions[m] = offset + j
                m += 1
        return m

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def _band_sweep(x, sub, lo_bits, hi_bits, values, positions, offset):  # pragma: no cover - compiled
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


_NO_FLOATS = torch.empty(0, dtype=torch.float32)
_NO_POSITIONS = torch.empty(0, dtype=torch.int64)
_NO_BYTES = torch.empty(0, dtype=torch.uint8)


def band_sweep_(
    x: torch.Tensor,
    subtract: torch.Tensor | None,
    lo_bits: int,
    hi_bits: int,
    values: torch.Tensor,
    positions: torch.Tensor | None = None,
    offset: int = 0,
) -> tuple[int, int]:
    """One piece of the top-k sweep of :mod:`~mergescale.methods.selection`, fused.

    ``x -= subtract`` in place first (when given); then counts the entries with ``|x| > hi`` and writes the
    ``m`` magnitudes with ``lo ≤ |x| ≤ hi`` (in flat order) to ``values[:m]``, and with ``positions`` their flat
    positions ``offset + j`` to ``positions[:m]``. ``lo``/``hi`` are given as the int32 bits of non-negative
    float32 values. ``values`` (and ``positions``) need room for every entry of ``x``. Returns
    ``(n_above, m)``. Only when :func:`available` for the tensors.
    """
    pos = (positions if positions is not None else _NO_POSITIONS).numpy()
    sub = (subtract if subtract is not None else _NO_FLOATS).numpy()
    n_above, m = _band_sweep(x.numpy(), sub, lo_bits, hi_bits, values.numpy(), pos, offset)
    return int(n_above), int(m)


if numba is not None:

    # Rows are sliced before the inner loops: indexing x[row + j] directly costs numba a negative-index check
    # per access, which keeps LLVM from vectorising (measured 2.7× slower).
    @numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
    def _merge_tile(x, rs, k, t0, T, coefs, signs, abs_coefs, weights, clamp_to, out, lam, e, d, w):  # pragma: no cover
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
    def _disjoint_merge(x, rs, k, c, coefs, signs, abs_coefs, weights, clamp_to, out, lam, e, d, w):  # pragma: no cover
        full = c - c % _TILE
        for t0 in range(0, full, _TILE):
            _merge_tile(x, rs, k, t0, _TILE, coefs, signs, abs_coefs, weights, clamp_to, out, lam, e, d, w)
        if c > full:
            _merge_tile(x, rs, k, full, c - full, coefs, signs, abs_coefs, weights, clamp_to, out, lam, e, d, w)


def disjoint_merge_(
    cols: torch.Tensor,
    coefs: torch.Tensor,
    signs: torch.Tensor,
    abs_coefs: torch.Tensor,
    weights: torch.Tensor | None,
    clamp_to: float | None,
    out: torch.Tensor,
    lam: float,
    scratch: torch.Tensor,
) -> None:
    """TIES' elect and disjoint merge of the chunk ``cols`` (k, c) of τ'ᵢ, added to ``out`` (c,), fused.

    With δᵢ = cᵢ·τ'ᵢ: e = sign(Σ δᵢ) (ties elect +); Δ = Σ |cᵢ|·max(sign(cᵢ)·τ'ᵢ·e, 0)·e over the models, divided
    (with ``weights``) by Σ wᵢ over the agreeing entries (clamped to ``clamp_to``, or 1 where 0); ``out += λΔ``.
    Float32, sums in model order, each product and sum rounded (no fused multiply-add). ``cols``' rows must be
    contiguous; ``scratch`` holds :data:`MERGE_SCRATCH` float32. ``cols`` is not modified. Without ``weights`` the divisor is 1:
    weights of 0 and a divisor forced to 1 (``clamp_to``) give exactly that.
    """
    k, c = cols.shape
    rs = cols.stride(0) if k > 1 else c
    flat = torch.as_strided(cols, ((k - 1) * rs + c,), (1,))  # (…,) the rows and what lies between them
    e, d, w = scratch[: 3 * _TILE].view(3, _TILE)
    if weights is None:
        weights, clamp_to = torch.zeros(k), 1.0
    _disjoint_merge(
        flat.numpy(),
        rs,
        k,
        c,
        coefs.numpy(),
        signs.numpy(),
        abs_coefs.numpy(),
        weights.numpy(),
        np.float32(clamp_to if clamp_to is not None else 0.0),
        out.numpy(),
        np.float32(lam),
        e.numpy(),
        d.numpy(),
        w.numpy(),
    )


if numba is not None:

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def _lane_total(acc):  # pragma: no cover - compiled
        total = 0.0
        for j in range(_GROUP):
            total += acc[j]
        return total

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def _abs_sum(x):  # pragma: no cover - compiled
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
    def _dare_group(x, b, u, g, size, digit, before, after, tau, flags):  # pragma: no cover - compiled
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
    def _dare_tied(u, g, size, digit, tau, tied_pos, tied_val, offset, m):  # pragma: no cover - compiled
        """Appends the group's undecided entries (position, τ) at index m; returns the new m."""
        for j in range(size):
            if u[g + j] == digit:
                tied_pos[m] = offset + g + j
                tied_val[m] = tau[j]
                m += 1
        return m

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def _dare_sweep(x, b, u, digit, bits, tied_pos, tied_val, offset, sums):  # pragma: no cover - compiled
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
    def _dare_apply(x, b, bits, skip):  # pragma: no cover - compiled
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


def abs_sum(x: torch.Tensor) -> float:
    """Σ|x| of a contiguous CPU float32 tensor in float64: entry j goes to accumulator j mod 32, each added to in
    flat order, then the 32 accumulators in order. Fixed by the values alone, and what :func:`dare_sweep_`'s sums
    are on a whole chunk. Only when :func:`available`."""
    return float(_abs_sum(x.reshape(-1).numpy()))


def dare_sweep_(
    x: torch.Tensor,
    base: torch.Tensor,
    first: torch.Tensor,
    digit: int,
    bits: torch.Tensor | None,
    tied_pos: torch.Tensor,
    tied_val: torch.Tensor,
    offset: int,
) -> tuple[int, float, float]:
    """DARE's statistics over a piece, fused: ``x -= base`` (τ); the entries whose first random byte equals
    ``digit`` (undecided) have their flat positions ``offset + j`` and τ written to ``tied_pos``/``tied_val``;
    ``x *= (first < digit)`` (the first byte's verdict, in place); with ``bits``, the verdicts packed as
    :func:`~.random_masks.pack_bits` packs them. Returns the number of undecided entries and :func:`abs_sum` of
    τ before and after the verdict (exactly :func:`abs_sum` of each, when ``x`` starts a chunk of the grid
    aligned to 32). ``tied_*`` need room for every entry; ``bits`` for ⌈c/8⌉ bytes."""
    sums = np.zeros(2, np.float64)
    m = _dare_sweep(
        x.numpy(),
        base.numpy(),
        first.numpy(),
        digit,
        (bits if bits is not None else _NO_BYTES).numpy(),
        tied_pos.numpy(),
        tied_val.numpy(),
        offset,
        sums,
    )
    return int(m), float(sums[0]), float(sums[1])


def dare_apply_(x: torch.Tensor, base: torch.Tensor, bits: torch.Tensor, skip: int) -> None:
    """``x = (x − base)·keep`` in place, with keep flag ``skip + j`` of the packed ``bits`` for entry j."""
    _dare_apply(x.numpy(), base.numpy(), bits.numpy(), skip)
