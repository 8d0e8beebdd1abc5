"""Where merged tensors go: sharded safetensors model folders written atomically, or memory.

A :class:`TensorSink` is told every tensor it will receive (name, shape, dtype) before the first write, so
:class:`ModelFolderSink` lays out its shards and safetensors headers up front and writes each tensor straight to
its offset as it arrives: no shard is ever buffered in memory, and tensors may arrive in any order. Everything
is written into a hidden temporary sibling folder (:class:`mergescale.io.atomic.AtomicFolder`) that is renamed
into place only when the merge has finished, so a crash, an error or Ctrl-C never leaves a half-written model at
the output path.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mergescale.errors import ConfigError, OutputError
from mergescale.io.atomic import (  # noqa: F401 - the output checks, long imported from here
    AtomicFolder,
    check_apart_from_inputs,
    check_output_folder,
    check_writable,
)
from mergescale.io.folders import CONFIG_JSON, COPIED_FILES, copy_model_files

_TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}

Layout = Sequence[tuple[str, tuple[int, ...], torch.dtype]]


class TensorSink(Protocol):
    """Receives the merged tensors of one output model."""

    def begin(self, layout: Layout) -> None:
        """Called once, before any write, with every (name, shape, dtype) the sink will receive."""

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store one tensor (already in its output dtype). May be called from a worker thread."""

    def commit(self) -> None:
        """Finish: everything was written."""

    def abort(self) -> None:
        """Discard everything written so far."""


