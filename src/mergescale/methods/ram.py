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

# Columns per chunk: k rows of float32 and a few temporaries stay in cache.
_CHUNK_BYTES = 8 << 20


def ram(inputs: MethodInputs, *, plus: bool = False) -> torch.Tensor:
    """RAM (or RAM+ with ``plus``) for one tensor, in float32, chunk by chunk of columns (written over the
    engine-owned base); RAM+'s per-model counts take one counting sweep first."""
    name = "ramplus_tl" if plus else "ram"
    if inputs.base is None:
        raise ConfigError(f"{name}: tensor {inputs.name!r}: needs base_model")
    shape = inputs.base.shape
    base = inputs.base.to(torch.float32).reshape(-1)  # (n,)
    if inputs.k == 0:
        return base.view(shape)
    k = inputs.k
    eps = float(inputs.params.get("epsilon", 1e-5))
    tau = inputs.tensors.to(torch.float32).reshape(k, -1)  # (k, n) engine-owned
    n = base.numel()
    step = n if tau.device.type != "cpu" else max(1 << 14, _CHUNK_BYTES // (4 * (k + 4)))
    lam = None
    if plus:
        shared_n = torch.zeros(k, dtype=torch.int64, device=tau.device)
        unique_n = torch.zeros(k, dtype=torch.int64, device=tau.device)
        for s in range(0, n, step):
            t = tau[:, s : s + step].sub_(base[s : s + step])  # τ, in place (the second sweep skips this)
            changed = t.abs() > eps  # (k, c)
            counts = changed.sum(dim=0, keepdim=True)  # (1, c)
            shared_n += (changed & (counts > 1)).sum(dim=1)
            unique_n += (changed & (counts == 1)).sum(dim=1)
        rho = shared_n / unique_n.clamp(min=eps)
        r, alpha = float(inputs.params.get("r", 0.1)), float(inputs.params.get("alpha", 0.2))
        lam = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)  # (k, 1)
    for s in range(0, n, step):
        t = tau[:, s : s + step]  # (k, c)
        if not plus:
            t.sub_(base[s : s + step])
        changed = t.abs() > eps  # (k, c) nᵢ
        counts = changed.sum(dim=0, keepdim=True)  # (1, c)
        overlap, unique = counts > 1, counts == 1
        t.mul_(changed)
        shared = t * overlap / counts.clamp(min=1)
        own = t * unique if lam is None else t * unique * lam
        base[s : s + step].add_((own + shared).sum(dim=0))
    return base.view(shape)


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
