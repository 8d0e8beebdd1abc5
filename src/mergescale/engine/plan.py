"""What to compute: for each output tensor, which inputs, which method and which parameters.

A :class:`MergePlan` has several outputs (each a method over some of the sources, with its own sink) fed from one
set of sources, so one read of the inputs can produce several models: a PMA sweep, or all the merges of a study
that share experts. :func:`build_plan` checks everything that can be checked from headers alone (architectures,
tensor names, shapes) before a single weight is read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergescale.errors import ConfigError, InputModelError, TensorMismatchError
from mergescale.io.checkpoint import TensorInfo, TensorSource
from mergescale.io.writer import TensorSink
from mergescale.methods.base import MergeMethod, ParamValue

log = logging.getLogger(__name__)

Params = dict[str, ParamValue]
ParamsFor = Mapping[str, ParamValue] | Callable[[str], Params]
"""Parameters constant over tensors (a mapping) or resolved per tensor name (filters, gradients)."""


def resolve(params: ParamsFor | None, tensor_name: str) -> Params | None:
    if params is None:
        return None
    if callable(params):
        return params(tensor_name)
    return dict(params)


@dataclass
class OutputSpec:
    """One output model: a method applied to some of the plan's sources, written to ``sink``.

    Attributes:
        label: how errors and progress name this output.
        method: the merge method.
        models: indices (into the plan's sources) of the merged models, in config order, base excluded.
        base: index of the base model's source, or None.
        model_params: per model, its parameters (constant or per tensor).
        params: the method's global parameters (constant or per tensor).
        base_params: parameters of the base's own ``models`` entry when the config lists it there.
        dtype: output dtype; None keeps each tensor's input dtype.
        sink: where the merged tensors go.
        seed: seed of randomised methods.
    """

    label: str
    method: MergeMethod
    models: list[int]
    base: int | None
    model_params: list[ParamsFor]
    params: ParamsFor
    sink: TensorSink
    base_params: ParamsFor | None = None
    dtype: torch.dtype | None = None
    seed: int = 0

    @property
    def reference(self) -> int:
        """The source whose tensor names, config and (by default) dtype the output follows."""
        return self.base if self.base is not None else self.models[0]

    @property
    def sources(self) -> list[int]:
        used = list(dict.fromkeys(self.models))
        if self.base is not None and self.base not in used:
            used.append(self.base)
        return used


@dataclass(frozen=True)
class TensorJob:
    """One tensor name to produce: its shape and input dtype, and the sources to read for it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[int, ...]
    nbytes: int


@dataclass
class MergePlan:
    """Sources, outputs and the ordered list of tensors to stream."""

    sources: list[TensorSource]
    labels: list[str]
    outputs: list[OutputSpec]
    jobs: list[TensorJob] = field(default_factory=list)

    @property
    def bytes_to_read(self) -> int:
        return sum(job.nbytes for job in self.jobs)

    def output_dtype(self, output: OutputSpec, job: TensorJob) -> torch.dtype:
        if output.dtype is not None and job.dtype.is_floating_point:
            return output.dtype
        return job.dtype

    def layout(self, output: OutputSpec) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(job.name, job.shape, self.output_dtype(output, job)) for job in self.jobs]


def tied_embeddings(config: Mapping[str, Any] | None) -> bool:
    """Whether a config ties the output projection to the input embeddings (then lm_head is not written)."""
    if not config:
        return False
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    text = config.get("text_config")
    if isinstance(text, Mapping) and "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    # transformers omits keys equal to their default; GPT-2 style configs tie by default
    return config.get("model_type") in {"gpt2", "gpt_neo", "gptj", "opt", "bloom"}


TIED_HEADS = ("lm_head.weight",)


