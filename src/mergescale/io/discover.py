"""Find the checkpoints of a training run and order them by step; read what the trainer logged.

Layouts recognised in a run folder (its direct sub-folders, or those of a ``checkpoint/`` or ``checkpoints/``
sub-folder when the run folder has none):

- Hugging Face Trainer: ``checkpoint-<step>/`` (``model.safetensors`` or shards, ``trainer_state.json``, ...);
- folders named by step: ``step_<n>``, ``step-<n>``, ``step<n>``, ``iter_<n>`` (Megatron, zero-padded),
  ``global_step<n>`` (DeepSpeed);
- PyTorch distributed checkpoints (``torch.distributed.checkpoint``: a ``.metadata`` file and ``*.distcp``
  shards), as torchtitan, Megatron's ``torch_dist`` format and OLMo-core save them, either directly in the step
  folder or in one sub-folder of it (OLMo-core's ``step<n>/model_and_optim/``).

Only weights are ever opened (by :func:`mergescale.io.checkpoint.open_checkpoint`, later); optimizer, scheduler
and RNG files are never read. ``trainer_state.json`` gives the tokens seen at each checkpoint
(``num_input_tokens_seen``, when the Trainer counted them) and the loss log (``log_history``). Folders written by
mergescale itself (``pma-<step>/``) are not checkpoints and are skipped.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergescale.errors import ConfigError, InputModelError
from mergescale.io.sources import is_dcp, weights_format

TRAINER_STATE = "trainer_state.json"

# checkpoint-100, step_100, step-100, step100, iter_0000100, global_step100
_STEP_NAME = re.compile(r"^(?:checkpoint|step|iter|global_step|global-step)[-_]?(\d+)$", re.IGNORECASE)
_NESTED_RUN_FOLDERS = ("checkpoints", "checkpoint")
LAYOUTS = (
    "checkpoint-<step>/, step_<n>/, step<n>/, iter_<n>/, global_step<n>/ (safetensors, .bin or torch DCP)"
)


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of a run.

    Attributes:
        path: the folder holding the weights (what :func:`open_checkpoint` opens).
        step: the training step, from the folder name or ``trainer_state.json``; None when unknown.
        tokens: tokens seen when it was saved, when known.
        name: how tables and errors name it (the step folder's name).
        kind: ``"hf"`` (safetensors / .bin model folder) or ``"dcp"`` (torch distributed checkpoint).
        folder: the step folder (holds ``trainer_state.json``); ``path`` or its parent.
    """

    path: Path
    step: int | None
    tokens: int | None
    name: str
    kind: str
    folder: Path

    @property
    def label(self) -> str:
        """How errors name it: its step folder's path."""
        return str(self.folder)


@dataclass(frozen=True)
class LossPoint:
    """One logged training loss (NaN and Inf are kept: a diverged run logs them)."""

    step: int
    loss: float


@dataclass
class RunInfo:
    """What a run folder (or an explicit list of checkpoints) holds, oldest checkpoint first."""

    root: Path | None
    checkpoints: list[CheckpointRef]
    loss_log: list[LossPoint] = field(default_factory=list)
    loss_log_source: Path | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def steps(self) -> list[int | None]:
        return [c.step for c in self.checkpoints]


