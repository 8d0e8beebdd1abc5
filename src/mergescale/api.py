"""The Python API: what the CLI calls and what users import.

>>> from mergescale import merge
>>> merge("ties.yaml", "out/merged", device="cpu")          # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergescale.config import (
    InputModel,
    MergeConfig,
    global_resolver,
    load_config,
    model_resolver,
    num_layers,
    slice_specs,
)
from mergescale.device import check_device
from mergescale.engine.memory import MemoryPlan
from mergescale.engine.memory import plan_memory as plan_run_memory
from mergescale.engine.plan import MergePlan, OutputSpec, OutputTensor, ParamsFor, build_plan
from mergescale.engine.stream import StreamStats, run_plan
from mergescale.errors import ConfigError
from mergescale.io.atomic import check_apart_from_inputs, check_output_folder
from mergescale.io.checkpoint import TensorSource, open_checkpoint, resolve_model_path
from mergescale.io.folders import GENERATION_CONFIG
from mergescale.io.tokenizers import (
    BuiltTokenizer,
    build_tokenizer,
    tokenizer_files_with_template,
    vocab_size_of,
)
from mergescale.io.writer import (
    MemorySink,
    ModelFolderSink,
    TensorSink,
)
from mergescale.vocabulary import TokenRule, VocabularyAlignment


@dataclass
class MergeResult:
    """What a merge produced and what it cost."""

    out_dir: Path | None
    stats: StreamStats
    state_dict: dict[str, torch.Tensor] | None = None


class SourcePool:
    """Opens each distinct model (and statistics file) once, so several merges can share one read of their
    inputs."""

    def __init__(self) -> None:
        self.sources: list[TensorSource] = []
        self.labels: list[str] = []
        self.folders: list[Path] = []
        self._by_key: dict[str, int] = {}

    def add(self, ref: str, role: str = "model") -> int:
        if ref in self._by_key:
            return self._by_key[ref]
        folder = resolve_model_path(ref)
        key = str(folder.resolve())
        if key in self._by_key:
            self._by_key[ref] = self._by_key[key]
            return self._by_key[key]
        self.sources.append(open_checkpoint(folder))
        self.labels.append(f"{role} {ref!r}")
        self.folders.append(folder)
        self._by_key[ref] = self._by_key[key] = len(self.sources) - 1
        return len(self.sources) - 1

    def close(self) -> None:
        """Close every source this pool opened."""
        for source in self.sources:
            source.close()

    def __enter__(self) -> SourcePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_statistics(self, path: Path, label: str) -> int:
        """A calibration statistics file (:mod:`mergescale.calibration`) as a source."""
        from mergescale.calibration import StatisticsCheckpoint

        key = f"statistics:{path.resolve()}"
        if key not in self._by_key:
            self.sources.append(StatisticsCheckpoint(path))
            self.labels.append(label)
            self.folders.append(path.parent)
            self._by_key[key] = len(self.sources) - 1
        return self._by_key[key]


@dataclass
class OutputParts:
    """Everything one merge config contributes to a plan, before a sink is attached."""

    config: MergeConfig
    models: list[int]
    base: int | None
    model_params: list[ParamsFor]
    params: ParamsFor
    base_params: ParamsFor | None = None
    tensors: list[OutputTensor] | None = None
    statistics: dict[str, dict[int, int]] | None = None
    vocabulary: VocabularyAlignment | None = None
    tokenizer: BuiltTokenizer | None = None
    model_config: dict[str, Any] | None = None  # the output's config.json
    reference: int = 0
    sources: list[int] = field(default_factory=list)

    def spec(self, sink: TensorSink, label: str) -> OutputSpec:
        return OutputSpec(
            label=label,
            method=self.config.method,
            models=self.models,
            base=self.base,
            model_params=self.model_params,
            params=self.params,
            base_params=self.base_params,
            sink=sink,
            dtype=self.config.output_dtype,
            seed=self.config.seed,
            tensors=self.tensors,
            statistics=self.statistics,
            vocabulary=self.vocabulary,
        )


def describe_output(config: MergeConfig, pool: SourcePool) -> OutputParts:
    """The engine's view of one merge config (its sources added to ``pool``): inputs, parameters, tensors,
    statistics, vocabulary alignment and the output's config.json. Reads headers, configs and tokenizers only."""
    method = config.method
    refs = config.referenced_models()
    for ref in refs:
        pool.add(ref, "base model" if ref == config.base_model else "model")
    parts = _slices_parts(config, pool) if slice_specs(config) is not None else _models_parts(config, pool)
    if method.statistics:
        parts.statistics = _statistics(config, pool)
    if config.tokenizer_mode is not None:
        _tokenizer_parts(config, pool, parts)
    return parts


