"""Fused loops over the entries of CPU tensors, compiled by numba, for the passes that dominate blocked merges.

Each step of a pass written with torch ops (subtract, ``abs``, two comparisons, a count, a gather, ...) is its
own kernel: over a cache-sized piece each costs 0.2-0.6 ns per entry on our 2-core machine, and the dozen of
TIES' threshold sweep made it 3.5-4.4 ns per entry and model. The same steps in one loop cost ~0.55 ns.

- :func:`band_sweep_` (the top-k sweep) and :func:`dare_apply_` compute exactly what the torch ops compute:
  IEEE float32 arithmetic without fast-math, float bits compared as integers.
- :func:`disjoint_merge_` (TIES' elect + disjoint mean) and :func:`abs_sum` (the L1 sums of rescaling, also
  inside :func:`dare_sweep_`) *define* their order of summation: model order, no fused multiply-add; 32
  float64 lanes. torch's matrix-vector product and float32 cascade sum round differently, so against the torch
  ops these agree to float rounding only (``tests/methods/test_kernels.py``). The whole-tensor and the blocked
  forms of a merge both run them, so those stay bit for bit equal.

numba is a dependency; without it (a platform without wheels), or for tensors off the CPU, callers run their
torch ops, whose results differ from these in the last bits where a sum's order is defined above. The first
call of each loop compiles it (about 4 s for all of them on our machine), then numba caches the machine code
next to this file (or in its user cache when that is read-only): later processes load it in ~0.4 s.
:data:`ENABLED` is read at each call, so tests can switch the fused loops off.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec

import numpy as np
import torch

# numba (and LLVM) load on a loop's first call, not here: a merge that needs none of them (linear) does not pay
# the ~0.35 s import
HAVE_NUMBA = find_spec("numba") is not None
ENABLED = True

_TILE = 512  # columns :func:`disjoint_merge_` merges together (the compiled loops' tile)
MERGE_SCRATCH = 3 * _TILE  # float32 entries of scratch :func:`disjoint_merge_` needs


def _loops():  # the compiled module
    from mergescale.methods import _fused_loops

    return _fused_loops


def loaded() -> bool:
    """Whether this process has loaded the compiled loops (and numba's runtime with them)."""
    return "mergescale.methods._fused_loops" in sys.modules


def available(*tensors: torch.Tensor | None) -> bool:
    """Whether the fused loops can run on these tensors (None: an optional one not given): numba present, every
    tensor contiguous on the CPU."""
    return ENABLED and HAVE_NUMBA and all(t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in tensors)


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
    n_above, m = _loops()._band_sweep(x.numpy(), sub, lo_bits, hi_bits, values.numpy(), pos, offset)
    return int(n_above), int(m)


def disjoint_merge_(
    cols: torch.Tensor,
    coefs: torch.Tensor,
    signs: torch.Tensor,
    abs_coefs: torch.Tensor,
    weights: torch.Tensor,
    clamp_to: float,
    out: torch.Tensor,
    lam: float,
    scratch: torch.Tensor,
) -> None:
    """TIES' elect and disjoint merge of the chunk ``cols`` (k, c) of τ'ᵢ, added to ``out`` (c,), fused.

    With δᵢ = cᵢ·τ'ᵢ: e = sign(Σ δᵢ) (ties elect +); Δ = Σ |cᵢ|·max(sign(cᵢ)·τ'ᵢ·e, 0)·e over the models, divided
    by Σ wᵢ over the agreeing entries, at least ``clamp_to`` when it is > 0, else 1 where that sum is 0;
    ``out += λΔ``. Weights of 0 with ``clamp_to`` 1 divide by 1. Float32, sums in model order, each product and
    sum rounded (no fused multiply-add). ``cols``' rows must be contiguous; ``scratch`` holds
    :data:`MERGE_SCRATCH` float32. ``cols`` is not modified.
    """
    k, c = cols.shape
    rs = cols.stride(0) if k > 1 else c
    flat = torch.as_strided(cols, ((k - 1) * rs + c,), (1,))  # (…,) the rows and what lies between them
    e, d, w = scratch[: 3 * _TILE].view(3, _TILE)
    _loops()._disjoint_merge(
        flat.numpy(),
        rs,
        k,
        c,
        coefs.numpy(),
        signs.numpy(),
        abs_coefs.numpy(),
        weights.numpy(),
        np.float32(clamp_to),
        out.numpy(),
        np.float32(lam),
        e.numpy(),
        d.numpy(),
        w.numpy(),
    )


def abs_sum(x: torch.Tensor) -> float:
    """Σ|x| of a contiguous CPU float32 tensor in float64: entry j goes to accumulator j mod 32, each added to in
    flat order, then the 32 accumulators in order. Fixed by the values alone, and what :func:`dare_sweep_`'s sums
    are on a whole chunk. Only when :func:`available`."""
    return float(_loops()._abs_sum(x.reshape(-1).numpy()))


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
    m = _loops()._dare_sweep(
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
    _loops()._dare_apply(x.numpy(), base.numpy(), bits.numpy(), skip)
