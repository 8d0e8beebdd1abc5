"""What an end-to-end merge must equal: the registered method applied to the inputs' stacked tensors.

Imported by the end-to-end tests (tests/ is on the path): a whole merge goes through the config, the plan, the
streaming engine (chunks, folds, threads) and the sink; the reference here goes through none of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mergescale.io.checkpoint import iter_tensors, open_checkpoint
from mergescale.methods import get_method
from mergescale.methods.base import MethodInputs


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, as stored."""
    source = open_checkpoint(folder)
    try:
        return dict(iter_tensors(source))
    finally:
        source.close()


def method_on_stacks(
    method: str,
    models: Sequence[Path],
    base: Path | None = None,
    model_params: Sequence[Mapping[str, float]] | Mapping[str, float] | None = None,
    params: Mapping[str, float] | None = None,
    *,
    seed: int = 0,
    statistics: Mapping[str, Sequence[Mapping[str, torch.Tensor]]] | None = None,
) -> dict[str, torch.Tensor]:
    """For each tensor of the base (else of the first model): ``method``'s function on the float32 stack of the
    models' tensors, with the parameters as a config gives them (each model's own, then the top-level ones,
    then the method's defaults), cast back to the stored dtype.

    Args:
        model_params: one mapping per model, or one for all.
        statistics: per kind, one {tensor name: statistic} per model (data-aware methods).
    """
    fn = get_method(method)
    given = dict(params or {})
    per_model = [dict(model_params or {})] * len(models) if not isinstance(model_params, Sequence) else model_params
    model_names = {s.name for s in fn.model_params}
    model_defaults = {s.name: s.default for s in fn.model_params if s.default is not None}
    global_params = {
        **{s.name: s.default for s in fn.global_params if s.default is not None},
        **{k: v for k, v in given.items() if k not in model_names},
    }
    resolved = [{**model_defaults, **{k: v for k, v in given.items() if k in model_names}, **p} for p in per_model]
    weights = [tensors(m) for m in models]
    base_weights = tensors(base) if base is not None else None
    out = {}
    for name, ref in (base_weights or weights[0]).items():
        stats = {
            kind: torch.stack([s[name].float() for s in per_model_stats])
            for kind, per_model_stats in (statistics or {}).items()
            if all(name in s for s in per_model_stats)
        }
        merged = fn(
            MethodInputs(
                name=name,
                tensors=torch.stack([w[name].float() for w in weights]),  # (k, *shape)
                base=None if base_weights is None else base_weights[name].float().clone(),
                model_params=[dict(p) for p in resolved],
                params=dict(global_params),
                seed=seed,
                statistics=stats,
            )
        )
        out[name] = merged.to(ref.dtype)
    return out


def assert_merged(folder: Path, expected: Mapping[str, torch.Tensor], *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """The merged folder holds exactly the expected tensors, equal up to float32 summation order."""
    got = tensors(folder)
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, name
        torch.testing.assert_close(got[name], want, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
