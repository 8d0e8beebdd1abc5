"""RAM and RAM+ (tensor-local): task vectors kept where one model alone changed an entry, averaged where several did.

With τᵢ = θᵢ − θ_base, nᵢ = [|τᵢ| > ε] (the entries model i changed) and c = Σᵢ nᵢ (how many models changed
each entry):

    RAM:   θ = θ_base + Σᵢ τᵢnᵢ·([c = 1] + [c > 1]/c)

RAM+ (``ramplus_tl``) also boosts each model's unique entries by how much it overlaps with the others, per
tensor: ρᵢ = #(nᵢ ∧ [c > 1]) / max(#(nᵢ ∧ [c = 1]), ε), λᵢ = 1 + r·clamp(ρᵢ, 0, α), and

    RAM+:  θ = θ_base + Σᵢ τᵢnᵢ·(λᵢ[c = 1] + [c > 1]/c)

"Reinforced Agent Merging", https://arxiv.org/abs/2601.13572 (as implemented in mergekit 0.1.5,
``merge_methods/ram.py``, whose semantics are matched here: base required; ``epsilon`` (10⁻⁵), and for RAM+
``r`` (0.1) and ``alpha`` (0.2), global; no per-model parameters).
"""

from __future__ import annotations

from functools import partial

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec


def ram(inputs: MethodInputs, *, plus: bool = False) -> torch.Tensor:
    """RAM (or RAM+ with ``plus``) for one tensor, in float32."""
    name = "ramplus_tl" if plus else "ram"
    if inputs.base is None:
        raise ConfigError(f"{name}: tensor {inputs.name!r}: needs base_model")
    base = inputs.base.to(torch.float32)
    if inputs.k == 0:
        return base
    eps = float(inputs.params.get("epsilon", 1e-5))
    tau = inputs.tensors.to(torch.float32).reshape(inputs.k, -1)  # (k, n) engine-owned
    tau.sub_(base.reshape(-1))
    changed = tau.abs() > eps  # (k, n) nᵢ
    counts = changed.sum(dim=0, keepdim=True)  # (1, n) c
    overlap = counts > 1
    unique = counts == 1
    tau.mul_(changed)
    shared_part = tau * overlap / counts.clamp(min=1)  # (k, n)
    if plus:
        shared_n = (changed & overlap).sum(dim=1)  # (k,)
        unique_n = (changed & unique).sum(dim=1)  # (k,)
        rho = shared_n / unique_n.clamp(min=eps)
        lam = 1 + float(inputs.params.get("r", 0.1)) * rho.clamp(min=0, max=float(inputs.params.get("alpha", 0.2)))
        unique_part = tau * unique * lam.unsqueeze(-1)
    else:
        unique_part = tau * unique
    merged = (unique_part + shared_part).sum(dim=0)  # (n,)
    return base.add_(merged.view(base.shape))


_EPS = ParamSpec("epsilon", float, 1e-5, low=0.0, doc="|τ| above which an entry counts as changed")
METHODS = (
    MergeMethod(
        name="ram",
        fn=ram,
        base="required",
        global_params=(_EPS,),
        min_models=1,
        reference="https://arxiv.org/abs/2601.13572",
        doc=__doc__ or "",
    ),
    MergeMethod(
        name="ramplus_tl",
        fn=partial(ram, plus=True),
        base="required",
        global_params=(
            ParamSpec("r", float, 0.1, doc="strength of the boost of unique entries"),
            ParamSpec("alpha", float, 0.2, doc="cap on the overlap ratio ρ"),
            _EPS,
        ),
        min_models=1,
        reference="https://arxiv.org/abs/2601.13572",
        doc=__doc__ or "",
    ),
)