def step_from_name(name: str) -> int | None:
    """The step encoded in a folder name (``checkpoint-100``, ``iter_0000100``, ...), or None."""
    m = _STEP_NAME.match(name)
    return int(m.group(1)) if m else None


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` itself holds model weights (HF files, loose safetensors or a DCP ``.metadata``)."""
    return weights_format(folder) is not None


def weights_folder(folder: Path) -> tuple[Path, str] | None:
    """The folder holding a checkpoint's weights and its kind (``hf``/``dcp``), or None.

    A step folder may hold the weights itself or, as OLMo-core does, in exactly one sub-folder with a DCP
    ``.metadata`` file.
    """
    kind = weights_format(folder)
    if kind is not None:
        return folder, "dcp" if kind == "dcp" else "hf"
    nested = [sub for sub in sorted(folder.iterdir()) if sub.is_dir() and is_dcp(sub)]
    if len(nested) == 1:
        return nested[0], "dcp"
    return None


def read_trainer_state(folder: Path) -> dict[str, Any] | None:
    """``trainer_state.json`` of a folder as a dict, or None when there is none."""
    path = folder / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputModelError(f"{path}: cannot read trainer state ({exc})") from None
    if not isinstance(state, dict):
        raise InputModelError(f"{path}: expected a JSON object")
    return state


def _tokens(state: dict[str, Any] | None) -> int | None:
    # The Trainer writes 0 when it did not count tokens (include_num_input_tokens_seen off)
    if state is None:
        return None
    tokens = state.get("num_input_tokens_seen")
    return int(tokens) if isinstance(tokens, int | float) and tokens > 0 else None


def _checkpoint(folder: Path, step: int | None, tokens_per_step: int | None) -> CheckpointRef | None:
    found = weights_folder(folder)
    if found is None:
        return None
    path, kind = found
    state = read_trainer_state(folder)
    if step is None and state is not None and isinstance(state.get("global_step"), int):
        step = int(state["global_step"])
    tokens = _tokens(state)
    if tokens is None and tokens_per_step is not None and step is not None:
        tokens = step * tokens_per_step
    return CheckpointRef(path=path, step=step, tokens=tokens, name=folder.name, kind=kind, folder=folder)


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    out = []
    for sub in root.iterdir():
        step = step_from_name(sub.name)
        if step is not None and sub.is_dir():
            out.append((step, sub))
    return out


def discover_run(run_dir: str | Path, *, tokens_per_step: int | None = None) -> RunInfo:
    """Find, order and describe the checkpoints of a training run.

    Args:
        run_dir: the run's output folder.
        tokens_per_step: tokens per optimizer step, used for checkpoints whose ``trainer_state.json`` does not
            record ``num_input_tokens_seen`` (e.g. DCP runs): tokens = step × tokens_per_step.

    Raises:
        InputModelError: the folder does not exist, is itself a single checkpoint, holds no checkpoints, or
            two folders claim the same step.
    """
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise InputModelError(f"run folder {root} does not exist")
    candidates = _step_folders(root)
    if not candidates:
        for nested in _NESTED_RUN_FOLDERS:
            if (root / nested).is_dir():
                candidates = _step_folders(root / nested)
                if candidates:
                    break
    if not candidates and has_weights(root):
        raise InputModelError(
            f"{root} is a single model folder, not a run; pass the run folder that holds its checkpoints, "
            f"or list checkpoints explicitly (--checkpoints A B C)"
        )
    checkpoints: list[CheckpointRef] = []
    skipped: list[tuple[Path, str]] = []
    for step, folder in sorted(candidates, key=lambda c: (c[0], c[1].name)):
        ref = _checkpoint(folder, step, tokens_per_step)
        if ref is None:
            skipped.append(
                (folder, "no model weights (model.safetensors, pytorch_model.bin or DCP .metadata)")
            )
            continue
        if checkpoints and checkpoints[-1].step == step:
            raise InputModelError(
                f"{checkpoints[-1].folder} and {folder} both claim step {step}; keep one of them"
            )
        checkpoints.append(ref)
    if not checkpoints:
        why = f"; skipped {', '.join(f'{p.name} ({r})' for p, r in skipped[:3])}" if skipped else ""
        raise InputModelError(f"no checkpoints found in {root} (looked for {LAYOUTS}){why}")
    info = RunInfo(root=root, checkpoints=checkpoints, skipped=skipped)
    info.loss_log, info.loss_log_source = run_loss_log(root, checkpoints)
    return info


def checkpoints_from_paths(paths: Sequence[str | Path], *, tokens_per_step: int | None = None) -> RunInfo:
    """An explicit list of checkpoint folders, ordered by step when every folder has one, else as given.

    A folder's step comes from its name or its ``trainer_state.json``.
    """
    if not paths:
        raise ConfigError("no checkpoints given")
    refs: list[CheckpointRef] = []
    for p in paths:
        folder = Path(p).expanduser()
        if not folder.is_dir():
            raise InputModelError(f"checkpoint {folder} does not exist or is not a folder")
        ref = _checkpoint(folder, step_from_name(folder.name), tokens_per_step)
        if ref is None:
            raise InputModelError(
                f"{folder}: no model weights found (model.safetensors, pytorch_model.bin or DCP .metadata)"
            )
        refs.append(ref)
    if len({r.path.resolve() for r in refs}) != len(refs):
        raise ConfigError("the same checkpoint is listed twice")
    if all(r.step is not None for r in refs):
        refs.sort(key=lambda r: r.step or 0)
        for a, b in zip(refs, refs[1:], strict=False):
            if a.step == b.step:
                raise InputModelError(f"{a.folder} and {b.folder} both claim step {a.step}; keep one of them")
    info = RunInfo(root=None, checkpoints=refs)
    info.loss_log, info.loss_log_source = run_loss_log(None, refs)
    return info


def run_loss_log(
    root: Path | None, checkpoints: Sequence[CheckpointRef]
) -> tuple[list[LossPoint], Path | None]:
    """The most complete ``log_history`` of a run: the ``trainer_state.json`` with the largest global step,
    among the run folder's own and its checkpoints'."""
    best: tuple[int, Path, dict[str, Any]] | None = None
    folders = ([root] if root is not None else []) + [c.folder for c in checkpoints]
    for folder in folders:
        state = read_trainer_state(folder)
        if state is None:
            continue
        step = int(state.get("global_step") or 0)
        if best is None or step > best[0]:
            best = (step, folder / TRAINER_STATE, state)
    if best is None:
        return [], None
    return loss_points_from_history(best[2].get("log_history") or [], best[1]), best[1]


def loss_points_from_history(history: list[Any], source: Path) -> list[LossPoint]:
    """Training-loss entries (``{"step": s, "loss": x}``) of a Trainer ``log_history``; eval entries skipped."""
    points = []
    for entry in history:
        if isinstance(entry, dict) and "loss" in entry and "step" in entry:
            points.append(
                LossPoint(int(entry["step"]), _as_loss(entry["loss"], source, f"step {entry['step']}"))
            )
    return points


def _as_loss(value: Any, source: Path, where: str) -> float:
    try:
        loss = float(value)
    except (TypeError, ValueError):
        raise InputModelError(f"{source}: {where}: loss {value!r} is not a number") from None
    return loss


def read_loss_log(path: str | Path) -> list[LossPoint]:
    """A loss log: a ``trainer_state.json`` (its ``log_history``), a CSV with ``step`` and ``loss`` columns, or
    JSON Lines with ``step`` and ``loss`` keys (other keys and rows without a loss are ignored). Sorted by step."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputModelError(f"loss log {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputModelError(
            f"{path}: not a text loss log (binary data; expected trainer_state.json, CSV or JSON Lines)"
        ) from None
    except OSError as exc:
        raise InputModelError(f"loss log {path}: cannot read ({exc.strerror or exc})") from None
    points: list[LossPoint] = []
    if path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not {"step", "loss"} <= {f.strip() for f in reader.fieldnames}:
            raise InputModelError(
                f"{path}: a CSV loss log needs 'step' and 'loss' columns, got {reader.fieldnames}"
            )
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): v for k, v in row.items() if k is not None}
            if row.get("loss") in (None, ""):
                continue
            points.append(
                LossPoint(_as_step(row["step"], path, line), _as_loss(row["loss"], path, f"line {line}"))
            )
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputModelError(f"{path}: not valid JSON ({exc})") from None
        history = data.get("log_history") if isinstance(data, dict) else data
        if not isinstance(history, list):
            raise InputModelError(
                f"{path}: expected a trainer_state.json with log_history, or a list of entries"
            )
        points = loss_points_from_history(history, path)
    else:
        for line, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise InputModelError(f"{path}: line {line}: not valid JSON ({exc})") from None
            if not isinstance(row, dict) or "step" not in row:
                raise InputModelError(f"{path}: line {line}: expected an object with 'step' and 'loss'")
            if row.get("loss") is None:
                continue
            points.append(
                LossPoint(_as_step(row["step"], path, line), _as_loss(row["loss"], path, f"line {line}"))
            )
    if not points:
        raise InputModelError(f"{path}: no training loss entries (need 'step' and 'loss')")
    return sorted(points, key=lambda p: p.step)


def _as_step(value: Any, source: Path, line: int) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        raise InputModelError(f"{source}: line {line}: step {value!r} is not a number") from None
