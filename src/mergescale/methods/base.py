"""The contract between the engine and the merge methods.

A merge method is a pure function ``MethodInputs -> torch.Tensor`` plus a description of the parameters it
accepts (:class:`ParamSpec`), so configs can be validated before any tensor is read. Methods never open a file,
never read YAML and never mutate their inputs' meaning for the caller (in-place work on ``inputs.tensors`` is
allowed: the engine hands each method a buffer it owns, see :attr:`MethodInputs.tensors`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

ParamValue = float | int | bool


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method, as it may appear in a mergekit-style config.

    ``default=None`` means required. ``low``/``high`` bound numeric values; ``low_open``/``high_open`` make a
    bound exclusive, e.g. density in (0, 1] is ``low=0, low_open=True, high=1``.
    """

    name: str
    kind: type = float
    default: ParamValue | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is None

    def check(self, value: object) -> str | None:
        """Return a reason why ``value`` is not acceptable, or None when it is."""
        if self.kind is bool:
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number, got {value!r}"
        v = float(value)
        if v != v or v in (float("inf"), float("-inf")):
            return f"must be finite, got {value!r}"
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return f"must be {'>' if self.low_open else '>='} {self.low:g}, got {value!r}"
        if self.high is not None and (v > self.high or (self.high_open and v == self.high)):
            return f"must be {'<' if self.high_open else '<='} {self.high:g}, got {value!r}"
        return None


