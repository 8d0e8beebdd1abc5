"""SLERP: spherical linear interpolation between the base model and one other model.

With v₀ = θ_base and v₁ = θ_other (each tensor flattened to one vector), cos Ω = ⟨v₀/‖v₀‖, v₁/‖v₁‖⟩:

    θ = sin((1 − t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁          when |cos Ω| ≤ 0.9995
    θ = (1 − t)·v₀ + t·v₁                                     otherwise ((anti)parallel: plain lerp)

Shoemake 1985, "Animating rotation with quaternion curves", https://doi.org/10.1145/325165.325242 (mergekit
cites https://en.wikipedia.org/wiki/Slerp).

mergekit 0.1.5 semantics (``merge_methods/slerp.py``), matched here: exactly two inputs, one of them the base:
either ``base_model`` listed under ``models`` next to one other model, or ``base_model`` plus one model (mergekit
then appends the base). ``t`` is a required global parameter (usually a gradient over layers), not bounded
(values outside [0, 1] extrapolate). The interpolation uses the raw tensors; only the angle uses normalised
ones. A norm ≤ 1e-8 is replaced by 1, so a zero tensor has cos Ω = 0 and gets sin(tπ/2)·v₁ (not a lerp), as
in mergekit.

The angle's sums ‖v₀‖², ⟨v₀, v₁⟩, ‖v₁‖² are taken in float64 over a fixed grid of the flattened tensor
(:class:`~mergescale.methods.blocked.GridSum`), so the engine can run the merge over row blocks of a large
tensor (a statistics pass, then the apply pass) with the whole-tensor result bit for bit.
"""

from __future__ import annotations

import math

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
)

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
_PIECE = 1 << 16  # entries per piece of the apply pass on the CPU: the rows of both inputs stay in cache


def slerp_coefficients_from_sums(t: float, s00: float, s01: float, s11: float) -> tuple[float, float]:
    """(c₀, c₁) with slerp(t, v₀, v₁) = c₀v₀ + c₁v₁, from ‖v₀‖², ⟨v₀, v₁⟩ and ‖v₁‖²."""
    n0 = math.sqrt(max(s00, 0.0))
    n1 = math.sqrt(max(s11, 0.0))
    n0 = n0 if n0 > NORM_EPS else 1.0
    n1 = n1 if n1 > NORM_EPS else 1.0
    dot = min(1.0, max(-1.0, s01 / (n0 * n1)))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float]:
    """(c₀, c₁) with slerp(t, v₀, v₁) = c₀v₀ + c₁v₁, for flat float32 vectors (sums over the fixed grid)."""
    sums = GridSum(v0.numel(), gram_sum, width=3)
    sums.feed(torch.stack([v0, v1]), 0)
    return slerp_coefficients_from_sums(t, *sums.values)


def slerp(inputs: MethodInputs) -> torch.Tensor:
    """slerp(t, θ_base, θ_other) for one tensor, in float32: :class:`SlerpMerge` on the whole tensor as one
    block (the engine may run it over smaller blocks, with the same result)."""
    if inputs.base is None or inputs.k != 1:
        raise ConfigError(
            f"slerp: tensor {inputs.name!r}: needs base_model and exactly one other model, got {inputs.k}"
        )
    return run_in_memory(SlerpMerge(TensorMeta.of(inputs)), inputs)


class SlerpMerge(BlockedMerge):
    """SLERP over row blocks: a statistics pass sums ‖v₀‖², ⟨v₀, v₁⟩ and ‖v₁‖² over the fixed grid (float64,
    :func:`~mergescale.methods.blocked.gram_sum`), so the angle is the same whatever the blocks; the apply pass
    writes c₁v₁ + c₀v₀ over the base's rows, entry by entry."""

    has_statistics = True

    def __init__(self, meta: TensorMeta) -> None:
        self.t = float(meta.params["t"])
        self.sums = GridSum(meta.numel, gram_sum, width=3)
        self.coefficients: tuple[float, float] | None = None
        # both inputs' grid chunk in float32 (carry, piece) and in float64 (gram_sum's copy, its products)
        self.state_bytes = 2 * GRID * (4 + 4 + 8 + 8)

    def statistics(self, block: Block) -> None:
        v0 = block.flat_base()  # (n,) θ_base rows
        n = v0.numel()
        pair = torch.empty((2, min(GRID, n)), dtype=torch.float32, device=block.device)  # (2, c) [v₀; v₁]
        for pos, end in grid_pieces(block):
            both = pair[:, : end - pos]
            both[0].copy_(v0[pos:end])
            v1 = block.piece(0, pos, end, both[1])  # converted into place, or a view of a materialized block
            if v1.data_ptr() != both[1].data_ptr():
                both[1].copy_(v1)
            self.sums.feed(both, block.offset + pos)

    def end_pass(self) -> bool:
        self.coefficients = slerp_coefficients_from_sums(self.t, *self.sums.values)
        return False

    def apply(self, block: Block) -> torch.Tensor:
        assert self.coefficients is not None, "statistics pass first"
        c0, c1 = self.coefficients
        v0 = block.flat_base()  # (n,) overwritten by the result
        n = v0.numel()
        step = n if block.device.type != "cpu" or block.materialized else _PIECE
        scratch = None if block.materialized else torch.empty(min(step, n), device=block.device)
        for s in range(0, n, step):
            e = min(n, s + step)
            v1 = block.piece(0, s, e, scratch)  # (c,) a view of a materialized block, else converted
            # c₁v₁ + c₀v₀ in the order of the whole-tensor code (v₁ scaled, v₀ added with alpha)
            torch.add(v1.mul_(c1), v0[s:e], alpha=c0, out=v0[s:e])
        return block.base  # type: ignore[return-value]


def blocked_slerp(meta: TensorMeta) -> SlerpMerge | None:
    return SlerpMerge(meta) if meta.has_base and meta.k == 1 else None


METHOD = MergeMethod(
    name="slerp",
    fn=slerp,
    blocked=blocked_slerp,
    base="required",
    global_params=(ParamSpec("t", float, doc="interpolation factor: 0 gives the base, 1 the other model"),),
    min_models=1,
    max_models=1,
    reference="https://en.wikipedia.org/wiki/Slerp",
    doc=__doc__ or "",
)
