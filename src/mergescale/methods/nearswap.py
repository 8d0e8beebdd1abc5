"""NearSwap: take the other model's value where it is close to the base, keep the base where it is far.

With a = θ_base, b = θ₁ (entry by entry) and threshold t:

    w = clamp(t / max(|a − b|, 10⁻⁶), 0, 1)
    θ = w·b + (1 − w)·a

Entries closer than t move all the way to b; farther ones move by t/|a − b| of the way (the move is at most t).
alchemonaut 2024, "QuartetAnemoi-70B-t0.0001", https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001.

mergekit 0.1.5 semantics (``merge_methods/nearswap.py``), matched here: base required plus exactly one other
model; ``t`` required (global; filters and gradients allowed).
"""

from __future__ import annotations

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec
from mergescale.methods.blocked import Block, BlockedMerge, TensorMeta, run_in_memory

MIN_DISTANCE = 1e-6


def nearswap(inputs: MethodInputs) -> torch.Tensor:
    """w·θ₁ + (1 − w)·θ_base with w = clamp(t / |θ_base − θ₁|, 0, 1), in float32."""
    if inputs.base is None or inputs.k != 1:
        raise ConfigError(f"nearswap: tensor {inputs.name!r}: needs base_model and exactly one other model")
    return run_in_memory(NearSwapMerge(TensorMeta.of(inputs)), inputs)


class NearSwapMerge(BlockedMerge):
    """Entry by entry: any block on its own (the engine may block it; the function is one block)."""

    def __init__(self, meta: TensorMeta) -> None:
        self.t = float(meta.params["t"])
        self.temporaries = 1.0  # w

    def apply(self, block: Block) -> torch.Tensor:
        a = block.base  # θ_base rows
        assert a is not None
        b = block.model(0).view(a.shape)  # engine-owned (or a converted copy): reused for the result
        w = torch.sub(a, b).abs_().clamp_(min=MIN_DISTANCE)  # |a − b|
        w = torch.div(self.t, w).clamp_(0.0, 1.0)  # (*shape) w
        # in mergekit's order of operations (w·b + (1 − w)·a), so the float32 roundings are the same
        return b.mul_(w).add_(w.neg_().add_(1.0).mul_(a))


def blocked_nearswap(meta: TensorMeta) -> NearSwapMerge | None:
    return NearSwapMerge(meta) if meta.has_base and meta.k == 1 else None


METHOD = MergeMethod(
    name="nearswap",
    fn=nearswap,
    blocked=blocked_nearswap,
    base="required",
    global_params=(ParamSpec("t", float, doc="distance below which the other model's value is taken"),),
    min_models=1,
    max_models=1,
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    doc=__doc__ or "",
)
