"""The Python API: what the CLI calls and what users import.

>>> from mergescale import merge
>>> merge("ties.yaml", "out/merged", device="cpu")          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
)
from mergescale.device import check_device
from mergescale.engine.plan import MergePlan, OutputSpec, build_plan
from mergescale.engine.stream import StreamStats, run_plan
from mergescale.io.checkpoint import TensorSource, open_checkpoint, resolve_model_path
from mergescale.io.writer import (
    MemorySink,
    ModelFolderSink,
    TensorSink,
    check_apart_from_inputs,
    check_output_folder,
)


@dataclass
class MergeResult:
    """What a merge produced and what it cost."""

    out_dir: Path | None
    stats: StreamStats
    state_dict: dict[str, torch.Tensor] | None = None


class SourcePool:
    """Opens each distinct model once, so several merges can share one read of their inputs."""

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


def output_for_config(config: MergeConfig, pool: SourcePool, sink: TensorSink, label: str = "merge") -> OutputSpec:
    """The engine's description of one merge config, with its sources added to ``pool``."""
    base = pool.add(config.base_model, "base model") if config.base_model else None
    merged = config.merged_models()
    models = [pool.add(m.model) for m in merged]
    ref = base if base is not None else models[0]
    n_layers = num_layers(pool.sources[ref].config)
    base_entry = config.base_entry()
    if base_entry is None and base is not None and config.method.base == "optional":
        base_entry = InputModel(model=config.base_model)  # merged with the top-level parameters, as mergekit
    return OutputSpec(
        label=label,
        method=config.method,
        models=models,
        base=base,
        model_params=[model_resolver(config, m, n_layers) for m in merged],
        params=global_resolver(config, n_layers),
        base_params=model_resolver(config, base_entry, n_layers) if base_entry is not None else None,
        sink=sink,
        dtype=config.output_dtype,
        seed=config.seed,
    )


def _as_config(config: str | Path | Mapping[str, Any] | MergeConfig) -> MergeConfig:
    return config if isinstance(config, MergeConfig) else load_config(config)


def plan_merges(
    jobs: Sequence[tuple[MergeConfig, TensorSink]], *, pool: SourcePool | None = None
) -> MergePlan:
    """One plan for several merges: each distinct input model is read once and feeds every merge using it."""
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
) -> MergeResult:
    """Merge the models of a mergekit-style config into a Hugging Face folder at ``out_dir``.

    Streams tensor by tensor (memory follows the largest tensor, not the model), computes in float32 on
    ``device`` and writes sharded safetensors, ``config.json`` (with the output dtype), tokenizer files from the
    tokenizer source and ``mergekit_config.yml`` into a temporary folder renamed into place at the end.

    Raises:
        ConfigError, InputModelError, TensorMismatchError, NonFiniteError, OutputError: before anything is
        written to ``out_dir`` (an ``out_dir`` that is, is inside or contains an input model is an OutputError).
    """
    check_device(device)
    cfg = _as_config(config)
    out = Path(out_dir)
    check_output_folder(out, overwrite=overwrite)
    with SourcePool() as pool:
        return _merge_into(cfg, out, pool, device, overwrite, max_shard_size, allow_nonfinite, copy_tokenizer, progress)


def _merge_into(
    cfg: MergeConfig,
    out: Path,
    pool: SourcePool,
    device: str,
    overwrite: bool,
    max_shard_size: int | str,
    allow_nonfinite: bool,
    copy_tokenizer: bool,
    progress: bool,
) -> MergeResult:
    # open the inputs first so a bad model fails before the output folder is touched
    for ref in ([cfg.base_model] if cfg.base_model else []) + [m.model for m in cfg.merged_models()]:
        pool.add(ref, "base model" if ref == cfg.base_model else "model")
    tok_folder = resolve_model_path(cfg.tokenizer_ref) if copy_tokenizer and cfg.tokenizer_ref else None
    inputs = list(zip(pool.labels, pool.folders, strict=True))
    check_apart_from_inputs(out, inputs + ([("tokenizer source", tok_folder)] if tok_folder else []))
    ref_idx = pool.add(cfg.base_model) if cfg.base_model else pool.add(cfg.merged_models()[0].model)
    sink = ModelFolderSink(
        out,
        config=pool.sources[ref_idx].config,
        copy_from=tok_folder,
        extra_files={"mergekit_config.yml": cfg.to_yaml()},
        max_shard_size=max_shard_size,
        overwrite=overwrite,
    )
    plan = plan_merges([(cfg, sink)], pool=pool)
    stats = run_plan(plan, device=device, check_finite=not allow_nonfinite, progress=progress)
    return MergeResult(out, stats)


def merge_to_memory(
    config: str | Path | Mapping[str, Any] | MergeConfig,
    *,
    device: str = "cpu",
    allow_nonfinite: bool = False,
    progress: bool = False,
) -> MergeResult:
    """Merge without writing: the merged weights come back as a state dict (e.g. to evaluate in memory)."""
    check_device(device)
    cfg = _as_config(config)
    sink = MemorySink()
    with SourcePool() as pool:
        plan = plan_merges([(cfg, sink)], pool=pool)
        stats = run_plan(plan, device=device, check_finite=not allow_nonfinite, progress=progress)
    return MergeResult(None, stats, sink.state_dict)
