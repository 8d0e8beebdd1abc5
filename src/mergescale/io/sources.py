"""What the engine reads tensors from: the :class:`TensorSource` protocol, :class:`TensorInfo`, and which
format a folder of weights is in.

Readers (:mod:`.checkpoint`: safetensors and ``pytorch_model*.bin``; :mod:`.dcp`: PyTorch distributed
checkpoints; :mod:`mergescale.calibration`'s statistics files) implement the protocol; every caller — the engine,
discovery of a run's checkpoints, the held-out loss — detects formats here, so each rule is written once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from mergescale.errors import InputModelError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
DCP_METADATA = ".metadata"  # the pickled metadata file of a torch.distributed.checkpoint folder

Format = Literal["dcp", "safetensors-index", "safetensors", "bin-index", "bin", "safetensors-loose"]


@dataclass(frozen=True)
class TensorInfo:
    """What a file header says about one tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@runtime_checkable
class TensorSource(Protocol):
    """Anything the engine can stream tensors from: a model folder, a distributed checkpoint, statistics...

    ``map`` is the zero-copy read: a view of the file's pages where the format allows it (``maps_files``), else
    the same as ``read``. The engine always reads through ``map``.
    """

    path: Path
    maps_files: bool  # whether map() returns views of file-backed (page cache) memory

    @property
    def config(self) -> dict[str, Any] | None:
        """The model's ``config.json`` as a dict, when it has one."""

    def info(self) -> dict[str, TensorInfo]:
        """Name -> shape, dtype and file of every tensor, read from headers only."""

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor (CPU, stored dtype) into memory of its own."""

    def map(self, name: str) -> torch.Tensor:
        """One tensor without a copy where the format allows (else :meth:`read`)."""

    def close(self) -> None:
        """Release open files."""


def read_config(folder: Path) -> dict[str, Any] | None:
    """``config.json`` of a model folder as a dict, or None when there is none."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputModelError(f"{path}: cannot read config.json ({exc})") from None


def is_dcp(folder: Path) -> bool:
    """Whether ``folder`` is a PyTorch distributed checkpoint (it holds the ``.metadata`` file)."""
    return (folder / DCP_METADATA).is_file()


def weights_format(folder: Path) -> Format | None:
    """The format of the weights ``folder`` itself holds, in the order a reader prefers them, or None."""
    if is_dcp(folder):
        return "dcp"
    for name, kind in (
        (SAFETENSORS_INDEX, "safetensors-index"),
        (SAFETENSORS_SINGLE, "safetensors"),
        (BIN_INDEX, "bin-index"),
        (BIN_SINGLE, "bin"),
    ):
        if (folder / name).is_file():
            return kind  # type: ignore[return-value]
    if any(folder.glob("*.safetensors")):
        return "safetensors-loose"
    return None


def no_weights(folder: Path) -> InputModelError:
    """The error for a folder without model weights."""
    return InputModelError(
        f"{folder}: no model weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE}, "
        f"{BIN_INDEX} or a distributed checkpoint's {DCP_METADATA})"
    )
