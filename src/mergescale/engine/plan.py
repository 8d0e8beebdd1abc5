"""What to compute: for each output tensor, which input tensors, which method and which parameters.

A :class:`MergePlan` has several outputs (each a method over some of the sources, with its own sink) fed from one
set of sources, so one read of the inputs can produce several models: a PMA sweep, or all the merges of a study
that share experts.

Each output tensor is a :class:`Product`: the method applied to input tensors named by (source, tensor name).
Usually every tensor is read by its own name from each model, but an output may name its inputs itself
(:attr:`OutputSpec.tensors`): a slice of layers 8-15 written as layers 0-7, a frankenmerge that repeats a layer, a
merge whose layer counts differ from its inputs'. Products that share an input tensor are grouped into one
:class:`TensorJob`, whose reads happen once whatever the number of outputs needing them.

:func:`build_plan` checks everything that can be checked from headers alone (architectures, tensor names, shapes,
parameters) before a single weight is read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mergescale.errors import ConfigError, InputModelError, TensorMismatchError
from mergescale.io.checkpoint import TensorInfo, TensorSource
from mergescale.io.writer import TensorSink
from mergescale.methods.base import MergeMethod, ParamValue, TensorMeta

if TYPE_CHECKING:
    from mergescale.vocabulary import VocabularyAlignment

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


@dataclass(frozen=True)
class TensorRef:
    """One input tensor: a tensor name in one of the plan's sources."""

    source: int
    name: str


@dataclass
class OutputTensor:
    """How one tensor of an output is made, when the output names its inputs itself (slices, frankenmerges).

    Attributes:
        name: the output tensor's name.
        models: the merged models' input tensors, in config order.
        base: the base model's input tensor, or None.
        model_params / params / base_params: the method's parameters, already resolved for this tensor.
    """

    name: str
    models: tuple[TensorRef, ...]
    base: TensorRef | None = None
    model_params: tuple[Params, ...] = ()
    params: Params = field(default_factory=dict)
    base_params: Params | None = None


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
        tensors: None: every tensor of the reference model, read by its own name from each model. Otherwise
            the output's tensors, each naming its own inputs (``models``/``base`` then only say which sources
            the output uses).
        statistics: data-aware methods: per kind of statistic, {model source: statistics source}; a model's
            statistic for a tensor is read from its statistics source under the tensor's (input) name.
        vocabulary: when the output's vocabulary differs from its inputs' (``tokenizer_source``), how to align
            the rows of vocabulary tensors before merging (:mod:`mergescale.vocabulary`).
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
    tensors: Sequence[OutputTensor] | None = None
    statistics: Mapping[str, Mapping[int, int]] | None = None
    vocabulary: VocabularyAlignment | None = None

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
class TensorRead:
    """One input tensor to read: its source, name, and what its header says."""

    source: int
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass
class Product:
    """One output tensor of one output, made from some of its job's reads.

    Attributes:
        output: index of the output (into :attr:`MergePlan.outputs`).
        name / shape: the output tensor's name and shape.
        dtype: the dtype of its reference input (the output dtype unless the output sets one).
        models: indices into the job's reads of the merged models' tensors, in config order.
        base: index of the base's tensor, or None.
        reference: the read a non-float tensor is copied from (the base, else the first model).
        model_params / params / base_params: the method's parameters for this tensor.
        coefficients: for a linear method, {read index: coefficient} of the weighted sum; None otherwise.
        statistics: data-aware methods: per kind, the read index of each model's statistic (in model order).
        vocabulary: align the vocabulary rows of the inputs first (the output shape is the aligned one).
    """

    output: int
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    models: tuple[int, ...]
    base: int | None
    reference: int
    model_params: list[Params]
    params: Params
    base_params: Params | None = None
    coefficients: dict[int, float] | None = None
    statistics: dict[str, tuple[int, ...]] = field(default_factory=dict)
    vocabulary: VocabularyAlignment | None = None

    @property
    def inputs(self) -> tuple[int, ...]:
        """Every read the product uses."""
        used = [*self.models, *([self.base] if self.base is not None else [])]
        for reads in self.statistics.values():
            used.extend(reads)
        return tuple(dict.fromkeys(used))


