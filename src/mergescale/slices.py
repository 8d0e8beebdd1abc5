"""The output tensors of a ``slices:`` config: which input tensor feeds each output tensor, with what parameters.

mergekit 0.1.5 semantics (``plan.py``: ``plan_module``, ``plan_slice``, ``plan_layer``), matched here:

- Output layers are numbered from 0 through the slices in order; the i-th layer of a slice is merged from layer
  ``layer_range[0] + i`` of each of its sources, written under the output's index (so ``[8, 16]`` of a model
  becomes layers 0-7, and overlapping ranges repeat layers: the output's ``num_hidden_layers`` is the sum of
  the slices' lengths).
- Tensors outside the layers: the embeddings take the first slice's sources (and its parameters and base);
  everything after the layers (final norm, output head) the last slice's.
- Gradients: within a slice of n layers, its i-th layer has ``t = i / (n − 1)`` (``t = 1`` for a one-layer
  slice); tensors outside the layers ``t = 0``.
- Parameters of a merged model come from its source entries in the slice, then the slice's, the module's and the
  top-level ``parameters``, with filters matched on the input tensor's name; global parameters from the slice's,
  the module's and the top-level ones, filters matched on the output tensor's name.
- The slice's ``base_model`` (else the config's) is the base when it is one of the slice's sources; methods with
  no base role (linear, karcher, passthrough) merge it like any source.

Layers are found by name: ``<prefix>.<index>.<rest>`` with the prefix ending in ``layers``, ``h``, ``blocks`` or
``layer`` (``model.layers.3.mlp.up_proj.weight``); a model with more than one such stack (encoder-decoder,
vision towers) is refused. Tensors outside the layers whose name says embedding (``embed``, ``wte``, ``wpe``)
come before them, the rest after.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergescale.config import MergeConfig, SliceSpec, resolve_parameters, slice_specs
from mergescale.engine.plan import OutputTensor, TensorRef, reference_names
from mergescale.errors import InputModelError
from mergescale.io.checkpoint import TensorSource

_LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer)\.)(?P<index>\d+)\.(?P<rest>.+)$")
_PRE = re.compile(r"(?:^|\.|_)(?:embed\w*|wte|wpe|word_embeddings|tok_embeddings)(?:\.|$)")


@dataclass(frozen=True)
class LayerStructure:
    """How a checkpoint's tensors divide into layers: ``prefix`` + index + '.' + one of ``layers[index]``."""

    prefix: str
    layers: dict[int, tuple[str, ...]]
    pre: tuple[str, ...]
    post: tuple[str, ...]

    def name(self, index: int, rest: str) -> str:
        return f"{self.prefix}{index}.{rest}"


def layer_structure(names: Sequence[str], label: str) -> LayerStructure:
    """Split a checkpoint's tensor names into the layer stack and the tensors before and after it."""
    prefixes: dict[str, dict[int, list[str]]] = {}
    outside: list[str] = []
    for n in names:
        m = _LAYER_NAME.match(n)
        if m is None:
            outside.append(n)
            continue
        prefixes.setdefault(m.group("prefix"), {}).setdefault(int(m.group("index")), []).append(m.group("rest"))
    if len(prefixes) > 1:
        raise InputModelError(
            f"{label} has {len(prefixes)} stacks of layers ({', '.join(sorted(prefixes))}); slices need a model "
            "with one (a decoder-only language model)"
        )
    if not prefixes:
        raise InputModelError(f"{label}: no numbered layers found (expected names like model.layers.0....)")
    (prefix, layers), = prefixes.items()
    pre = tuple(n for n in outside if _PRE.search(n))
    post = tuple(n for n in outside if not _PRE.search(n))
    return LayerStructure(prefix, {i: tuple(v) for i, v in sorted(layers.items())}, pre, post)


@dataclass
class SliceLayout:
    """The output of a slices config: its tensors, and the source layer behind each output layer."""

    tensors: list[OutputTensor]
    layer_sources: list[tuple[int, int]]  # per output layer: (source, source layer) of the slice's first source

    @property
    def num_layers(self) -> int:
        return len(self.layer_sources)


