"""Fisher merging: a per-entry weighted average, each model weighted by its diagonal Fisher information.

With Fᵢ the diagonal Fisher of model i for this tensor (the mean over its calibration examples of the squared
gradient of the example's log-likelihood, see :mod:`mergescale.calibration`) and its weight wᵢ:

    F̃ᵢ = max(Fᵢ, f)                          (``fisher_floor`` f keeps entries no example touched finite)
    θ  = Σᵢ wᵢF̃ᵢθᵢ / Σᵢ wᵢF̃ᵢ                  (entry by entry)

A tensor without Fisher statistics is averaged with the weights alone. Matena & Raffel 2022, "Merging Models
with Fisher-Weighted Averaging", https://arxiv.org/abs/2111.09832 (the floor as in their implementation).

Parameters: ``weight`` per model (1.0); ``fisher_floor`` (10⁻⁶) global. The base model is not used.
"""

from __future__ import annotations

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec, TensorMeta


def fisher_merge(inputs: MethodInputs) -> torch.Tensor:
    """The Fisher-weighted average of one tensor, in float32."""
    k = inputs.k
    shape = inputs.tensors.shape[1:]
    weights = torch.tensor([float(p.get("weight", 1.0)) for p in inputs.model_params], dtype=torch.float32)
    weights = weights.to(inputs.device).view(k, *([1] * len(shape)))  # (k, 1, ...)
    thetas = inputs.tensors.to(torch.float32)  # (k, *shape) engine-owned
    fisher = inputs.statistics.get("fisher")
    if fisher is None:
        check_params(TensorMeta.of(inputs))  # Σw ≠ 0 (the plan checks it too, before anything is read)
        return (thetas * weights).sum(dim=0).div_(float(weights.sum()))
    if fisher.shape != inputs.tensors.shape:
        raise ConfigError(
            f"fisher: tensor {inputs.name!r}: Fisher statistics of shape {tuple(fisher.shape[1:])} for a tensor of "
            f"shape {tuple(shape)}"
        )
    scores = fisher.to(torch.float32).clamp(min=float(inputs.params.get("fisher_floor", 1e-6))).mul_(weights)
    return thetas.mul_(scores).sum(dim=0).div_(scores.sum(dim=0))


def check_params(tp: TensorMeta) -> None:
    """Without Fisher statistics (a tensor calibration did not cover) the merge is Σ wᵢθᵢ / Σ wᵢ: the weights
    must not sum to zero."""
    if "fisher" not in tp.statistics and sum(float(p.get("weight", 1.0)) for p in tp.model_params) == 0:
        raise ConfigError(f"fisher: tensor {tp.name!r}: model weights sum to 0")


METHOD = MergeMethod(
    name="fisher",
    fn=fisher_merge,
    base="unused",
    model_params=(ParamSpec("weight", float, 1.0, doc="the model's weight wᵢ"),),
    global_params=(ParamSpec("fisher_floor", float, 1e-6, low=0.0, low_open=True, doc="lower bound of Fisher values"),),
    min_models=1,
    statistics=("fisher",),
    check_params=check_params,
    reference="https://arxiv.org/abs/2111.09832",
    doc=__doc__ or "",
)
