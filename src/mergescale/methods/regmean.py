"""RegMean: merge each linear layer so its outputs best match every model's outputs on that model's inputs.

For a linear layer y = W·x (W of shape (out, in)) and model i's calibration inputs Xᵢ (one row per token), with
Gᵢ = XᵢᵀXᵢ its (in, in) Gram matrix (see :mod:`mergescale.calibration`), RegMean solves
min_W Σᵢ ‖XᵢWᵀ − XᵢWᵢᵀ‖², whose solution is

    G̃ᵢ = α·Gᵢ + (1 − α)·diag(Gᵢ)              (off-diagonal entries scaled by α, the paper's regulariser)
    W  = (Σᵢ WᵢG̃ᵢ)·(Σᵢ G̃ᵢ)⁻¹

computed in float64 as the linear solve (Σᵢ G̃ᵢ)·Wᵀ = Σᵢ G̃ᵢWᵢᵀ. Every other tensor (embeddings, norms,
biases) is the plain average of the models. Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of
Language Models", https://arxiv.org/abs/2212.09849.

Parameters: ``alpha`` (0.9) global; no per-model parameters. The base model is not used. A singular Σ G̃ᵢ (an
input feature no example ever activated) gets a ridge of 10⁻⁸·mean(diag) before solving.
"""

from __future__ import annotations

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec

RIDGE = 1e-8


def regmean_solve(weights: torch.Tensor, grams: torch.Tensor, alpha: float) -> torch.Tensor:
    """W = (Σ WᵢG̃ᵢ)(Σ G̃ᵢ)⁻¹ for a (k, out, in) stack of weights and a (k, in, in) stack of Gram matrices."""
    g = grams.to(torch.float64)
    diag = torch.diagonal(g, dim1=1, dim2=2)  # (k, in)
    g = g * alpha + torch.diag_embed(diag * (1 - alpha))  # (k, in, in) G̃ᵢ
    lhs = g.sum(dim=0)  # (in, in)
    rhs = torch.einsum("kij,koj->io", g, weights.to(torch.float64))  # (in, out) Σ G̃ᵢWᵢᵀ
    try:
        solution = torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # torch.linalg.LinAlgError: singular
        ridge = RIDGE * float(torch.diagonal(lhs).mean().abs()) or RIDGE
        solution = torch.linalg.solve(lhs + ridge * torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device), rhs)
    return solution.T.to(torch.float32).contiguous()  # (out, in)


def regmean(inputs: MethodInputs) -> torch.Tensor:
    """RegMean for one tensor, in float32."""
    grams = inputs.statistics.get("gram")
    thetas = inputs.tensors.to(torch.float32)
    if grams is None:
        return thetas.mean(dim=0)
    if thetas.dim() != 3 or grams.shape != (inputs.k, thetas.shape[-1], thetas.shape[-1]):
        raise ConfigError(
            f"regmean: tensor {inputs.name!r}: Gram matrices of shape {tuple(grams.shape[1:])} do not fit a weight "
            f"of shape {tuple(thetas.shape[1:])}"
        )
    return regmean_solve(thetas, grams, float(inputs.params.get("alpha", 0.9)))


METHOD = MergeMethod(
    name="regmean",
    fn=regmean,
    base="unused",
    global_params=(ParamSpec("alpha", float, 0.9, low=0.0, high=1.0, doc="scale of the Gram matrices' off-diagonals"),),
    min_models=1,
    statistics=("gram",),
    reference="https://arxiv.org/abs/2212.09849",
    doc=__doc__ or "",
)
