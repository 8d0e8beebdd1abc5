"""Merge methods: pure functions on tensors, registered by name.

Each method lives in its own module with its formula and paper in the docstring; variants of one algorithm are
presets of it (the task-arithmetic family in :mod:`.task_arithmetic`). Importing this package registers them all
in :data:`METHODS`.

=================  ===============================  ======================================================
method             module                           base model
=================  ===============================  ======================================================
linear             :mod:`.linear`                   optional; merged like any model when it has a weight
task_arithmetic,   :mod:`.task_arithmetic`          required; only θ_base (its own weight is ignored)
ties, dare_ties,
dare_linear,
breadcrumbs,
breadcrumbs_ties,
della, della_linear
slerp              :mod:`.slerp`                    required; plus exactly one other model
model_stock        :mod:`.model_stock`              required; plus at least two other models
nuslerp            :mod:`.nuslerp`                  optional (task vectors around it); two other models
multislerp         :mod:`.multislerp`               optional (the sphere's origin)
karcher            :mod:`.karcher`                  optional; merged like any model
sce                :mod:`.sce`                      required
nearswap           :mod:`.nearswap`                 required; plus exactly one other model
arcee_fusion       :mod:`.arcee_fusion`             required; plus exactly one other model
passthrough        :mod:`.passthrough`              optional; merged like any model (one input in all)
ram, ramplus_tl    :mod:`.ram`                      required
lore               :mod:`.lore`                     optional (the starting estimate of the shared base)
fisher             :mod:`.fisher`                   unused; reads each model's Fisher statistics
regmean            :mod:`.regmean`                  unused; reads each model's Gram matrices
=================  ===============================  ======================================================

fisher and regmean are data-aware: their statistics come from :mod:`mergescale.calibration` (which runs the
models); the methods themselves only see tensors.
"""

from __future__ import annotations

from mergescale.methods import (
    arcee_fusion,
    fisher,
    karcher,
    linear,
    lore,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    regmean,
    sce,
    slerp,
    task_arithmetic,
)
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec
from mergescale.registry import Registry

METHODS: Registry[MergeMethod] = Registry("merge method")

for _method in (
    linear.METHOD,
    *task_arithmetic.METHODS,
    slerp.METHOD,
    model_stock.METHOD,
    nuslerp.METHOD,
    multislerp.METHOD,
    karcher.METHOD,
    sce.METHOD,
    nearswap.METHOD,
    arcee_fusion.METHOD,
    passthrough.METHOD,
    *ram.METHODS,
    lore.METHOD,
    fisher.METHOD,
    regmean.METHOD,
):
    METHODS.register(_method.name, _method)
del _method


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; :class:`~mergescale.errors.ConfigError` listing the names if none."""
    return METHODS.get(name)


__all__ = ["METHODS", "MergeMethod", "MethodInputs", "ParamSpec", "get_method"]
