"""Exact top-k selection by magnitude, fast on large tensors.

TIES and Model Breadcrumbs keep the entries of a task vector whose magnitude ranks in a given range. mergekit
sorts every tensor (``argsort``: 2.4 s for 4096×4096 on our 2-core machine), and ``torch.kthvalue``/``topk`` are
still 5-10× slower than reading the tensor. Finding the k-th largest value only needs the few entries near it:

1. estimate it from a fixed random sample of 2¹⁵ magnitudes, with a band [lo, hi] around the estimate wide
   enough (±4 standard deviations of the sample quantile) that the true value is inside almost always;
2. sweep the tensor once in cache-sized chunks: count the entries above ``hi`` and gather the entries inside
   the band (≈2% of the tensor) with their positions;
3. find the exact k-th value among the band entries with ``kthvalue``; if the counts prove the band missed,
   fall back to ``kthvalue`` over the whole tensor.

The result is exact either way; the sample only decides how fast it is. The sweep can also subtract the base
model on the way (τ = θ − θ_base, in place), so computing the task vector and its threshold read memory once.

Ranking rule (a strict total order, so "the top k" is always exactly k entries): larger magnitude ranks higher;
among equal magnitudes the lower flat (row-major) index ranks higher. This is the order of a stable descending
sort, ``torch.argsort(m, descending=True, stable=True)``. mergekit's unstable ``argsort`` breaks such ties
arbitrarily, so where magnitudes are equal at the threshold the two may keep different (equal-magnitude)
entries; everything else is identical.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from mergescale.methods import kernels

SWEEP_CHUNK = 1 << 18  # entries per chunk of the sweep: a few MiB of work set, stays in cache
_DIRECT_MAX = 1 << 16  # up to this many entries, skip the sample: every entry is a candidate
_SAMPLE = 1 << 15
_BIG_SAMPLE = 1 << 20  # the blocked search's sample on large tensors when no sums are needed
# Band half-width in standard deviations of the sample quantile's rank: misses (then kthvalue over the whole
# tensor) happen with probability ~6e-5, and the band holds ~2% of the entries.
_Z = 4.0


@dataclass(frozen=True)
class Threshold:
    """The top-k entries by magnitude of a flat tensor: all entries with ``|x| > value`` and the first
    ``k - n_greater`` of the entries with ``|x| == value`` (``equal_positions``, ascending flat indices).

    ``top_sum`` is Σ|x| over the top k (filled in when asked for, for L1 rescaling).
    """

    k: int
    value: float
    n_greater: int
    equal_positions: torch.Tensor  # (e,) int64
    top_sum: float = 0.0

    @property
    def kept_equal(self) -> torch.Tensor:
        """Positions of entries equal to ``value`` that are in the top k."""
        return self.equal_positions[: self.k - self.n_greater]

    @property
    def surplus_equal(self) -> torch.Tensor:
        """Positions of entries equal to ``value`` that are not in the top k."""
        return self.equal_positions[self.k - self.n_greater :]

    @cached_property
    def below(self) -> float:
        """The largest float32 below ``value``: ``|x| > below`` is exactly ``|x| >= value`` for float32 x."""
        v = torch.tensor(self.value, dtype=torch.float32)
        return float(torch.nextafter(v, torch.tensor(-math.inf, dtype=torch.float32)))


def _sample_indices(n: int, device: torch.device, size: int = _SAMPLE) -> torch.Tensor:
    # A fixed generator: the sample only affects speed, never the result, and stays reproducible.
    g = torch.Generator(device="cpu")
    g.manual_seed(0x5EED ^ n)
    return torch.randint(0, n, (size,), generator=g).to(device)


@dataclass
class _Band:
    """What the sweep gathers for one k: counts above ``hi``, and the entries in [lo, hi] with positions."""

    k: int
    lo: float
    hi: float
    n_above: int = 0
    sum_above: float = 0.0
    values: list[torch.Tensor] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lo_bits, self.hi_bits = _bits(self.lo), _bits(self.hi)


def _bands(x: torch.Tensor, subtract: torch.Tensor | None, ks: Sequence[int]) -> list[_Band]:
    n = x.numel()
    if n <= _DIRECT_MAX:
        return [_Band(k, 0.0, math.inf) for k in ks]
    idx = _sample_indices(n, x.device)
    sample = x[idx] if subtract is None else x[idx] - subtract[idx]
    s = sample.abs_().sort().values  # (S,) ascending
    bands = []
    for k in ks:
        p = k / n
        center = (1.0 - p) * _SAMPLE  # the k-th largest sits at ascending rank (n - k) / n of the sample
        half = _Z * math.sqrt(_SAMPLE * p * (1.0 - p)) + 2.0
        lo = s[max(0, math.floor(center - half))].item()
        hi = s[min(_SAMPLE - 1, math.ceil(center + half))].item()
        bands.append(_Band(k, lo, hi))
    return bands


def top_k_thresholds_(
    x: torch.Tensor,
    ks: Sequence[int],
    *,
    subtract: torch.Tensor | None = None,
    with_sums: bool = False,
) -> tuple[list[Threshold], float]:
    """Thresholds of the top-k magnitudes of the flat float32 tensor ``x``, for each k in ``ks`` (0 < k < n).

    With ``subtract``, first computes ``x -= subtract`` in place (fused into the same sweep). Returns the
    thresholds and, with ``with_sums``, Σ|x| over all entries (else 0.0).
    """
    n = x.numel()
    for k in ks:
        if not 0 < k < n:
            raise ValueError(f"k must be in [1, {n - 1}], got {k}")
    bands = _bands(x, subtract, ks)
    total = 0.0
    step = min(SWEEP_CHUNK, n) if x.device.type == "cpu" else n  # one chunk on accelerators
    mbuf = torch.empty(step, dtype=torch.float32, device=x.device)  # (step,) |x| of the chunk
    # uint8 0/1 flags: comparisons write them several times faster than bool outputs, and
    # nonzero_bytes() scans them 8 at a time.
    above = torch.empty(round8(step), dtype=torch.uint8, device=x.device)
    inside = torch.empty(round8(step), dtype=torch.uint8, device=x.device)
    positions: torch.Tensor | None = None  # (step,) the fused sweep's band positions
    for start in range(0, n, step):
        xc = x[start : start + step]  # (c,) a view: subtraction lands in x
        c = xc.numel()
        sub = subtract[start : start + step] if subtract is not None else None
        if not with_sums and kernels.available(xc, sub):
            if positions is None:
                positions = torch.empty(step, dtype=torch.int64)
            for b in bands:
                n_above, m = kernels.band_sweep_(xc, sub, b.lo_bits, b.hi_bits, mbuf, positions, start)
                sub = None  # subtracted once
                b.n_above += n_above
                b.values.append(mbuf[:m].clone())
                b.positions.append(positions[:m].clone())
            continue
        if sub is not None:
            xc.sub_(sub)
        mc = torch.abs(xc, out=mbuf[:c])  # (c,)
        bits = mc.view(torch.int32)  # (c,) for |x| ≥ 0 the float order is the integer order of the bits
        if with_sums:
            total += float(mc.sum())
        for b in bands:
            torch.gt(bits, b.hi_bits, out=above[:c])
            b.n_above += int(above[:c].sum(dtype=torch.int32))
            if with_sums and b.hi < math.inf:
                b.sum_above += float(torch.hardshrink(mc, b.hi).sum())  # Σ over mc > hi
            torch.ge(bits, b.lo_bits, out=inside[:c])
            inside[:c].sub_(above[:c])  # (c,) 1 where lo <= |x| <= hi (≥ lo includes > hi)
            pos = nonzero_bytes(inside, c)  # (p,) ascending
            b.values.append(mc[pos])
            b.positions.append(pos.add_(start))
    return [_resolve(x, b, with_sums) for b in bands], total


def _bits(v: float) -> int:
    """The int32 with the bit pattern of float32 ``v``."""
    return struct.unpack("<i", struct.pack("<f", v))[0]


def round8(n: int) -> int:
    """``n`` rounded up to a multiple of 8 (capacity of a flag buffer for :func:`nonzero_bytes`)."""
    return (n + 7) // 8 * 8


def nonzero_bytes(flags: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending positions of the nonzero entries among ``flags[:count]`` (a flat uint8 buffer at offset 0).

    ``nonzero`` costs ~1.3 ns per scanned entry on our CPUs whatever the result size; viewing the flags as int64
    words scans 8 at a time, and only the words holding a nonzero byte are looked into: fast when flags are
    sparse. ``flags`` needs room for ``round8(count)`` bytes; the padding bytes are set to 0.
    """
    padded = round8(count)
    flags[count:padded] = 0
    words = flags[:padded].view(torch.int64)  # (c/8,)
    hit = words.nonzero().squeeze(1)  # (h,) words holding a nonzero byte
    if hit.numel() == 0:
        return hit
    where = flags[:padded].view(-1, 8)[hit].nonzero()  # (p, 2): (index into hit, byte), row-major = ascending
    return hit[where[:, 0]].mul_(8).add_(where[:, 1])


