"""NuSLERP: spherical interpolation between two models, optionally of their task vectors, optionally row by row.

With the two models' weights w₀, w₁, t = w₁ / (w₀ + w₁) (t = ½ when |w₀ + w₁| < 10⁻⁶) and v₀, v₁ the two
tensors (minus θ_base when a base model is given), each vector v cut from them (the whole tensor with
``nuslerp_flatten``, else each row along the last dimension, or each column with ``nuslerp_row_wise``):

    cos Ω = ⟨v₀/max(‖v₀‖, 10⁻⁷), v₁/max(‖v₁‖, 10⁻⁷)⟩      (clamped to [−1, 1])
    slerp = (sin((1 − t)Ω)·v₀ + sin(tΩ)·v₁) / sin Ω          (lerp (1 − t)·v₀ + t·v₁ where 1 − cos²Ω ≤ 10⁻¹⁶)
    θ     = θ_base + slerp(v₀ − θ_base, v₁ − θ_base)         (or slerp(v₀, v₁) without a base)

SLERP: Shoemake 1985, https://doi.org/10.1145/325165.325242; NuSLERP (weights instead of ``t``, task vectors,
row-wise) is Arcee AI's generalisation in mergekit (``merge_methods/nuslerp.py``).

mergekit 0.1.5 semantics, matched here: exactly two models besides an optional base; ``weight`` per model
(required); ``nuslerp_flatten`` (default true) and ``nuslerp_row_wise`` (default false) global. The interpolation
uses the raw vectors; only the angle uses normalised ones (so the result is not renormalised).

Every angle comes from float64 sums ‖v₀‖², ⟨v₀, v₁⟩, ‖v₁‖² taken in an order set by the tensor alone: over the
fixed grid of the flattened tensor (:class:`~mergescale.methods.blocked.GridSum`), row by row along the last
dimension (pairwise halving), or column by column over fixed groups of rows; so the engine runs the merge over
row blocks of a large tensor (a statistics pass where the vectors cross blocks, then the apply pass) with the
whole-tensor result bit for bit. The (anti)parallel test takes cos Ω at float32 precision, as mergekit's
computation has it (:func:`nuslerp_coefficients`).
"""

from __future__ import annotations

import math
import struct

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec
from mergescale.methods.blocked import (
    GRID,
    Block,
    BlockedMerge,
    GridSum,
    TensorMeta,
    gram_sum,
    grid_pieces,
    run_in_memory,
    step_ranges,
)
from mergescale.methods.model_stock import fixed_row_sum

NORM_EPS = 1e-7
COLINEAR_EPS = 1e-8
ZERO_SUM = 1e-6
_PIECE = 1 << 16  # entries per piece of the apply pass on the CPU: both inputs' pieces stay in cache


def interpolation_factor(w0: float, w1: float) -> float:
    total = w0 + w1
    return 0.5 if abs(total) < ZERO_SUM else w1 / total