def _architecture(config: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    if not config:
        return None
    archs = config.get("architectures") or []
    return (str(config.get("model_type", "")), *map(str, archs))


def check_architectures(sources: Sequence[TensorSource], labels: Sequence[str], indices: Sequence[int]) -> None:
    """All sources of one output must be the same architecture (model_type and architectures)."""
    ref: tuple[int, tuple[str, ...]] | None = None
    for i in indices:
        arch = _architecture(sources[i].config)
        if arch is None:
            continue
        if ref is None:
            ref = (i, arch)
        elif arch != ref[1]:
            raise InputModelError(
                f"{labels[i]} is {'/'.join(filter(None, arch))} but {labels[ref[0]]} is "
                f"{'/'.join(filter(None, ref[1]))}; merged models must share one architecture"
            )


def build_plan(sources: Sequence[TensorSource], labels: Sequence[str], outputs: Sequence[OutputSpec]) -> MergePlan:
    """Check the inputs from their headers and list the tensors to stream.

    Raises :class:`InputModelError` for different architectures and :class:`TensorMismatchError` for a tensor
    missing from a model or with a different shape, naming the model and the tensor.
    """
    if not outputs:
        raise ConfigError("nothing to merge: no outputs")
    plan = MergePlan(list(sources), list(labels), list(outputs))
    infos: dict[int, dict[str, TensorInfo]] = {}

    def info(i: int) -> dict[str, TensorInfo]:
        if i not in infos:
            infos[i] = sources[i].info()
        return infos[i]

    for out in outputs:
        if not out.models:
            raise ConfigError(f"{out.label}: no models to merge")
        if len(out.model_params) != len(out.models):
            raise ConfigError(f"{out.label}: {len(out.models)} models but {len(out.model_params)} parameter sets")
        check_architectures(sources, labels, out.sources)

    ref = outputs[0].reference
    names = list(info(ref))
    if tied_embeddings(sources[ref].config):
        names = [n for n in names if n not in TIED_HEADS]
    if not names:
        raise InputModelError(f"{labels[ref]} has no tensors")

    needed: dict[str, set[int]] = {n: set() for n in names}
    for out in outputs:
        if out.reference != ref and set(info(out.reference)) - set(info(ref)) - set(TIED_HEADS):
            extra = sorted(set(info(out.reference)) - set(info(ref)))[0]
            raise TensorMismatchError(f"{labels[out.reference]} has tensor {extra!r} that {labels[ref]} lacks")
        for n in names:
            needed[n].update(out.sources)

    for i in sorted(set().union(*needed.values())):
        have = info(i)
        for n in names:
            if i not in needed[n]:
                continue
            if n not in have:
                raise TensorMismatchError(f"{labels[i]} is missing tensor {n!r} (present in {labels[ref]})")
            if have[n].shape != info(ref)[n].shape:
                raise TensorMismatchError(
                    f"tensor {n!r} has shape {tuple(have[n].shape)} in {labels[i]} but "
                    f"{tuple(info(ref)[n].shape)} in {labels[ref]}"
                )
        extra = set(have) - set(info(ref)) - set(TIED_HEADS)
        if extra:
            log.warning("%s has %d tensors that %s lacks (ignored), e.g. %s", labels[i], len(extra), labels[ref], min(extra))

    for n in names:
        ref_info = info(ref)[n]
        srcs = tuple(sorted(needed[n])) if ref_info.dtype.is_floating_point else (ref,)
        nbytes = sum(info(i)[n].nbytes for i in srcs)
        plan.jobs.append(TensorJob(n, ref_info.shape, ref_info.dtype, srcs, nbytes))
    _check_parameters(plan)
    return plan


def _check_parameters(plan: MergePlan) -> None:
    """Resolve every output's parameters for every tensor once, so a bad value (weights summing to zero for
    one filtered tensor, say) fails here rather than halfway through the merge."""
    for out in plan.outputs:
        fn = out.method.linear_coefficients
        for job in plan.jobs:
            model_params = [resolve(p, job.name) or {} for p in out.model_params]
            params = resolve(out.params, job.name) or {}
            base_params = resolve(out.base_params, job.name)
            if fn is not None and job.dtype.is_floating_point:
                fn(model_params, params, base_params, name=job.name)