def _resolve(x: torch.Tensor, b: _Band, with_sums: bool) -> Threshold:
    cand = torch.cat(b.values)  # (c,) band magnitudes
    pos = torch.cat(b.positions)  # (c,) their flat positions, ascending
    need = b.k - b.n_above  # rank of the k-th largest among the candidates
    if not 0 < need <= cand.numel():
        return exact_threshold(x.abs(), b.k, with_sums=with_sums)  # the band missed: whole tensor
    v = torch.kthvalue(cand, cand.numel() - need + 1).values
    greater = cand > v
    n_greater = b.n_above + int(torch.count_nonzero(greater))
    top_sum = 0.0
    if with_sums:
        top_sum = b.sum_above + float(cand[greater].sum()) + (b.k - n_greater) * v.item()
    # every entry equal to v is inside the band (lo <= v <= hi), so these are all of them
    return Threshold(b.k, v.item(), n_greater, pos[cand == v], top_sum)


def exact_threshold(m: torch.Tensor, k: int, *, with_sums: bool = False) -> Threshold:
    """The same threshold by ``kthvalue`` over the whole magnitude tensor ``m`` (fallback, small tensors)."""
    flat = m.reshape(-1)
    v = torch.kthvalue(flat, flat.numel() - k + 1).values
    greater = flat > v
    n_greater = int(torch.count_nonzero(greater))
    top_sum = float(flat[greater].sum()) + (k - n_greater) * v.item() if with_sums else 0.0
    return Threshold(k, v.item(), n_greater, (flat == v).nonzero().squeeze(1), top_sum)