@dataclass(frozen=True)
class TensorJob:
    """Input tensors read together and the output tensors computed from them (usually one tensor name)."""

    reads: tuple[TensorRead, ...]
    products: tuple[Product, ...]

    @property
    def name(self) -> str:
        """The first output tensor's name (for progress and messages)."""
        return self.products[0].name

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.reads)


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

    def output_dtype(self, output: OutputSpec, product: Product) -> torch.dtype:
        if output.dtype is not None and product.dtype.is_floating_point:
            return output.dtype
        return product.dtype

    def layout(self, output: OutputSpec) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        index = self.outputs.index(output)
        return [
            (p.name, p.shape, self.output_dtype(output, p))
            for job in self.jobs
            for p in job.products
            if p.output == index
        ]


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


class _Infos:
    """Header lookups, each source's read once."""

    def __init__(self, sources: Sequence[TensorSource]) -> None:
        self.sources = sources
        self._cache: dict[int, dict[str, TensorInfo]] = {}

    def __call__(self, i: int) -> dict[str, TensorInfo]:
        if i not in self._cache:
            self._cache[i] = self.sources[i].info()
        return self._cache[i]


def reference_names(sources: Sequence[TensorSource], infos: _Infos, ref: int) -> list[str]:
    """The tensors an output following source ``ref`` has: all of its tensors, less a tied output head."""
    names = list(infos(ref))
    if tied_embeddings(sources[ref].config):
        names = [n for n in names if n not in TIED_HEADS]
    return names


def _identity_tensors(out: OutputSpec, names: Sequence[str], infos: _Infos) -> list[OutputTensor]:
    """The usual output: every tensor of the reference, read by its own name from every model."""
    tensors = []
    for n in names:
        floating = infos(out.reference)[n].dtype.is_floating_point
        tensors.append(
            OutputTensor(
                name=n,
                # a non-float tensor (a buffer, an index) is copied from the reference only
                models=tuple(TensorRef(m, n) for m in out.models) if floating else (),
                base=TensorRef(out.base, n) if out.base is not None and floating else None,
                model_params=tuple(resolve(p, n) or {} for p in out.model_params) if floating else (),
                params=(resolve(out.params, n) or {}) if floating else {},
                base_params=resolve(out.base_params, n) if floating else None,
            )
        )
        if not floating:
            tensors[-1].models = (TensorRef(out.reference, n),)
    return tensors


def build_plan(sources: Sequence[TensorSource], labels: Sequence[str], outputs: Sequence[OutputSpec]) -> MergePlan:
    """Check the inputs from their headers and list the tensors to stream.

    Raises :class:`InputModelError` for different architectures and :class:`TensorMismatchError` for a tensor
    missing from a model or with a different shape, naming the model and the tensor.
    """
    if not outputs:
        raise ConfigError("nothing to merge: no outputs")
    plan = MergePlan(list(sources), list(labels), list(outputs))
    infos = _Infos(sources)
    ref = outputs[0].reference
    ref_names = reference_names(sources, infos, ref)
    if not ref_names:
        raise InputModelError(f"{labels[ref]} has no tensors")

    recipes: list[list[OutputTensor]] = []
    for out in outputs:
        if not out.models and out.base is None:
            raise ConfigError(f"{out.label}: no models to merge")
        if len(out.model_params) != len(out.models):
            raise ConfigError(f"{out.label}: {len(out.models)} models but {len(out.model_params)} parameter sets")
        check_architectures(sources, labels, out.sources)
        if out.tensors is not None:
            recipes.append(list(out.tensors))
            continue
        if out.reference != ref and set(infos(out.reference)) - set(infos(ref)) - set(TIED_HEADS):
            extra = sorted(set(infos(out.reference)) - set(infos(ref)))[0]
            raise TensorMismatchError(f"{labels[out.reference]} has tensor {extra!r} that {labels[ref]} lacks")
        recipes.append(_identity_tensors(out, ref_names, infos))
        _warn_extra_tensors(out, ref, infos, labels)

    products: list[tuple[Product, list[TensorRef]]] = []
    for o, (out, recipe) in enumerate(zip(outputs, recipes, strict=True)):
        for ot in recipe:
            products.append(_product(o, out, ot, infos, labels))
    plan.jobs = _group_into_jobs(products, infos)
    return plan