def _to_float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def nuslerp_coefficients(t: float, s00: float, s01: float, s11: float) -> tuple[float, float]:
    """(c₀, c₁) with nuslerp(t, v₀, v₁) = c₀v₀ + c₁v₁, from ‖v₀‖², ⟨v₀, v₁⟩ and ‖v₁‖².

    The (anti)parallel test (1 − cos²Ω ≤ 10⁻¹⁶) takes cos Ω rounded to float32, the precision of mergekit's
    computation (so it means |cos Ω| = 1 in float32); the angle takes the float64 cos Ω. Exact float64 sums
    alone would put vectors (anti)parallel up to the inputs' float32 rounding (τ and −τ computed from θ_base ± τ)
    just off ±1, into the spherical branch, where 1/sin Ω ≈ 10⁸ magnifies that rounding."""
    n0 = max(math.sqrt(max(s00, 0.0)), NORM_EPS)
    n1 = max(math.sqrt(max(s11, 0.0)), NORM_EPS)
    cos = min(1.0, max(-1.0, s01 / (n0 * n1)))
    c32 = min(1.0, max(-1.0, _to_float32(cos)))
    if 1 - c32 * c32 <= COLINEAR_EPS**2:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def nuslerp_coefficient_tensors(t: float, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nuslerp_coefficients` of many vectors at once: ``sums`` ``(3, V)`` float64 -> (c₀, c₁), ``(V,)``
    float32 each."""
    n0 = sums[0].clamp(min=0).sqrt().clamp(min=NORM_EPS)
    n1 = sums[2].clamp(min=0).sqrt().clamp(min=NORM_EPS)
    cos = (sums[1] / (n0 * n1)).clamp(-1.0, 1.0)
    c32 = cos.to(torch.float32).to(torch.float64).clamp(-1.0, 1.0)  # at float32 precision: the colinear test
    colinear = (1 - c32.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin)
    return c0.to(torch.float32), c1.to(torch.float32)


def _pair_sums(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """``(3, ...)`` float64 products x₀², x₀x₁, x₁² of float32 tensors (exact in float64)."""
    a, b = x0.to(torch.float64), x1.to(torch.float64)
    return torch.stack([a * a, a * b, b * b])


def nuslerp(inputs: MethodInputs) -> torch.Tensor:
    """NuSLERP of the two models (around the base when given), in float32: :class:`NuSlerpMerge` on the whole
    tensor as one block (the engine may run it over smaller blocks, with the same result)."""
    if inputs.k != 2:
        raise ConfigError(f"nuslerp: tensor {inputs.name!r}: needs exactly two models besides the base, got {inputs.k}")
    return run_in_memory(NuSlerpMerge(TensorMeta.of(inputs)), inputs)


class _ColumnSums:
    """Σ over the rows of ``(rows, cols)`` of x₀², x₀x₁, x₁² per column, in float64: rows summed in fixed groups
    of ``group`` rows (aligned to row 0) by pairwise halving, the groups' sums added in order; a group cut by a
    block boundary is carried until whole. The same bits whatever the blocks."""

    def __init__(self, rows: int, cols: int, device: torch.device) -> None:
        self.rows, self.cols = rows, cols
        self.group = max(1, GRID // max(1, cols))
        self.sums = torch.zeros((3, cols), dtype=torch.float64, device=device)
        self._carry: torch.Tensor | None = None  # (2, group, cols) float32
        self._carry_len = 0

    def _add(self, pair: torch.Tensor) -> None:
        x = _pair_sums(pair[0], pair[1])  # (3, m, cols)
        self.sums += fixed_row_sum(x.movedim(1, -1))  # (3, cols): the group's rows by pairwise halving

    def feed(self, pair: torch.Tensor, row0: int) -> None:
        """Rows ``[row0, row0 + r)`` of both vectors, ``(2, r, cols)`` float32 (in order after the last)."""
        r = int(pair.shape[1])
        pos = 0
        while pos < r:
            g = row0 + pos
            start = g - g % self.group
            end = min(start + self.group, self.rows)
            take = min(r - pos, end - g)
            part = pair[:, pos : pos + take]
            if g == start and take == end - start:
                self._add(part)
            else:
                if self._carry is None:
                    self._carry = torch.empty((2, self.group, self.cols), dtype=torch.float32, device=pair.device)
                assert self._carry_len == g - start, "rows out of order"
                self._carry[:, self._carry_len : self._carry_len + take] = part
                self._carry_len += take
                if start + self._carry_len == end:
                    self._add(self._carry[:, : self._carry_len])
                    self._carry_len = 0
            pos += take


class NuSlerpMerge(BlockedMerge):
    """NuSLERP over row blocks, by how the vectors lie in the tensor:

    - one vector per tensor (``nuslerp_flatten``, and any 1-D tensor): a statistics pass sums ‖τ₀‖², ⟨τ₀, τ₁⟩,
      ‖τ₁‖² over the fixed grid (float64, :func:`~mergescale.methods.blocked.gram_sum`; it leaves the task vectors
      τᵢ = θᵢ − θ_base in place when the tensor is one block), then the apply pass writes c₀τ₀ + c₁τ₁ + θ_base;
    - one per row along the last dimension: whole in every block, so the apply pass alone does it, each vector's
      sums by pairwise halving (:func:`~mergescale.methods.model_stock.fixed_row_sum`);
    - one per column (``nuslerp_row_wise``: along dim 0, across the blocks): a statistics pass sums per column
      over fixed groups of rows (:class:`_ColumnSums`, 3 float64 per column kept), then the apply pass.
    """

    def __init__(self, meta: TensorMeta) -> None:
        w0, w1 = (float(p["weight"]) for p in meta.model_params)
        self.t = interpolation_factor(w0, w1)
        shape = meta.shape
        self.row_numel = meta.row_numel
        if bool(meta.params.get("nuslerp_flatten", True)) or len(shape) <= 1:
            self.mode = "flat"
            self.sums = GridSum(meta.numel, gram_sum, width=3)
            # both task vectors' grid chunk in float32 (carry, piece) and in float64 (gram_sum's copy, products)
            self.state_bytes = 2 * min(GRID, meta.numel) * (4 + 4 + 8 + 8)
        elif bool(meta.params.get("nuslerp_row_wise", False)):
            self.mode = "cols"
            self.columns = _ColumnSums(meta.rows, self.row_numel, meta.device)
            # the sums, the carried rows of a group (float32) and a group's products with their halving (float64)
            self.state_bytes = 3 * 8 * self.row_numel + 2 * min(GRID, meta.numel) * (4 + 3 * 8 * 2)
        else:
            self.mode = "rows"
            self.cols = int(shape[-1])
            # a piece's float64 products (3) and the halving's first half
            self.state_bytes = min(_PIECE, meta.numel) * (3 * 8 + 3 * 4) * 2
        self.has_statistics = self.mode != "rows"
        self.coefficients: tuple[float, float] | None = None
        self.column_coefficients: tuple[torch.Tensor, torch.Tensor] | None = None

    def statistics(self, block: Block) -> None:
        n = block.numel
        if self.mode == "flat":
            scratch = None if block.materialized else torch.empty((2, min(GRID, n)), device=block.device)
            for pos, end in grid_pieces(block):
                self.sums.feed(block.task_vectors(pos, end, scratch), block.offset + pos)
            return
        rows = block.stop - block.start
        step = max(1, self.columns.group)
        scratch = None if block.materialized else torch.empty((2, min(step, rows) * self.row_numel), device=block.device)
        for r in range(0, rows, step):
            e = min(rows, r + step)
            tau = block.task_vectors(r * self.row_numel, e * self.row_numel, scratch)
            self.columns.feed(tau.view(2, e - r, self.row_numel), block.start + r)

    def end_pass(self) -> bool:
        if self.mode == "flat":
            self.coefficients = nuslerp_coefficients(self.t, *self.sums.values)
        else:
            self.column_coefficients = nuslerp_coefficient_tensors(self.t, self.columns.sums)
        return False

    def _step(self, block: Block) -> int:
        width = self.row_numel if self.mode == "cols" else self.cols if self.mode == "rows" else 1
        if block.device.type != "cpu":
            return block.numel
        return max(width, _PIECE // width * width)  # whole vectors (rows) per piece

    def apply(self, block: Block) -> torch.Tensor:
        n = block.numel
        base = block.flat_base() if block.base is not None else None  # (n,) overwritten by the result
        if base is not None:
            out = base
        elif block.materialized:
            out = block.tensors[0].view(-1)  # type: ignore[index]  # τ₀'s own entries, read before written
        else:
            out = torch.empty(n, device=block.device)
        step = self._step(block)
        ranges = step_ranges(n, step, block.workers)

        def part(j: int) -> None:  # whole vectors per piece, entry by entry: any ranges give the same result
            lo, hi = ranges[j]
            width = min(step, hi - lo)
            scratch = None if block.materialized else torch.empty((2, width), device=block.device)
            tmp = torch.empty(width, device=block.device)
            for s in range(lo, hi, step):
                e = min(hi, s + step)
                tau = block.task_vectors(s, e, scratch)  # (2, c)
                if self.mode == "flat":
                    assert self.coefficients is not None, "statistics pass first"
                    c0, c1 = self.coefficients
                    v0, v1, t1, o = tau[0], tau[1], tmp[: e - s], out[s:e]
                else:
                    w = self.cols if self.mode == "rows" else self.row_numel
                    m = (e - s) // w
                    v0, v1 = tau[0].view(m, w), tau[1].view(m, w)
                    t1, o = tmp[: e - s].view(m, w), out[s:e].view(m, w)
                    if self.mode == "rows":
                        sums = fixed_row_sum(_pair_sums(v0, v1))  # (3, m)
                        a, b = nuslerp_coefficient_tensors(self.t, sums)
                        c0, c1 = a[:, None], b[:, None]  # type: ignore[assignment]
                    else:
                        assert self.column_coefficients is not None, "statistics pass first"
                        c0, c1 = self.column_coefficients  # type: ignore[assignment]
                torch.mul(v1, c1, out=t1)  # c₁τ₁
                if base is not None:
                    o.add_(v0.mul_(c0).add_(t1))  # θ_base + (c₀τ₀ + c₁τ₁), τ₀'s scratch (or rows) scaled in place
                else:
                    torch.mul(v0, c0, out=o).add_(t1)  # o may be τ₀ itself: elementwise, read before written

        block.run(part, len(ranges))
        if base is not None:
            return block.base  # type: ignore[return-value]
        return out


def blocked_nuslerp(meta: TensorMeta) -> NuSlerpMerge | None:
    return NuSlerpMerge(meta) if meta.k == 2 else None


METHOD = MergeMethod(
    name="nuslerp",
    fn=nuslerp,
    blocked=blocked_nuslerp,
    base="optional",
    model_params=(ParamSpec("weight", float, doc="the model's weight; t = w₁ / (w₀ + w₁)"),),
    global_params=(
        ParamSpec("nuslerp_flatten", bool, True, doc="one vector per tensor (false: one per row)"),
        ParamSpec("nuslerp_row_wise", bool, False, doc="without flatten: columns instead of rows"),
    ),
    min_models=2,
    max_models=2,
    doc=__doc__ or "",
)
