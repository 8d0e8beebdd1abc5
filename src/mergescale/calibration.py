"""Calibration for data-aware merges: run each model on examples of its task, store statistics beside it.

Two kinds of statistics, each a safetensors file of float32 tensors named like the model's weights:

- ``fisher`` (for ``merge_method: fisher``): the diagonal empirical Fisher information of every parameter,
  F = (1/N)·Σₙ (∂ log p(yₙ | xₙ) / ∂θ)², one backward pass per example, where yₙ is the example's answer (the
  gold choice of a multiple-choice row, the first reference of a generation row) or its whole text (perplexity
  rows, text files). Matena & Raffel 2022, https://arxiv.org/abs/2111.09832.
- ``gram`` (for ``merge_method: regmean``): for every ``nn.Linear`` layer, the Gram matrix G = XᵀX of its
  inputs over every (non-padding) token of the examples, stored under the layer's weight name. Layers fed the
  same input (q, k and v projections) share one stored matrix (``aliases`` in the file's metadata). Jin et al.
  2023, https://arxiv.org/abs/2212.09849.

Where they live, found from the merge config alone (so a study that builds plans through
:func:`mergescale.api.plan_merges` finds them too): ``<model folder>/mergescale_statistics/<kind>-<key>.safetensors``
(or under ``calibration.statistics_dir``), where ``key`` hashes everything that determines them: the examples'
source and its bytes, ``examples``, ``split``, ``max_length`` and ``seed``. Files are written to a temporary
name and renamed into place, so a killed run never leaves a half-written file. ``mergescale merge`` computes
missing statistics first; ``mergescale calibrate CONFIG`` computes them alone.

Examples come from our task format (:mod:`mergescale.evaluate.tasks`: a task YAML, a folder with one task, or
``{tasks: <suite or folder>, task: <name>}``), from a JSONL file of task rows or ``{"text": ...}`` rows, or from a
text file (one example per non-empty line). ``examples`` of them are drawn with ``seed`` (all when fewer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergescale.config import CalibrationSettings, CalibrationSource, MergeConfig, TaskData
from mergescale.errors import ConfigError, InputModelError, TaskError
from mergescale.io.atomic import AtomicPath
from mergescale.io.checkpoint import SafetensorsCheckpoint, TensorInfo, resolve_model_path

log = logging.getLogger(__name__)

STATISTICS_DIR = "mergescale_statistics"
ALIASES_KEY = "aliases"


@dataclass(frozen=True)
class Example:
    """One calibration example: the model reads ``context + answer``; the Fisher scores ``answer`` given it."""

    context: str
    answer: str


# ---------------------------------------------------------------------------------------------------------------
# examples


def load_examples(source: CalibrationSource, settings: CalibrationSettings) -> list[Example]:
    """The calibration examples of one source: ``settings.examples`` of them, drawn with ``settings.seed``."""
    examples = _all_examples(source, settings.split)
    if not examples:
        raise ConfigError(f"calibration.data: {_describe(source)} holds no examples")
    if len(examples) > settings.examples:
        rng = random.Random(settings.seed)
        examples = rng.sample(examples, settings.examples)
    return examples


def _describe(source: CalibrationSource) -> str:
    return f"{source.tasks} (task {source.task})" if isinstance(source, TaskData) else str(source)


def _all_examples(source: CalibrationSource, split: str) -> list[Example]:
    from mergescale.evaluate.tasks import load_tasks

    if isinstance(source, TaskData):
        tasks = load_tasks(source.tasks, check_data=False)
        chosen = [t for t in tasks if source.task is None or t.name == source.task]
        if len(chosen) != 1:
            names = ", ".join(t.name for t in tasks)
            raise ConfigError(f"calibration.data: {_describe(source)}: name one task of {names}")
        return _task_examples(chosen[0], split)
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"calibration.data: {path} does not exist")
    if path.suffix in (".jsonl", ".json"):
        return [_row_example(row, f"{path}:{i + 1}") for i, row in enumerate(_read_jsonl(path))]
    if path.suffix == ".txt":
        return [Example("", line.strip()) for line in path.read_text().splitlines() if line.strip()]
    try:
        tasks = load_tasks(path, check_data=False)
    except TaskError as exc:
        raise ConfigError(f"calibration.data: {exc}") from None
    if len(tasks) != 1:
        raise ConfigError(
            f"calibration.data: {path} holds {len(tasks)} tasks; write {{tasks: {path}, task: <name>}}"
        )
    return _task_examples(tasks[0], split)


def _task_examples(task: Any, split: str) -> list[Example]:
    if task.data_path(split) is None:
        raise ConfigError(f"calibration.data: task {task.name!r} has no {split} split (set calibration.split)")
    delimiter = task.target_delimiter
    out = []
    for row in task.rows(split):
        if task.kind == "multiple_choice":
            out.append(Example(row.context, delimiter + row.choices[row.gold]))
        elif task.kind == "generation":
            out.append(Example(row.prompt, row.references[0]))
        else:
            out.append(Example("", row.text))
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"calibration.data: {path}:{i + 1}: not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"calibration.data: {path}:{i + 1}: expected a JSON object")
        rows.append(row)
    return rows


def _row_example(row: Mapping[str, Any], where: str) -> Example:
    if isinstance(row.get("text"), str):
        return Example("", row["text"])
    if isinstance(row.get("context"), str) and isinstance(row.get("choices"), list) and isinstance(row.get("gold"), int):
        return Example(row["context"], " " + str(row["choices"][row["gold"]]))
    if isinstance(row.get("prompt"), str) and row.get("references"):
        return Example(row["prompt"], str(row["references"][0]))
    raise ConfigError(f"calibration.data: {where}: expected 'text', 'context'/'choices'/'gold' or 'prompt'/'references'")


# ---------------------------------------------------------------------------------------------------------------
# where statistics live


def _source_fingerprint(source: CalibrationSource) -> str:
    digest = hashlib.sha256(_describe(source).encode())
    paths: list[Path] = []
    if isinstance(source, TaskData):
        paths.append(Path(source.tasks))
    else:
        paths.append(Path(source))
    for p in paths:
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if f.is_file() and f.suffix in (".yaml", ".yml", ".jsonl", ".json", ".txt"):
                digest.update(f.name.encode())
                digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


def calibration_key(settings: CalibrationSettings, source: CalibrationSource, kind: str) -> str:
    """A short hash of everything the statistics depend on (besides the model's weights)."""
    fields = {
        "kind": kind,
        "source": _source_fingerprint(source),
        "examples": settings.examples,
        "split": settings.split,
        "max_length": settings.max_length,
        "seed": settings.seed,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def statistics_path(config: MergeConfig, model: str, kind: str) -> Path:
    """Where the ``kind`` statistics of ``model`` (as written in the config) for this config's calibration are."""
    settings = config.calibration
    if settings is None:
        raise ConfigError(f"merge_method {config.merge_method!r} needs a 'calibration' block")
    folder = resolve_model_path(model)
    key = calibration_key(settings, settings.source_for(model), kind)
    if settings.statistics_dir is not None:
        tag = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
        root = Path(settings.statistics_dir) / f"{folder.name}-{tag}"
    else:
        root = folder / STATISTICS_DIR
    return root / f"{kind}-{key}.safetensors"


class StatisticsCheckpoint(SafetensorsCheckpoint):
    """A statistics file read like a checkpoint; weight names that share a stored tensor (``aliases`` in the
    metadata) read that tensor."""

    def __init__(self, path: Path) -> None:
        super().__init__(path.parent, [path])
        self.file = path
        self.aliases: dict[str, str] = {}
        self._with_aliases: dict[str, TensorInfo] | None = None

    def info(self) -> dict[str, TensorInfo]:
        if self._with_aliases is None:
            base = super().info()
            self.aliases = _read_aliases(self.file)
            self._with_aliases = {**base, **{a: base[t] for a, t in self.aliases.items() if t in base}}
        return self._with_aliases

    def _stored(self, name: str) -> str:
        self.info()
        return self.aliases.get(name, name)

    def read(self, name: str) -> torch.Tensor:
        return super().read(self._stored(name))

    def map(self, name: str) -> torch.Tensor:
        return super().map(self._stored(name))

    @property
    def config(self) -> dict[str, Any] | None:
        return None


def _read_aliases(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        return json.loads(meta.get(ALIASES_KEY, "{}"))
    except json.JSONDecodeError:
        raise InputModelError(f"{path}: bad '{ALIASES_KEY}' metadata") from None


def _write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with AtomicPath(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


# ---------------------------------------------------------------------------------------------------------------
# computing them


def _load_model(folder: Path, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds
        raise InputModelError(f"{folder}: cannot load the model for calibration ({type(exc).__name__}: {exc})") from None
    return model.to(device), tok


def _encode(tok: Any, ex: Example, max_length: int) -> tuple[list[int], int]:
    """Token ids of context + answer (cut to ``max_length`` from the left) and where the answer starts."""
    ctx = tok(ex.context, add_special_tokens=True)["input_ids"] if ex.context else []
    if ex.context:
        ans = tok(ex.answer, add_special_tokens=False)["input_ids"]
    else:
        ans = tok(ex.answer, add_special_tokens=True)["input_ids"]
    ids = (ctx + ans)[-max_length:]
    start = max(len(ids) - len(ans), 1 if not ex.context else 0)
    return ids, start


def compute_fisher(model: Any, tok: Any, examples: Sequence[Example], max_length: int,
                   progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean over examples of the squared gradient of log p(answer | context)."""
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    device = next(model.parameters()).device
    for i, ex in enumerate(examples):
        ids, start = _encode(tok, ex, max_length)
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], device=device)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=x).logits[0, :-1].float()  # (T-1, V) predicts tokens 1..T-1
        targets = x[0, 1:]
        logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)  # (T-1,)
        logp[max(start - 1, 0):].sum().backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n].add_(p.grad.float().square())
        if progress is not None:
            progress(i + 1)
    model.zero_grad(set_to_none=True)
    return {n: f / max(1, len(examples)) for n, f in fisher.items()}


def compute_grams(model: Any, tok: Any, examples: Sequence[Example], max_length: int, batch_size: int,
                  progress: Callable[[int], None] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Per linear layer, Σ over non-padding tokens of x·xᵀ of its input; layers sharing an input share one."""
    model.eval()
    grams: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    last: dict[str, Any] = {"x": None, "weight": None}
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def pre(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            weight = f"{name}.weight"
            if x is last["x"]:  # called on the very tensor the previous layer was (q, k, v; gate, up)
                aliases.setdefault(weight, last["weight"])
                return
            last["x"], last["weight"] = x, weight
            if weight in aliases:
                return
            flat = x.detach().float().reshape(-1, x.shape[-1])[mask_holder["mask"]]  # (tokens, in)
            g = flat.T @ flat  # (in, in)
            grams[weight] = grams[weight].add_(g) if weight in grams else g

        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    try:
        with torch.no_grad():
            for b in range(0, len(examples), batch_size):
                encoded = [_encode(tok, ex, max_length)[0] for ex in examples[b : b + batch_size]]
                width = max(len(ids) for ids in encoded)
                ids = torch.full((len(encoded), width), pad, dtype=torch.long)
                mask = torch.zeros((len(encoded), width), dtype=torch.bool)
                for i, row in enumerate(encoded):
                    ids[i, : len(row)] = torch.tensor(row)
                    mask[i, : len(row)] = True
                mask_holder["mask"] = mask.reshape(-1).to(device)
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
                if progress is not None:
                    progress(min(b + batch_size, len(examples)))
    finally:
        for h in handles:
            h.remove()
    last.clear()
    return grams, {a: t for a, t in aliases.items() if a not in grams}


KINDS = ("fisher", "gram")


def missing_statistics(config: MergeConfig) -> list[tuple[str, str, Path]]:
    """(model, kind, path) of every statistic the config's method needs that is not on disk yet."""
    return [
        (model, kind, path)
        for model in _calibrated_models(config)
        for kind in config.method.statistics
        if not (path := statistics_path(config, model, kind)).is_file()
    ]


def _calibrated_models(config: MergeConfig) -> list[str]:
    method = config.method
    refs = config.referenced_models()
    if method.base == "unused" and config.base_model and config.base_model not in [
        m.model for m in config.model_entries() or []
    ] + [s.model for sl in config.slice_list() or [] for s in sl.sources]:
        refs = [r for r in refs if r != config.base_model]
    return refs


def calibrate(
    config: MergeConfig,
    *,
    device: str = "cpu",
    force: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, Path]]:
    """Compute (or, unless ``force``, reuse) every statistic the config's method needs; returns their paths.

    Raises :class:`ConfigError` for a config without ``calibration`` or bad data, :class:`InputModelError` for a
    model that cannot be loaded.
    """
    settings = config.calibration
    kinds = config.method.statistics
    if not kinds:
        return {}
    if settings is None:
        raise ConfigError(f"merge_method {config.merge_method!r} needs a 'calibration' block")
    out: dict[str, dict[str, Path]] = {}
    for model in _calibrated_models(config):
        paths = {kind: statistics_path(config, model, kind) for kind in kinds}
        out[model] = paths
        todo = [k for k in kinds if force or not paths[k].is_file()]
        if not todo:
            continue
        source = settings.source_for(model)
        examples = load_examples(source, settings)
        folder = resolve_model_path(model)
        net, tok = _load_model(folder, device)
        meta = {
            "model": str(folder),
            "source": _describe(source),
            "examples": str(len(examples)),
            "split": settings.split,
            "max_length": str(settings.max_length),
            "seed": str(settings.seed),
        }
        for kind in todo:
            with _bar(progress, f"{kind} of {folder.name}", len(examples)) as tick:
                if kind == "fisher":
                    tensors, aliases = compute_fisher(net, tok, examples, settings.max_length, tick), {}
                else:
                    tensors, aliases = compute_grams(net, tok, examples, settings.max_length, settings.batch_size, tick)
            _write_atomically(paths[kind], tensors, {**meta, "kind": kind, ALIASES_KEY: json.dumps(aliases)})
            log.info("wrote %s", paths[kind])
        del net
    return out


class _bar:  # noqa: N801 - a context manager returning a progress callback
    def __init__(self, enabled: bool, what: str, total: int) -> None:
        self.enabled, self.what, self.total = enabled, what, total
        self.progress: Any = None

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.enabled:
            return None
        from rich.progress import Progress

        self.progress = Progress(transient=True)
        self.progress.__enter__()
        task = self.progress.add_task(f"calibrating: {self.what}", total=self.total)
        return lambda done: self.progress.update(task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