def tensor_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """A 63-bit seed that depends on (seed, tensor name, model index) alone.

    Independent of the order tensors are processed in, of threads and of the device, so randomised methods
    (DARE) give the same masks however the merge is scheduled.
    """
    digest = hashlib.sha256(f"{seed}\x00{tensor_name}\x00{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class MethodInputs:
    """Everything a method sees for one output tensor.

    Attributes:
        name: the tensor's name, e.g. ``model.layers.0.self_attn.q_proj.weight``.
        tensors: ``(k, *shape)`` float32 stack of the k merged models' tensors, in config order, on ``device``.
            The base model is not in it, even when the config lists it under ``models``. The engine owns this
            buffer and never reuses its contents after the call, so a method may modify it in place.
        base: ``(*shape)`` float32 tensor of the base model, or None when the config has no ``base_model``.
            Engine-owned too (a private copy per output), so a method may modify it in place or return it as
            its result: writing the result into it saves a tensor-sized buffer on the largest tensors.
        model_params: one dict per entry of ``tensors``: that model's parameters resolved for this tensor
            (filters and gradients applied, defaults filled in).
        params: the method's global parameters resolved for this tensor, defaults filled in.
        base_params: the parameters of the base model's own entry when the config lists the base under
            ``models`` (mergekit allows it), else None.
        seed: the merge's seed; use :meth:`generator` for random draws.
        statistics: data-aware methods only: per kind of statistic (``fisher``, ``gram``), a ``(k, ...)`` float32
            stack of each model's statistic for this tensor, in the order of ``tensors``; absent for tensors
            without one (RegMean's Gram matrices exist for linear-layer weights only).
    """

    name: str
    tensors: torch.Tensor
    base: torch.Tensor | None
    model_params: Sequence[dict[str, ParamValue]]
    params: dict[str, ParamValue]
    base_params: dict[str, ParamValue] | None = None
    seed: int = 0
    statistics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.tensors.device

    @property
    def k(self) -> int:
        return int(self.tensors.shape[0])

    def generator(self, model_index: int) -> torch.Generator:
        """A CPU generator seeded from (seed, tensor name, model index) only."""
        g = torch.Generator(device="cpu")
        g.manual_seed(tensor_seed(self.seed, self.name, model_index))
        return g


@dataclass(frozen=True)
class TensorMeta:
    """What a method knows of one output tensor before any data: the tensor, the number of models and the
    parameters. The plan checks parameters on it (:attr:`MergeMethod.check_params`) before the first read;
    blocked methods (:mod:`.blocked`) plan their passes from it.

    ``k`` does not count the base unless the method merges it as an input; ``statistics`` are the kinds of
    statistics the tensor has (data-aware methods).
    """

    name: str
    shape: tuple[int, ...]
    k: int
    has_base: bool
    model_params: Sequence[dict[str, ParamValue]]
    params: dict[str, ParamValue]
    base_params: dict[str, ParamValue] | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    statistics: frozenset[str] = frozenset()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Rows of dim 0 (a 0-dim tensor is one row)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    def generator(self, model_index: int) -> torch.Generator:
        """The CPU generator :meth:`MethodInputs.generator` gives (seeded from seed, name and model only)."""
        g = torch.Generator(device="cpu")
        g.manual_seed(tensor_seed(self.seed, self.name, model_index))
        return g

    @classmethod
    def of(cls, inputs: MethodInputs) -> TensorMeta:
        shape = tuple(inputs.base.shape) if inputs.base is not None else tuple(inputs.tensors.shape[1:])
        return cls(inputs.name, shape, inputs.k, inputs.base is not None, inputs.model_params, inputs.params,
                   inputs.base_params, inputs.seed, inputs.device, frozenset(inputs.statistics))  # fmt: skip


MethodFn = Callable[[MethodInputs], torch.Tensor]
ParamsCheckFn = Callable[[TensorMeta], None]
"""Raises :class:`~mergescale.errors.ConfigError` (naming the method and tensor) for parameters the method
cannot use on this tensor; returns None otherwise."""
LinearCoefficientsFn = Callable[..., tuple[list[float], float]]
"""``(model_params, params, base_params, *, name)`` -> (coefficient of each model, coefficient of the base);
``name`` is the tensor's, for error messages."""


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: the pure function and what it accepts.

    Attributes:
        name: the ``merge_method`` value in configs.
        fn: the pure function; returns a float32 tensor of the merged shape.
        base: whether ``base_model`` is required, optional or ignored.
        model_params: per-model parameters (under each ``models[i].parameters``).
        global_params: top-level ``parameters``.
        min_models / max_models: how many non-base models the method takes.
        randomized: draws random masks (uses ``seed``).
        reference: the paper (URL) the method comes from.
        linear_coefficients: for methods whose output is a fixed linear combination Σ cᵢθᵢ + c_base·θ_base
            of the inputs (given the parameters), the function giving those coefficients; the engine then
            accumulates input by input instead of stacking all k tensors. Must agree with ``fn``.
        merges_base: the base model has no role of its own (mergekit's "ignored" base policy): when a config
            names a ``base_model``, it is merged as one more input, with its own parameters (linear, karcher,
            passthrough). ``min_models``/``max_models`` then count it.
        statistics: kinds of per-model statistics the method reads beside the weights (``fisher``, ``gram``);
            they come from a calibration run (:mod:`mergescale.calibration`) and reach the method as
            :attr:`MethodInputs.statistics`.
        check_params: the checks of parameter combinations that single-parameter bounds (:class:`ParamSpec`)
            cannot express (DELLA's density ± epsilon, a weight sum to divide by); the plan runs it on every
            tensor before the first read, so a bad combination never fails halfway through a merge. Methods
            with ``linear_coefficients`` are checked by computing them.
        blocked: for methods that can run over row blocks of a tensor (:mod:`mergescale.methods.blocked`),
            ``blocked(meta)`` gives the tensor's blocked merge, or None where this configuration cannot block;
            the engine then merges large tensors within a memory budget instead of stacking every input. Must
            give ``fn``'s result bit for bit, whatever the blocks.
    """

    name: str
    fn: MethodFn
    base: Literal["required", "optional", "unused"]
    model_params: tuple[ParamSpec, ...] = ()
    global_params: tuple[ParamSpec, ...] = ()
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False
    reference: str = ""
    linear_coefficients: LinearCoefficientsFn | None = None
    merges_base: bool = False
    statistics: tuple[str, ...] = ()
    check_params: ParamsCheckFn | None = None
    blocked: Callable[..., Any] | None = field(default=None, compare=False)
    doc: str = field(default="", compare=False)

    def __call__(self, inputs: MethodInputs) -> torch.Tensor:
        return self.fn(inputs)

    def param_spec(self, name: str) -> ParamSpec | None:
        for spec in (*self.model_params, *self.global_params):
            if spec.name == name:
                return spec
        return None