def _warn_extra_tensors(out: OutputSpec, ref: int, infos: _Infos, labels: Sequence[str]) -> None:
    for i in out.sources:
        extra = set(infos(i)) - set(infos(ref)) - set(TIED_HEADS)
        if extra:
            log.warning("%s has %d tensors that %s lacks (ignored), e.g. %s", labels[i], len(extra), labels[ref], min(extra))


def _product(
    o: int, out: OutputSpec, ot: OutputTensor, infos: _Infos, labels: Sequence[str]
) -> tuple[Product, list[TensorRef]]:
    """One output tensor as a product over a list of input refs (its reads, indexed locally)."""
    refs: list[TensorRef] = []

    def index(r: TensorRef) -> int:
        have = infos(r.source)
        if r.name not in have:
            raise TensorMismatchError(f"{labels[r.source]} is missing tensor {r.name!r} (needed for {ot.name!r})")
        if r not in refs:
            refs.append(r)
        return refs.index(r)

    models = tuple(index(r) for r in ot.models)
    base = index(ot.base) if ot.base is not None else None
    if not models and base is None:
        raise ConfigError(f"{out.label}: tensor {ot.name!r} has no inputs")
    reference = base if base is not None else models[0]
    ref_ref = refs[reference]
    ref_info = infos(ref_ref.source)[ref_ref.name]
    vocab = out.vocabulary if out.vocabulary is not None and out.vocabulary.covers(ref_ref) else None
    shape = tuple(ref_info.shape)
    if vocab is not None:
        shape = vocab.output_shape(shape)
    for r in refs:
        have = tuple(infos(r.source)[r.name].shape)
        same = have[1:] == tuple(ref_info.shape)[1:] if vocab is not None else have == tuple(ref_info.shape)
        if not same:
            raise TensorMismatchError(
                f"tensor {r.name!r} has shape {have} in {labels[r.source]} but {tuple(ref_info.shape)} in "
                f"{labels[ref_ref.source]}" + (
                    "; models whose vocabularies differ need tokenizer_source (base, union or a model)"
                    if have[1:] == tuple(ref_info.shape)[1:] else "")
            )
    floating = ref_info.dtype.is_floating_point
    statistics: dict[str, tuple[int, ...]] = {}
    if floating and out.statistics:
        statistics = _statistic_reads(out, ot, index, infos, labels)
    product = Product(
        output=o,
        name=ot.name,
        shape=shape,
        dtype=ref_info.dtype,
        models=models if floating else (),
        base=base if floating else None,
        reference=reference,
        model_params=list(ot.model_params) if floating else [],
        params=dict(ot.params) if floating else {},
        base_params=ot.base_params if floating else None,
        statistics=statistics,
        vocabulary=vocab if floating else None,
    )
    if floating:
        _check_params(out, product)
        product.coefficients = _coefficients(out, product, ot.name)
    return product, refs


def tensor_meta(product: Product, *, seed: int = 0, device: torch.device | None = None) -> TensorMeta:
    """What the product's method knows of it before any data (parameter checks, blocked merges)."""
    return TensorMeta(
        name=product.name,
        shape=tuple(product.shape),
        k=len(product.models),
        has_base=product.base is not None,
        model_params=product.model_params,
        params=product.params,
        base_params=product.base_params,
        seed=seed,
        device=device if device is not None else torch.device("cpu"),
        statistics=frozenset(product.statistics),
    )


def _check_params(out: OutputSpec, product: Product) -> None:
    """Run the method's parameter checks for this tensor, before anything is read (see MergeMethod.check_params);
    a linear method's coefficients are its check, whether or not the engine then uses them."""
    method = out.method
    if method.check_params is not None:
        method.check_params(
            tensor_meta(product)
        )
    if method.linear_coefficients is not None and (product.vocabulary is not None or product.statistics):
        method.linear_coefficients(product.model_params, product.params, product.base_params, name=product.name)


