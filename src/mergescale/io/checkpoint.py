"""A model folder as an index of lazily readable tensors.

:func:`open_checkpoint` turns a Hugging Face model folder (``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, or ``pytorch_model*.bin``) or a Hub id into a :class:`TensorSource`: tensor
names, shapes and dtypes come from the file headers without reading any weights, and :meth:`TensorSource.read`
loads one tensor at a time. Pickled ``.bin`` files are only ever opened with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open

from mergescale.errors import InputModelError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# safetensors' dtype names -> torch dtypes (the subset models are stored in)
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


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
    """Anything the engine can stream tensors from: a model folder, a distributed checkpoint, ..."""

    path: Path

    @property
    def config(self) -> dict[str, Any] | None:
        """The model's ``config.json`` as a dict, when it has one."""

    def info(self) -> dict[str, TensorInfo]:
        """Name -> shape, dtype and file of every tensor, read from headers only."""

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor (CPU, stored dtype)."""

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


class SafetensorsCheckpoint:
    """A Hugging Face folder of safetensors shards, opened lazily (memory-mapped, one tensor at a time)."""

    def __init__(self, path: Path, files: list[Path]) -> None:
        self.path = path
        self._files = files
        self._handles: dict[Path, Any] = {}
        self._info: dict[str, TensorInfo] | None = None
        self._config = read_config(path)

    @property
    def config(self) -> dict[str, Any] | None:
        return self._config

    def _handle(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            if not file.is_file():
                raise InputModelError(f"{file}: shard listed in the index does not exist")
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise InputModelError(f"{file}: not a valid safetensors file ({exc})") from None
            self._handles[file] = handle
        return handle

    def info(self) -> dict[str, TensorInfo]:
        if self._info is None:
            info: dict[str, TensorInfo] = {}
            for file in self._files:
                handle = self._handle(file)
                for name in handle.keys():
                    sl = handle.get_slice(name)
                    dtype = _ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise InputModelError(f"{file}: tensor {name!r} has unsupported dtype {sl.get_dtype()}")
                    info[name] = TensorInfo(tuple(sl.get_shape()), dtype, file)
            self._info = info
        return self._info

    def read(self, name: str) -> torch.Tensor:
        file = self.info()[name].file
        try:
            return self._handle(file).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise InputModelError(f"{file}: cannot read tensor {name!r} ({exc})") from None

    def close(self) -> None:
        self._handles.clear()


class TorchBinCheckpoint:
    """``pytorch_model*.bin`` files, loaded with ``weights_only=True`` and memory-mapped, one file at a time."""

    def __init__(self, path: Path, files: list[Path]) -> None:
        self.path = path
        self._files = files
        self._loaded: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._info: dict[str, TensorInfo] | None = None
        self._config = read_config(path)

    @property
    def config(self) -> dict[str, Any] | None:
        return self._config

    def _load(self, file: Path) -> dict[str, torch.Tensor]:
        if self._loaded is not None and self._loaded[0] == file:
            return self._loaded[1]
        try:
            # weights_only: never run pickled code from a checkpoint; mmap: read lazily from disk
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for a bad pickle
            raise InputModelError(f"{file}: cannot load with weights_only=True ({type(exc).__name__}: {exc})") from None
        if not isinstance(state, dict):
            raise InputModelError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
        self._loaded = (file, state)
        return state

    def info(self) -> dict[str, TensorInfo]:
        if self._info is None:
            info: dict[str, TensorInfo] = {}
            for file in self._files:
                for name, t in self._load(file).items():
                    if isinstance(t, torch.Tensor):
                        info[name] = TensorInfo(tuple(t.shape), t.dtype, file)
            self._info = info
        return self._info

    def read(self, name: str) -> torch.Tensor:
        return self._load(self.info()[name].file)[name]

    def close(self) -> None:
        self._loaded = None


def _index_files(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputModelError(f"{index_path}: not a valid index file ({exc})") from None
    return [index_path.parent / f for f in dict.fromkeys(weight_map.values())]


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_model_path(ref: str | Path) -> Path:
    """A local folder, or a Hub id downloaded (weights, config and tokenizer only) with huggingface_hub."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputModelError(f"{path}: expected a model folder, got a file")
        return path
    if isinstance(ref, str) and _HUB_ID.match(ref):
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(
                ref,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            )
        except Exception as exc:  # offline, missing repo, auth: all the same to the user
            raise InputModelError(
                f"model {ref!r}: no such local folder, and the Hub download failed ({type(exc).__name__}: {exc})"
            ) from None
        return Path(local)
    raise InputModelError(f"model path {ref} does not exist")


def open_checkpoint(ref: str | Path) -> TensorSource:
    """Open a model folder (or Hub id, or PyTorch distributed checkpoint) as a lazily readable TensorSource."""
    folder = resolve_model_path(ref)
    if (folder / ".metadata").is_file():
        from mergescale.io.dcp import DCPCheckpoint  # only needed for torch.distributed.checkpoint folders

        return DCPCheckpoint(folder)
    if (folder / SAFETENSORS_INDEX).is_file():
        return SafetensorsCheckpoint(folder, _index_files(folder / SAFETENSORS_INDEX))
    if (folder / SAFETENSORS_SINGLE).is_file():
        return SafetensorsCheckpoint(folder, [folder / SAFETENSORS_SINGLE])
    if (folder / BIN_INDEX).is_file():
        return TorchBinCheckpoint(folder, _index_files(folder / BIN_INDEX))
    if (folder / BIN_SINGLE).is_file():
        return TorchBinCheckpoint(folder, [folder / BIN_SINGLE])
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return SafetensorsCheckpoint(folder, loose)
    raise InputModelError(
        f"{folder}: no model weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
        f"{BIN_SINGLE} or {BIN_INDEX})"
    )


def iter_tensors(source: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a source, one at a time, in header order."""
    for name in source.info():
        yield name, source.read(name)
