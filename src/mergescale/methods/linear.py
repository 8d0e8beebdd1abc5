"""Linear merge: a weighted average of the models.

    θ = Σᵢ wᵢ θᵢ / Σᵢ wᵢ        (``normalize: true``, the default)
    θ = Σᵢ wᵢ θᵢ                (``normalize: false``)

Model soups, Wortsman et al. 2022, https://arxiv.org/abs/2203.05482.

mergekit 0.1.5 semantics (``merge_methods/linear.py``), matched here:

- ``weight`` is a per-model parameter with no default (required); ``normalize`` is global, default true.
- The base model is not special: linear merges every input it is given, the base included. When the config
  lists ``base_model`` under ``models``, that entry is averaged like any other with its own ``weight`` (the
  engine passes it as ``MethodInputs.base`` with ``base_params``). When ``base_model`` is set but not listed,
  mergekit still appends it as an input whose parameters come from the top-level ``parameters`` only (an error
  there when no top-level ``weight`` exists); here the base takes part exactly when ``base_params`` is given.
- Weights summing to zero with ``normalize`` divide by zero in mergekit (NaN/Inf weights); here they raise
  :class:`~mergescale.errors.ConfigError` naming the tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec, ParamValue

ZERO_SUM = 1e-8  # |Σ w| below this counts as zero (mergekit's task-arithmetic threshold)


def _base_weight(base_params: dict[str, ParamValue] | None, where: str) -> float | None:
    if base_params is None:
        return None
    if base_params.get("weight") is None:
        raise ConfigError(
            f"{where}: linear merges the base model like any other input and needs its 'weight' "
            "(set it on the base's models entry or in the top-level parameters)"
        )
    return float(base_params["weight"])


def coefficients(
    model_params: Sequence[dict[str, ParamValue]],
    params: dict[str, ParamValue],
    base_params: dict[str, ParamValue] | None,
    *,
    name: str = "<tensor>",
) -> tuple[list[float], float]:
    """θ = Σ cᵢθᵢ + c_base·θ_base: cᵢ = wᵢ/Σw (or wᵢ), c_base = w_base/Σw when the base takes part, else 0."""
    where = f"linear: tensor {name!r}"
    weights = [float(p["weight"]) for p in model_params]
    w_base = _base_weight(base_params, where)
    total = sum(weights) + (w_base or 0.0)
    divisor = 1.0
    if params.get("normalize", True):
        if abs(total) < ZERO_SUM:
            raise ConfigError(f"{where}: weights sum to {total:g} with normalize: true; cannot divide by it")
        divisor = total
    return [w / divisor for w in weights], (w_base or 0.0) / divisor


def linear(inputs: MethodInputs) -> torch.Tensor:
    """Σ wᵢθᵢ / Σ wᵢ over the models (and the base when ``base_params`` is given), in float32."""
    coefs, c_base = coefficients(inputs.model_params, inputs.params, inputs.base_params, name=inputs.name)
    stack = inputs.tensors.to(torch.float32).reshape(inputs.k, -1)  # (k, n)
    c = torch.tensor(coefs, dtype=torch.float32, device=stack.device)  # (k,)
    out = torch.mv(stack.T, c)  # (n,) Σ cᵢθᵢ
    if inputs.base_params is not None and inputs.base is not None:
        out.add_(inputs.base.to(torch.float32).reshape(-1), alpha=c_base)
    return out.view(inputs.tensors.shape[1:])


METHOD = MergeMethod(
    name="linear",
    fn=linear,
    base="optional",
    model_params=(ParamSpec("weight", float, doc="the model's weight wᵢ (required)"),),
    global_params=(ParamSpec("normalize", bool, True, doc="divide by Σ wᵢ"),),
    min_models=1,
    reference="https://arxiv.org/abs/2203.05482",
    linear_coefficients=coefficients,
    merges_base=True,
    doc=__doc__ or "",
)