def zero_positions_(xc: torch.Tensor, start: int, positions: torch.Tensor) -> None:
    """Set ``xc[p - start] = 0`` for the sorted flat ``positions`` that fall inside the chunk ``xc``."""
    if positions.numel() == 0:
        return
    bounds = torch.tensor([start, start + xc.numel()], device=positions.device)
    lo, hi = torch.searchsorted(positions, bounds).tolist()
    if hi > lo:
        xc[positions[lo:hi] - start] = 0.0


def top_k_mask(m: torch.Tensor, k: int, *, complement: bool = False) -> torch.Tensor:
    """Boolean mask (shape of ``m``) of the k largest entries of the non-negative tensor ``m``.

    Exactly ``k`` entries are selected (ties at the threshold: lowest flat index first). With
    ``complement=True`` the mask of the other ``n - k`` entries is returned instead.
    """
    flat = m.reshape(-1)  # (n,)
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full(m.shape, (k >= n) != complement, dtype=torch.bool, device=m.device)
    (t,), _ = top_k_thresholds_(flat, [k])
    mask = flat < t.value if complement else flat >= t.value  # (n,) bool
    mask[t.surplus_equal] = complement
    return mask.view(m.shape)


def naive_top_k_mask(m: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: the same selection by a full stable sort (slow; for tests)."""
    flat = m.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=m.device)
    if k > 0:
        mask[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    return mask.view(m.shape)


# ---------------------------------------------------------------------------------------------------------------
# the same selection over a tensor that arrives in blocks (blocked merging, :mod:`mergescale.methods.blocked`)
# ---------------------------------------------------------------------------------------------------------------
_COARSE_SHIFT = 15  # a band that missed is found again on a histogram of the top 16 bits of |x|'s float bits


@dataclass
class BlockThreshold:
    """The top ``k`` by magnitude of a flat tensor: every entry with ``|x| > value`` and the first
    ``k - n_greater`` (``quota``) entries with ``|x| == value`` in flat order (``n_equal`` in all) — the same
    entries as :class:`Threshold` selects, found without storing positions.

    When some equal entries are out (``n_equal > quota``), ``cut`` is the grid chunk ``[start, end)`` where the
    quota runs out and how many equal entries come before it: before the chunk every equal entry is in, after
    it none is, and only inside it are equal entries looked for. ``top_sum`` is Σ|x| over the top k (filled in
    when asked for, for L1 rescaling).
    """

    k: int
    value: float
    n_greater: int
    n_equal: int
    top_sum: float = 0.0
    cut: tuple[int, int, int] | None = None

    @property
    def quota(self) -> int:
        return self.k - self.n_greater

    @cached_property
    def below(self) -> float:
        """The largest float32 below ``value``: ``|x| > below`` is exactly ``|x| >= value`` for float32 x."""
        v = torch.tensor(self.value, dtype=torch.float32)
        return float(torch.nextafter(v, torch.tensor(-math.inf, dtype=torch.float32)))


class TopKApply:
    """Applies a :class:`BlockThreshold` to chunks of the flat tensor that come in flat order, each once:
    :meth:`keep_` zeroes what is not in the top k, :meth:`drop_` what is."""

    def __init__(self, t: BlockThreshold) -> None:
        self.t = t
        self.seen = t.cut[2] if t.cut is not None else 0  # equal entries counted in so far

    def _parts(self, xc: torch.Tensor, start: int) -> tuple[int, int]:
        """The chunk's local [a, b) inside the cut grid chunk."""
        if self.t.cut is None:
            return xc.numel(), xc.numel()  # everything "before the cut": every equal entry is in
        cut_start, cut_end, _ = self.t.cut
        n = xc.numel()
        return min(n, max(0, cut_start - start)), min(n, max(0, cut_end - start))

    def _equal_in_cut(self, part: torch.Tensor) -> tuple[torch.Tensor, int]:
        pos = (part.abs() == self.t.value).nonzero().squeeze(1)  # (e,) ascending
        room = max(0, self.t.quota - self.seen)
        self.seen += min(room, pos.numel())
        return pos, room

    def keep_(self, xc: torch.Tensor, start: int) -> None:
        """Zero, in place, the entries of ``xc`` = x[start : start + len] that are not in the top k."""
        a, b = self._parts(xc, start)
        if a:
            torch.hardshrink(xc[:a], self.t.below, out=xc[:a])  # keeps |x| >= value
        if b > a:
            part = xc[a:b]
            torch.hardshrink(part, self.t.below, out=part)
            pos, room = self._equal_in_cut(part)
            if pos.numel() > room:
                part[pos[room:]] = 0.0
        if b < xc.numel():
            torch.hardshrink(xc[b:], self.t.value, out=xc[b:])  # keeps |x| > value

    def drop_(self, xc: torch.Tensor, start: int) -> None:
        """Zero, in place, the entries of ``xc`` that are in the top k."""
        a, b = self._parts(xc, start)
        if a:
            xc[:a].sub_(torch.hardshrink(xc[:a], self.t.below))  # zeroes |x| >= value
        if b > a:
            part = xc[a:b]
            part.sub_(torch.hardshrink(part, self.t.value))  # zeroes |x| > value
            pos, room = self._equal_in_cut(part)
            part[pos[:room]] = 0.0
        if b < xc.numel():
            xc[b:].sub_(torch.hardshrink(xc[b:], self.t.value))


@dataclass
class _SearchBand:
    """One k's search: counts above ``hi`` and the magnitudes inside [lo, hi] (in flat order), or, while
    recovering from a band that missed, a histogram of the top bits."""

    k: int
    lo: float
    hi: float
    n_above: int = 0
    sum_above: float = 0.0
    values: list[torch.Tensor] = field(default_factory=list)
    pieces: list[tuple[int, int]] = field(default_factory=list)  # flat [start, end) of each entry of values
    coarse: torch.Tensor | None = None  # (2^16,) int64 histogram of bits >> _COARSE_SHIFT
    done: BlockThreshold | None = None

    def __post_init__(self) -> None:
        self.set_band(self.lo, self.hi)

    def set_band(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi
        self.lo_bits, self.hi_bits = _bits(lo), _bits(hi)
        self.n_above, self.sum_above, self.values, self.pieces = 0, 0.0, [], []


class TopKSearch:
    """:func:`top_k_thresholds_` over a flat tensor of ``n`` entries fed in pieces (blocks), in flat order.

    1. :meth:`sample_positions` / :meth:`take_sample`: the same fixed sample and band as the whole-tensor
       sweep (tensors of at most 2¹⁶ entries take every entry as a candidate instead);
    2. :meth:`feed` every piece (optionally subtracting the base in place, as the sweep does): counts above the
       band and the magnitudes inside it are kept (4 bytes per candidate, ~2 % of the entries);
    3. :meth:`resolve`: the exact k-th value by ``kthvalue`` among the candidates. If the counts prove the
       band missed (probability ~6e-5), it returns False and asks for two more passes: a histogram of the top
       16 bits of every magnitude, which pins the k-th value to one of 2¹⁶ bit ranges, then the band pass again
       on that range, which cannot miss.

    The values are exact whatever the pieces (integer counts and an exact selection). With ``with_sums``, the
    sums (Σ|x| of every entry, Σ|x| above the band) are taken over the fixed grid of
    :data:`~mergescale.methods.blocked.GRID`-entry chunks, as the whole-tensor sweep takes them, so they are
    bit for bit the whole-tensor sweep's too.
    """

    def __init__(self, n: int, ks: Sequence[int], *, with_sums: bool = False) -> None:
        for k in ks:
            if not 0 < k < n:
                raise ValueError(f"k must be in [1, {n - 1}], got {k}")
        self.n, self.ks, self.with_sums = n, list(ks), with_sums
        self.bands: list[_SearchBand] = []
        self.total = 0.0
        self._sums = None
        self._pass = 0  # passes resolved so far
        self._coarse = False  # this pass builds coarse histograms
        self._positions: torch.Tensor | None = None
        self._buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if n <= _DIRECT_MAX:
            self._set_bands([(k, 0.0, math.inf) for k in ks])

    # -- band --------------------------------------------------------------------------------------------------
    @property
    def sample_size(self) -> int:
        """The whole-tensor sweep's 2¹⁵ entries when sums are asked for (their rounding depends on the band,
        which must then be the sweep's); otherwise up to 2²⁰ on large tensors (n/64): the band's share of the
        entries shrinks as 1/√S, and gathering band candidates is most of a pass's cost."""
        return _SAMPLE if self.with_sums else min(_BIG_SAMPLE, max(_SAMPLE, self.n >> 6))

    def sample_positions(self) -> torch.Tensor | None:
        if self.bands:
            return None
        if self._positions is None:
            self._positions = _sample_indices(self.n, torch.device("cpu"), self.sample_size)
        return self._positions

    def take_sample(self, sample: torch.Tensor) -> None:
        """The entries of x at :meth:`sample_positions` (after the subtraction :meth:`feed` does)."""
        m = sample.abs()  # (S,)
        size = m.numel()

        def ranked(r: int) -> float:  # the sample's r-th smallest (from 0): a selection, not a sort of 2²⁰
            return torch.kthvalue(m, r + 1).values.item()

        bands = []
        for k in self.ks:
            p = k / self.n
            center = (1.0 - p) * size  # the k-th largest sits at ascending rank (n - k) / n of the sample
            half = _Z * math.sqrt(size * p * (1.0 - p)) + 2.0
            bands.append((k, ranked(max(0, math.floor(center - half))), ranked(min(size - 1, math.ceil(center + half)))))
        self._set_bands(bands)

    def _set_bands(self, bands: Sequence[tuple[int, float, float]]) -> None:
        self.bands = [_SearchBand(k, lo, hi) for k, lo, hi in bands]
        self._new_sums()

    def _new_sums(self) -> None:
        if not self.with_sums:
            return
        from mergescale.methods.blocked import GridSum

        first = self._pass == 0
        his = [b.hi for b in self.bands if b.done is None]

        def sums(mc: torch.Tensor) -> list[float]:
            out = [float(mc.sum())] if first else [0.0]
            out += [float(torch.hardshrink(mc, hi).sum()) if hi < math.inf else 0.0 for hi in his]  # Σ over > hi
            return out

        self._sums = GridSum(self.n, sums, width=1 + len(his))

    @property
    def finished(self) -> bool:
        return bool(self.bands) and all(b.done is not None for b in self.bands)

    # -- sweep ---------------------------------------------------------------------------------------------------
    def feed(self, x: torch.Tensor, offset: int, subtract: torch.Tensor | None = None) -> None:
        """Entries ``[offset, offset + len(x))`` of the flat tensor (``x -= subtract`` first, in place)."""
        assert self.bands, "take_sample first"
        n = x.numel()
        whole = x.device.type != "cpu" and (self._sums is None or self._coarse)  # accelerators: one piece
        size = n if whole else min(SWEEP_CHUNK, n)
        mbuf, above, inside = self._scratch(size, x.device)
        pos = 0
        while pos < n:
            # pieces end on the grid of the whole tensor, as the whole-tensor sweep's chunks do
            g = offset + pos
            end = n if whole else min(n, pos + SWEEP_CHUNK - g % SWEEP_CHUNK)
            xc = x[pos:end]  # (c,) a view: the subtraction lands in x
            sub = subtract[pos:end] if subtract is not None else None
            c = end - pos
            if not self._coarse and kernels.available(xc, sub):
                self._count_fused(xc, sub, mbuf[:c], g)
                mc = torch.abs(xc, out=mbuf[:c]) if self._sums is not None else None
            else:
                if sub is not None:
                    xc.sub_(sub)
                mc = torch.abs(xc, out=mbuf[:c])  # (c,)
                self._count(mc, above, inside, g)
            if self._sums is not None and not self._coarse:
                assert mc is not None
                self._sums.feed(mc, g)
            pos = end

    def _scratch(self, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """|x| of a piece (float32) and two uint8 flag buffers, kept across :meth:`feed` calls: fed piece by
        piece, fresh buffers for every piece cost more than the sweep itself once threads share the allocator's
        one arena (:func:`~mergescale.engine.allocator.allocator_settings`)."""
        have = self._buffers
        if have is None or have[0].numel() < size or have[0].device != device:
            # uint8 0/1 flags: comparisons write them several times faster than bool outputs
            have = self._buffers = (
                torch.empty(size, dtype=torch.float32, device=device),
                torch.empty(round8(size), dtype=torch.uint8, device=device),
                torch.empty(round8(size), dtype=torch.uint8, device=device),
            )
        return have

    def _count_fused(self, xc: torch.Tensor, sub: torch.Tensor | None, values: torch.Tensor, start: int) -> None:
        """:meth:`_count` with the subtraction, in one loop per band (:func:`~.kernels.band_sweep_`)."""
        for b in self.bands:
            if b.done is not None:
                continue
            n_above, m = kernels.band_sweep_(xc, sub, b.lo_bits, b.hi_bits, values)
            sub = None  # subtracted once
            b.n_above += n_above
            b.values.append(values[:m].clone())
            b.pieces.append((start, start + xc.numel()))
        assert sub is None, "a piece fed with every band resolved"

    def _count(self, mc: torch.Tensor, above: torch.Tensor, inside: torch.Tensor, start: int) -> None:
        bits = mc.view(torch.int32)  # (c,) for |x| ≥ 0 the float order is the integer order of the bits
        c = mc.numel()
        for b in self.bands:
            if b.done is not None:
                continue
            if self._coarse:
                assert b.coarse is not None
                b.coarse += torch.bincount(bits >> _COARSE_SHIFT, minlength=b.coarse.numel())
                continue
            torch.gt(bits, b.hi_bits, out=above[:c])
            b.n_above += int(torch.count_nonzero(above[:c]))
            torch.ge(bits, b.lo_bits, out=inside[:c])
            inside[:c].sub_(above[:c])  # (c,) 1 where lo <= |x| <= hi (≥ lo includes > hi)
            b.values.append(mc[nonzero_bytes(inside, c)])
            b.pieces.append((start, start + c))

    # -- result --------------------------------------------------------------------------------------------------
    def resolve(self) -> bool:
        """After a pass over every entry: True when every threshold is found (:attr:`thresholds`), False when
        another pass is needed."""
        sums = self._sums.values if self._sums is not None else None
        if sums is not None and self._pass == 0:
            self.total = sums[0]
        open_bands = [b for b in self.bands if b.done is None]
        if self._coarse:
            for b in open_bands:
                self._narrow(b)
        else:
            for j, b in enumerate(open_bands):
                if sums is not None:
                    b.sum_above = sums[1 + j]
                self._resolve_band(b)
        self._pass += 1
        self._coarse = any(b.done is None and b.coarse is None for b in self.bands)
        for b in self.bands:
            if b.done is None and self._coarse:
                b.coarse = torch.zeros(1 << (31 - _COARSE_SHIFT), dtype=torch.int64)
        self._new_sums()
        return self.finished

    def _resolve_band(self, b: _SearchBand) -> None:
        cand = torch.cat(b.values) if b.values else torch.empty(0)  # (c,) band magnitudes in flat order
        lengths = torch.tensor([v.numel() for v in b.values], dtype=torch.int64)
        pieces, b.values, b.pieces = b.pieces, [], []
        need = b.k - b.n_above  # rank of the k-th largest among the candidates
        if not 0 < need <= cand.numel():
            if b.coarse is not None:  # a band from the histogram holds the k-th value by construction
                raise AssertionError(f"top-k selection: no k-th value in its histogram bin (k={b.k})")
            return  # the band missed: a coarse histogram next
        v = torch.kthvalue(cand, cand.numel() - need + 1).values
        greater = cand > v
        n_greater = b.n_above + int(torch.count_nonzero(greater))
        equal = cand == v  # every entry equal to v is inside the band
        n_equal = int(torch.count_nonzero(equal))
        top_sum = 0.0
        if self.with_sums:
            top_sum = b.sum_above + float(cand[greater].sum()) + (b.k - n_greater) * v.item()
        cut = None
        quota = b.k - n_greater
        if n_equal > quota:
            # the piece holding the first equal entry beyond the quota, and the equal entries before it
            first_out = int(torch.searchsorted(equal.cumsum(0), quota + 1))  # its index among the candidates
            piece = int(torch.searchsorted(lengths.cumsum(0), first_out, right=True))
            before = int(lengths[:piece].sum())
            start, end = pieces[piece]
            cut = (start, end, int(equal[:before].sum()))
        b.done = BlockThreshold(b.k, v.item(), n_greater, n_equal, top_sum, cut)

    def _narrow(self, b: _SearchBand) -> None:
        """From the coarse histogram, the 2¹⁵-wide bit range holding the k-th value: the next band."""
        assert b.coarse is not None
        from_top = b.coarse.flip(0).cumsum(0)  # entries in this bin or above, highest bin first
        top_bin = b.coarse.numel() - 1 - int(torch.searchsorted(from_top, b.k))
        lo_bits = top_bin << _COARSE_SHIFT
        hi_bits = lo_bits + (1 << _COARSE_SHIFT) - 1
        b.set_band(_float(lo_bits), _float(hi_bits))

    @property
    def thresholds(self) -> list[BlockThreshold]:
        assert self.finished
        return [b.done for b in self.bands]  # type: ignore[misc]


def _float(bits: int) -> float:
    """The float32 with the bit pattern ``bits``, as a Python float."""
    return struct.unpack("<f", struct.pack("<i", bits))[0]