def _models_parts(config: MergeConfig, pool: SourcePool) -> OutputParts:
    """A ``models:`` config: every tensor read by its own name (the engine's default)."""
    method = config.method
    entries = list(config.model_entries() or [])
    base_ref = config.base_model if method.base != "unused" else None
    if method.merges_base and base_ref is not None:
        # no base role (mergekit's "ignored" policy): the base is one more input, at its place under models
        # when listed there, else appended last, with its own entry's parameters (or the top-level ones)
        if config.base_entry() is None:
            entries.append(InputModel(model=base_ref))
        merged, base = entries, None
    else:
        merged = [e for e in entries if e.model != base_ref]
        base = pool.add(base_ref, "base model") if base_ref is not None else None
    models = [pool.add(m.model) for m in merged]
    reference = base if base is not None else models[0]
    n_layers = num_layers(pool.sources[reference].config)
    folder_ref = pool.add(config.base_model) if config.base_model else reference
    return OutputParts(
        config=config,
        models=models,
        base=base,
        model_params=[model_resolver(config, m, n_layers) for m in merged],
        params=global_resolver(config, n_layers),
        model_config=dict(pool.sources[folder_ref].config or {}) or None,
        reference=folder_ref,
        sources=[*models, *([base] if base is not None else [])],
    )


def _slices_parts(config: MergeConfig, pool: SourcePool) -> OutputParts:
    """A ``slices:`` config: each output tensor names its inputs (layers renumbered, depth changed)."""
    from mergescale.slices import output_config, slice_layout

    layout = slice_layout(config, pool.sources, pool.labels, pool.add)
    used = list(dict.fromkeys(r.source for t in layout.tensors for r in (*t.models, *([t.base] if t.base else []))))
    base = pool.add(config.base_model) if config.base_model and config.method.base != "unused" else None
    models = [s for s in used if s != base] or used
    folder_ref = pool.add(config.base_model) if config.base_model else pool.add(config.slice_list()[0].sources[0].model)
    configs = [s.config for s in pool.sources]
    return OutputParts(
        config=config,
        models=models,
        base=base if base in used else None,
        model_params=[{} for _ in models],
        params={},
        tensors=layout.tensors,
        model_config=output_config(pool.sources[folder_ref].config, layout, configs),
        reference=folder_ref,
        sources=used,
    )


def _statistics(config: MergeConfig, pool: SourcePool) -> dict[str, dict[int, int]]:
    from mergescale.calibration import _calibrated_models, statistics_path

    found: dict[str, dict[int, int]] = {}
    for kind in config.method.statistics:
        by_source: dict[int, int] = {}
        for model in _calibrated_models(config):
            path = statistics_path(config, model, kind)
            if not path.is_file():
                raise ConfigError(
                    f"no {kind} statistics for model {model!r} ({path} does not exist); compute them with "
                    "`mergescale calibrate CONFIG` (`mergescale merge` does it first)"
                )
            by_source[pool.add(model)] = pool.add_statistics(path, f"{kind} statistics of {model!r}")
        found[kind] = by_source
    return found


_LAYER_NAME = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.\d+\.")


def vocabulary_tensors(source: TensorSource) -> frozenset[str]:
    """Tensors of a model with its vocabulary on axis 0: outside the layers, first dimension = vocab_size."""
    size = vocab_size_of(source.config)
    if size is None:
        return frozenset()
    return frozenset(
        n for n, info in source.info().items()
        if not _LAYER_NAME.search(n) and len(info.shape) == 2 and info.shape[0] == size and "pos" not in n
    )