def _statistic_reads(
    out: OutputSpec, ot: OutputTensor, index: Callable[[TensorRef], int], infos: _Infos, labels: Sequence[str]
) -> dict[str, tuple[int, ...]]:
    """Per kind, the read of each model's statistic for this tensor; kinds some model lacks are left out (the
    method then treats the tensor as it treats tensors without statistics), except when only some models have
    them, which is an error (the statistics were computed on different models)."""
    found: dict[str, tuple[int, ...]] = {}
    for kind, by_source in (out.statistics or {}).items():
        refs = [TensorRef(by_source[r.source], r.name) if r.source in by_source else None for r in ot.models]
        present = [r is not None and r.name in infos(r.source) for r in refs]
        if not any(present):
            continue
        if not all(present):
            missing = ot.models[present.index(False)]
            raise TensorMismatchError(
                f"{labels[missing.source]}: no {kind} statistics for tensor {missing.name!r}, which the other "
                "models have; recalibrate it"
            )
        found[kind] = tuple(index(r) for r in refs if r is not None)
    return found


def _coefficients(out: OutputSpec, product: Product, name: str) -> dict[int, float] | None:
    """{read: coefficient} of a linear method's weighted sum (validating the parameters), or None."""
    fn = out.method.linear_coefficients
    if fn is None or product.vocabulary is not None or product.statistics:
        return None
    model_coefs, base_coef = fn(product.model_params, product.params, product.base_params, name=name)
    coefs: dict[int, float] = {}
    for read, c in zip(product.models, model_coefs, strict=True):
        coefs[read] = coefs.get(read, 0.0) + float(c)
    if product.base is not None and base_coef != 0.0:
        coefs[product.base] = coefs.get(product.base, 0.0) + float(base_coef)
    return coefs


def _group_into_jobs(products: list[tuple[Product, list[TensorRef]]], infos: _Infos) -> list[TensorJob]:
    """Products that share an input tensor go into one job, so each input tensor is read once for every output
    that needs it. Jobs come in the order of their first product; a job's reads by tensor name (in order of
    first use), then by source."""
    parent: dict[TensorRef, TensorRef] = {}

    def find(r: TensorRef) -> TensorRef:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for _, refs in products:
        for r in refs:
            parent.setdefault(r, r)
        for r in refs[1:]:
            a, b = find(refs[0]), find(r)
            if a != b:
                parent[b] = a
    groups: dict[TensorRef, list[tuple[Product, list[TensorRef]]]] = {}
    for item in products:
        groups.setdefault(find(item[1][0]), []).append(item)

    jobs = []
    for members in groups.values():
        name_order: dict[str, int] = {}
        for _, refs in members:
            for r in refs:
                name_order.setdefault(r.name, len(name_order))
        all_refs = sorted({r for _, refs in members for r in refs}, key=lambda r: (name_order[r.name], r.source))
        position = {r: i for i, r in enumerate(all_refs)}
        reads = tuple(
            TensorRead(r.source, r.name, tuple(infos(r.source)[r.name].shape), infos(r.source)[r.name].dtype,
                       infos(r.source)[r.name].nbytes)
            for r in all_refs
        )
        local = []
        for product, refs in members:
            remap = {i: position[r] for i, r in enumerate(refs)}
            local.append(_remap(product, remap))
        jobs.append(TensorJob(reads, tuple(local)))
    return jobs


def _remap(p: Product, remap: dict[int, int]) -> Product:
    """The product with its read indices translated from its own list to its job's."""
    p.models = tuple(remap[i] for i in p.models)
    p.base = remap[p.base] if p.base is not None else None
    p.reference = remap[p.reference]
    p.statistics = {k: tuple(remap[i] for i in v) for k, v in p.statistics.items()}
    if p.coefficients is not None:
        p.coefficients = {remap[i]: c for i, c in p.coefficients.items()}
    return p