def slice_layout(
    config: MergeConfig,
    sources: Sequence[TensorSource],
    labels: Sequence[str],
    index_of: Callable[[str], int],
) -> SliceLayout:
    """Every output tensor of a slices config, with its inputs and resolved parameters.

    ``index_of`` maps a model reference of the config to its source index.
    """
    slices = slice_specs(config)
    assert slices is not None, "slice_layout needs a slices config"
    method = config.method
    structures: dict[int, LayerStructure] = {}

    def structure(src: int) -> LayerStructure:
        if src not in structures:
            structures[src] = layer_structure(reference_names(sources, _infos(sources), src), labels[src])
        return structures[src]

    ref = index_of(config.base_model) if config.base_model else index_of(slices[0].sources[0].model)
    ref_structure = structure(ref)
    out: list[OutputTensor] = []

    for name in ref_structure.pre:
        out.append(_tensor(config, method, slices[0], index_of, name, lambda s, n=name: n, t=0.0))
    layer_sources: list[tuple[int, int]] = []
    for k, sl in enumerate(slices):
        n_layers = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for src_slice in sl.sources:
            st = structure(index_of(src_slice.model))
            top = src_slice.layer_range[1]
            if top > len(st.layers) or any(i not in st.layers for i in range(src_slice.layer_range[0], top)):
                raise InputModelError(
                    f"slices[{k}]: layer_range {list(src_slice.layer_range)} of {src_slice.model} is past its "
                    f"{len(st.layers)} layers"
                )
        for i in range(n_layers):
            t = i / (n_layers - 1) if n_layers > 1 else 1.0
            first = sl.sources[0]
            first_src = index_of(first.model)
            first_layer = first.layer_range[0] + i
            out_index = len(layer_sources)
            layer_sources.append((first_src, first_layer))
            for rest in structure(first_src).layers[first_layer]:
                def input_name(src_slice: Any, i: int = i, rest: str = rest) -> str:
                    return structure(index_of(src_slice.model)).name(src_slice.layer_range[0] + i, rest)

                out.append(_tensor(config, method, sl, index_of, ref_structure.name(out_index, rest), input_name, t))
    for name in ref_structure.post:
        out.append(_tensor(config, method, slices[-1], index_of, name, lambda s, n=name: n, t=0.0))
    return SliceLayout(out, layer_sources)


class _infos:  # noqa: N801 - a cached header lookup for reference_names
    def __init__(self, sources: Sequence[TensorSource]) -> None:
        self.sources = sources

    def __call__(self, i: int) -> Mapping[str, Any]:
        return self.sources[i].info()


def _tensor(
    config: MergeConfig,
    method: Any,
    sl: SliceSpec,
    index_of: Callable[[str], int],
    out_name: str,
    input_name: Callable[[Any], str],
    t: float,
) -> OutputTensor:
    """One output tensor of a slice: the inputs (base split off as the method needs) and their parameters."""
    base_ref = sl.base_model if method.base != "unused" and not method.merges_base else None
    shared = [sl.parameters, config.module_parameters(), config.parameters]
    models, model_params, base = [], [], None
    for src_slice in sl.sources:
        ref = TensorRef(index_of(src_slice.model), input_name(src_slice))
        if base_ref is not None and src_slice.model == base_ref and base is None:
            base = ref
            continue
        own = [s.parameters for s in sl.sources if s.model == src_slice.model]
        models.append(ref)
        model_params.append(resolve_parameters(method.model_params, [*own, *shared], ref.name, t))
    params = resolve_parameters(method.global_params, shared, out_name, t)
    return OutputTensor(out_name, tuple(models), base, tuple(model_params), params)


def output_config(config: Mapping[str, Any] | None, layout: SliceLayout, configs: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The output's config.json: the reference's with the new layer count, and its per-layer lists (e.g.
    ``layer_types``) rebuilt from the source layer behind each output layer. (mergekit sets the layer count
    only, which transformers 5 refuses to load when a model has ``layer_types``.)"""
    if config is None:
        return None
    out = dict(config)
    holder = out
    key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(out.get(k), int)), None)
    if key is None and isinstance(out.get("text_config"), dict):
        holder = out["text_config"] = dict(out["text_config"])
        key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(holder.get(k), int)), None)
    if key is None:
        return out
    old = holder[key]
    holder[key] = layout.num_layers
    for k, v in list(holder.items()):
        if "layer" in k and isinstance(v, list) and len(v) == old:
            per_layer = []
            for src, layer in layout.layer_sources:
                cfg = configs[src] or {}
                src_list = cfg.get(k) if isinstance(cfg.get(k), list) else v
                per_layer.append(src_list[layer] if layer < len(src_list) else v[min(layer, len(v) - 1)])
            holder[k] = per_layer
    return out