def _tokenizer_parts(config: MergeConfig, pool: SourcePool, parts: OutputParts) -> None:
    """``tokenizer_source``: build the output tokenizer and the alignment of every model's vocabulary rows."""
    refs = config.referenced_models()
    base = config.base_model or refs[0]
    folders = {r: pool.folders[pool.add(r)] for r in refs}
    configs = {r: pool.sources[pool.add(r)].config for r in refs}
    settings = config.tokenizer
    tokens = settings.tokens or {} if settings else {}
    mode = config.tokenizer_mode or "base"
    if mode not in ("base", "union") and mode not in folders:
        folders[mode] = resolve_model_path(mode)
        configs[mode] = open_checkpoint(folders[mode]).config
    built = build_tokenizer(
        mode, base, refs, folders, configs,
        chat_template=config.chat_template,
        pad_to_multiple_of=settings.pad_to_multiple_of if settings else None,
        add_tokens=list(tokens),
    )  # fmt: skip
    order = sorted(built.vocab.items(), key=lambda kv: kv[1])
    rows: dict[int, torch.Tensor] = {}
    names: dict[int, frozenset[str]] = {}
    for ref in refs:
        src = pool.add(ref)
        vocab = built.model_vocabs.get(ref, built.model_vocabs[base])
        rows[src] = torch.tensor([vocab.get(tok, -1) for tok, _ in order], dtype=torch.long)
        names[src] = vocabulary_tensors(pool.sources[src])
    rules: dict[int, TokenRule] = {}
    for token, spec in tokens.items():
        if token not in built.vocab:
            continue
        tid = built.vocab[token]
        src_spec = spec.source
        if src_spec is None:
            if spec.force:
                raise ConfigError(f"tokenizer.tokens.{token}: 'force' needs a 'source'")
            continue
        if getattr(src_spec, "kind", None) == "zero":
            rules[tid] = TokenRule(zero=True, force=spec.force)
        elif isinstance(src_spec, str):
            rules[tid] = TokenRule(source=pool.add(src_spec), force=spec.force)
        else:
            model_vocab = built.model_vocabs.get(src_spec.model, {})
            row = src_spec.token_id if src_spec.token_id is not None else model_vocab.get(src_spec.token, -1)
            if row is None or row < 0:
                raise ConfigError(f"tokenizer.tokens.{token}: token {src_spec.token!r} is not in {src_spec.model}")
            rules[tid] = TokenRule(source=pool.add(src_spec.model), row=row, force=spec.force)
    base_source = pool.add(config.base_model) if config.base_model else None
    parts.vocabulary = VocabularyAlignment(built.size, len(order), rows, names, rules, base=base_source)
    parts.tokenizer = built
    if parts.model_config is not None:
        cfg = dict(parts.model_config)
        holder = cfg if "vocab_size" in cfg or not isinstance(cfg.get("text_config"), dict) else dict(cfg["text_config"])
        holder["vocab_size"] = built.size
        if holder is not cfg:
            cfg["text_config"] = holder
        parts.model_config = cfg


def output_for_config(config: MergeConfig, pool: SourcePool, sink: TensorSink, label: str = "merge") -> OutputSpec:
    """The engine's description of one merge config, with its sources added to ``pool``."""
    return describe_output(config, pool).spec(sink, label)


def _as_config(config: str | Path | Mapping[str, Any] | MergeConfig, strict: bool = False) -> MergeConfig:
    return config if isinstance(config, MergeConfig) else load_config(config, strict=strict)


def plan_merges(
    jobs: Sequence[tuple[MergeConfig, TensorSink]], *, pool: SourcePool | None = None
) -> MergePlan:
    """One plan for several merges: each distinct input tensor is read once and feeds every merge using it.

    Works for every method and config shape; data-aware methods (fisher, regmean) find their statistics from
    the config's ``calibration`` block (compute them first with :func:`mergescale.calibration.calibrate`).
    """
    pool = pool or SourcePool()
    outputs = [output_for_config(cfg, pool, sink, label=f"merge {i}") for i, (cfg, sink) in enumerate(jobs)]
    return build_plan(pool.sources, pool.labels, outputs)