def parse_size(size: str | int, what: str = "max shard size") -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units, as Hugging Face uses); ``"2GiB"`` -> 2 * 2**30; ints pass.
    ``what`` names the setting in errors."""
    if isinstance(size, int):
        if size <= 0:
            raise ConfigError(f"{what} must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"{what} {size!r} is not a size like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    power = {"B": 0, "KB": 1, "MB": 2, "GB": 3, "TB": 4, "KIB": 1, "MIB": 2, "GIB": 3, "TIB": 4}[unit]
    base = 1024 if "I" in unit else 1000
    value = int(float(m.group(1)) * base**power)
    if value <= 0:
        raise ConfigError(f"{what} must be positive, got {size!r}")
    return value


def plan_shards(sizes: Sequence[int], max_shard_size: int) -> list[list[int]]:
    """Split tensors (by byte size, in order) into consecutive shards of at most ``max_shard_size`` bytes.

    A tensor larger than the limit gets a shard of its own, as Hugging Face does.
    """
    shards: list[list[int]] = []
    current: list[int] = []
    current_size = 0
    for i, size in enumerate(sizes):
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(i)
        current_size += size
    if current or not shards:
        shards.append(current)
    return shards


@dataclass
class _Slot:
    fd: int
    offset: int
    nbytes: int


class ShardedSafetensorsWriter:
    """Writes tensors of a known layout into pre-laid-out safetensors shards, each at its own offset."""

    def __init__(self, folder: Path, layout: Layout, max_shard_size: int, metadata: Mapping[str, str]) -> None:
        self.folder = folder
        self._slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self.total_bytes = 0
        sizes = [_numel(shape) * dtype.itemsize for _, shape, dtype in layout]
        shards = plan_shards(sizes, max_shard_size)
        n = len(shards)
        self.weight_map: dict[str, str] = {}
        for s, indices in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{s + 1:05d}-of-{n:05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": dict(metadata)}
            offset = 0
            for i in indices:
                name, shape, dtype = layout[i]
                if dtype not in _TORCH_TO_ST:
                    raise OutputError(f"cannot write tensor {name!r} of dtype {dtype} to safetensors")
                header[name] = {"dtype": _TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + sizes[i]]}
                offset += sizes[i]
                self.weight_map[name] = fname
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
            start = 8 + len(raw)
            fd = os.open(folder / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, start + offset)
            for i in indices:
                name = layout[i][0]
                begin = header[name]["data_offsets"][0]
                self._slots[name] = _Slot(fd, start + begin, sizes[i])
            self.total_bytes += offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self._slots[name]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != slot.nbytes:
            raise OutputError(f"tensor {name!r}: {data.nbytes} bytes, layout expected {slot.nbytes}")
        view = memoryview(data)
        written = 0
        while written < slot.nbytes:  # pwrite may write less than asked for large buffers
            written += os.pwrite(slot.fd, view[written:], slot.offset + written)
        with self._lock:
            self._written.add(name)

    def close(self) -> None:
        missing = set(self._slots) - self._written
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if missing:
            raise OutputError(f"{len(missing)} tensors were never written, e.g. {sorted(missing)[0]!r}")

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class ModelFolderSink:
    """A Hugging Face model folder: sharded safetensors (+ index), config.json, tokenizer files, extras.

    Args:
        out_dir: the final folder; refused when non-empty unless ``overwrite``.
        config: the ``config.json`` to write (``dtype`` is set to the output dtype), or None.
        copy_from: a folder to copy tokenizer files and ``generation_config.json`` from, or None.
        copy_names: which files to copy from ``copy_from`` (default: the tokenizer files and
            ``generation_config.json``).
        extra_files: more files to write, name -> text or bytes (e.g. the merge config, ``pma.json``, a built
            tokenizer); written after the copied ones, so they replace them.
        max_shard_size: bytes per shard (see :func:`parse_size`).
        overwrite: replace an existing non-empty ``out_dir``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        config: dict[str, Any] | None = None,
        copy_from: Path | None = None,
        extra_files: Mapping[str, str | bytes] | None = None,
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
        copy_names: Sequence[str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.config = dict(config) if config is not None else None
        self.copy_from = copy_from
        self.copy_names = tuple(copy_names) if copy_names is not None else COPIED_FILES
        self.extra_files = dict(extra_files or {})
        self.max_shard_size = parse_size(max_shard_size)
        self._folder = AtomicFolder(self.out_dir, overwrite=overwrite)
        self._writer: ShardedSafetensorsWriter | None = None
        self._dtypes: set[torch.dtype] = set()

    def begin(self, layout: Layout) -> None:
        tmp = self._folder.create()
        self._dtypes = {dtype for _, _, dtype in layout if dtype.is_floating_point}
        self._writer = ShardedSafetensorsWriter(tmp, layout, self.max_shard_size, {"format": "pt"})

    def write(self, name: str, tensor: torch.Tensor) -> None:
        assert self._writer is not None, "begin() first"
        self._writer.write(name, tensor)

    def commit(self) -> None:
        assert self._writer is not None and self._folder.tmp is not None, "begin() first"
        tmp = self._folder.tmp
        self._writer.close()
        if len(set(self._writer.weight_map.values())) > 1:
            index = {"metadata": {"total_size": self._writer.total_bytes}, "weight_map": self._writer.weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if self.config is not None:
            config = dict(self.config)
            if len(self._dtypes) == 1:
                dtype_name = str(next(iter(self._dtypes))).removeprefix("torch.")
                config["dtype"] = dtype_name
                if "torch_dtype" in config:
                    config["torch_dtype"] = dtype_name
            (tmp / CONFIG_JSON).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if self.copy_from is not None:
            copy_model_files(self.copy_from, tmp, self.copy_names)
        for fname, content in self.extra_files.items():
            if isinstance(content, bytes):
                (tmp / fname).write_bytes(content)
            else:
                (tmp / fname).write_text(content)
        self._folder.commit()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        self._folder.abort()


class MemorySink:
    """Keeps the merged tensors in a state dict (for evaluating a merge without writing it)."""

    def __init__(self) -> None:
        self.state_dict: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def begin(self, layout: Layout) -> None:
        self.state_dict = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        with self._lock:
            self.state_dict[name] = tensor

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        self.state_dict = {}
