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
=================  ===============================  ======================================================
"""

from __future__ import annotations

from mergescale.methods import linear, model_stock, slerp, task_arithmetic
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec
from mergescale.registry import Registry

METHODS: Registry[MergeMethod] = Registry("merge method")

for _method in (linear.METHOD, *task_arithmetic.METHODS, slerp.METHOD, model_stock.METHOD):
    METHODS.register(_method.name, _method)
del _method


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; :class:`~mergescale.errors.ConfigError` listing the names if none."""
    return METHODS.get(name)


__all__ = ["METHODS", "MergeMethod", "MethodInputs", "ParamSpec", "get_method"]