def merge(
    config: str | Path | Mapping[str, Any] | MergeConfig,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    allow_nonfinite: bool = False,
    copy_tokenizer: bool = True,
    progress: bool = True,
    strict: bool = False,
    max_memory: int | str | None = None,
) -> MergeResult:
    """Merge the models of a mergekit-style config into a Hugging Face folder at ``out_dir``.

    Streams tensor by tensor (memory follows the largest tensor, not the model), computes in float32 on
    ``device`` and writes sharded safetensors, ``config.json`` (with the output dtype, layer count and vocabulary
    size), the tokenizer (copied from the tokenizer source, or built for ``tokenizer_source``/``chat_template``)
    and ``mergekit_config.yml`` into a temporary folder renamed into place at the end. Data-aware methods
    compute their missing calibration statistics first. ``strict`` makes keys and parameters mergekit would
    ignore errors instead of warnings. ``max_memory`` (bytes or a size like ``"16GB"``) bounds the process's
    peak memory: large tensors of stacked methods are merged over row blocks that fit (see
    :func:`plan_memory`); a budget too small for one block is refused before anything is read.

    Raises:
        ConfigError, InputModelError, TensorMismatchError, NonFiniteError, OutputError: before anything is
        written to ``out_dir`` (an ``out_dir`` that is, is inside or contains an input model is an OutputError).
    """
    check_device(device)
    cfg = _as_config(config, strict)
    out = Path(out_dir)
    check_output_folder(out, overwrite=overwrite)
    donor = resolve_model_path(cfg.tokenizer_ref) if cfg.tokenizer_ref else None
    inputs = [
        (f"{'base model' if r == cfg.base_model else 'model'} {r!r}", resolve_model_path(r))
        for r in cfg.referenced_models()
    ]
    check_apart_from_inputs(out, inputs + ([("tokenizer source", donor)] if donor and copy_tokenizer else []))
    if cfg.method.statistics:
        from mergescale.calibration import calibrate

        calibrate(cfg, device=device, progress=progress)
    with SourcePool() as pool:
        parts = describe_output(cfg, pool)  # opens every input: a bad model fails before the output is touched
        sink = ModelFolderSink(out, max_shard_size=max_shard_size, overwrite=overwrite,
                               **_folder_contents(cfg, parts, donor, copy_tokenizer))  # fmt: skip
        plan = build_plan(pool.sources, pool.labels, [parts.spec(sink, "merge")])
        stats = run_plan(plan, device=device, check_finite=not allow_nonfinite, progress=progress,
                         max_memory=max_memory)  # fmt: skip
    return MergeResult(out, stats)


def _folder_contents(
    cfg: MergeConfig, parts: OutputParts, donor: Path | None, copy_tokenizer: bool
) -> dict[str, Any]:
    """config.json, tokenizer files and mergekit_config.yml of the output folder; ``donor`` is the folder of
    the config's tokenizer model (``tokenizer_ref``)."""
    extra: dict[str, str | bytes] = {"mergekit_config.yml": cfg.to_yaml()}
    copy_from = None
    copy_names = None
    if parts.tokenizer is not None:
        extra.update(parts.tokenizer.files)
        copy_from, copy_names = donor, (GENERATION_CONFIG,)
    elif copy_tokenizer and donor is not None:
        copy_from = donor
        if cfg.chat_template is not None:
            folders = [resolve_model_path(r) for r in cfg.referenced_models()]
            files = tokenizer_files_with_template(donor, cfg.chat_template, folders)
            if files is not None:
                extra.update(files)
    return {"config": parts.model_config, "copy_from": copy_from, "copy_names": copy_names, "extra_files": extra}


def merge_to_memory(
    config: str | Path | Mapping[str, Any] | MergeConfig,
    *,
    device: str = "cpu",
    allow_nonfinite: bool = False,
    progress: bool = False,
    strict: bool = False,
    max_memory: int | str | None = None,
) -> MergeResult:
    """Merge without writing: the merged weights come back as a state dict (e.g. to evaluate in memory).
    ``max_memory`` as in :func:`merge` (the merged weights held in memory count in it)."""
    check_device(device)
    cfg = _as_config(config, strict)
    sink = MemorySink()
    with SourcePool() as pool:
        plan = plan_merges([(cfg, sink)], pool=pool)
        stats = run_plan(plan, device=device, check_finite=not allow_nonfinite, progress=progress,
                         max_memory=max_memory)  # fmt: skip
    return MergeResult(None, stats, sink.state_dict)


def plan_memory(
    config: str | Path | Mapping[str, Any] | MergeConfig,
    *,
    max_memory: int | str | None = None,
    device: str = "cpu",
    strict: bool = False,
) -> MemoryPlan:
    """The memory a merge of ``config`` will need, from the models' headers only (no weight is read).

    Returns the :class:`~mergescale.engine.memory.MemoryPlan` :func:`merge` would follow with this
    ``max_memory``: its ``peak`` (bytes: this process now plus the largest tensor job's outputs, read-ahead,
    pending writes and working memory) and ``describe()`` lines. Raises
    :class:`~mergescale.engine.memory.MemoryBudgetError` when ``max_memory`` cannot hold one block of some
    tensor, as :func:`merge` would before reading anything.

    >>> plan_memory("ties-70b.yaml", max_memory="48GB").peak / 1e9           # doctest: +SKIP
    31.7
    """
    check_device(device)
    cfg = _as_config(config, strict)
    if isinstance(max_memory, str):
        from mergescale.io.writer import parse_size

        max_memory = parse_size(max_memory, "max memory")
    with SourcePool() as pool:
        plan = plan_merges([(cfg, MemorySink())], pool=pool)
        return plan_run_memory(plan, max_memory=max_memory, device=device)
