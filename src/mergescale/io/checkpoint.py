"""A model folder as an index of lazily readable tensors.

:func:`open_checkpoint` turns a Hugging Face model folder (``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, or ``pytorch_model*.bin``) or a Hub id into a :class:`TensorSource`: tensor
names, shapes and dtypes come from the file headers without reading any weights, and :meth:`TensorSource.read`
loads one tensor at a time. Pickled ``.bin`` files are only ever opened with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import torch

from mergescale.errors import InputModelError
from mergescale.io.sources import (
    BIN_INDEX,
    BIN_SINGLE,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    TensorInfo,
    TensorSource,
    no_weights,
    read_config,
    weights_format,
)

__all__ = [
    "SafetensorsCheckpoint",
    "TensorInfo",
    "TensorSource",
    "TorchBinCheckpoint",
    "open_checkpoint",
    "read_config",
    "read_safetensors_header",
    "resolve_model_path",
]


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

# Bits per element of every dtype the safetensors format defines (to check a header, readable or not).
_ST_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}  # fmt: skip
# The safetensors library refuses larger headers (its MAX_HEADER_SIZE).
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a checked safetensors header: offsets are absolute positions in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(file: Path, fd: int | None = None) -> dict[str, HeaderEntry]:
    """The tensors of a safetensors file's header, checked as the ``safetensors`` library checks them
    (``Metadata::validate`` and ``read_metadata``): a header length that fits the file (at most 100 MB), a JSON
    object whose ``__metadata__`` maps strings to strings, and per tensor a known dtype, a shape and
    ``data_offsets`` of non-negative integers; sorted by offset, the tensors must tile the data section exactly:
    the first starts at 0, each starts where the previous ends (no gap, no overlap), each spans exactly the bytes
    its shape and dtype need, and the last ends where the file ends. A forged header (offsets that overlap,
    point into the header, or past the end) is refused instead of being read as weights.

    Raises:
        InputModelError: one line naming the file and, where one is at fault, the tensor.
    """
    own = fd is None
    if own:
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError as exc:
            raise InputModelError(f"{file}: cannot open ({exc.strerror or exc})") from None
    assert fd is not None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size or n > _MAX_HEADER_BYTES:
            raise InputModelError(f"{file}: not a valid safetensors file (bad header length, file of {size} bytes)")
        raw = os.pread(fd, n, 8)
    finally:
        if own:
            os.close(fd)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputModelError(f"{file}: not a valid safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise InputModelError(f"{file}: not a valid safetensors file (header is not a mapping)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputModelError(f"{file}: not a valid safetensors file (__metadata__ must map strings to strings)")
    data_start = 8 + n
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, entry in header.items():
        if name != "__metadata__":
            entries[name] = _header_entry(file, name, entry)
    expected = 0
    previous = None
    for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != expected:
            where = f"the previous tensor {previous!r} ends at {expected}" if previous else "the first must start at 0"
            raise InputModelError(
                f"{file}: tensor {name!r} starts at byte {begin} of the data section, but {where} "
                "(offsets must be contiguous and must not overlap)"
            )
        if end < begin:
            raise InputModelError(f"{file}: tensor {name!r} ends (byte {end}) before it begins (byte {begin})")
        bits = _ST_BITS[dtype]
        for d in shape:
            bits *= d
        if bits % 8 or end - begin != bits // 8:
            raise InputModelError(
                f"{file}: tensor {name!r} has {end - begin} bytes, its shape {list(shape)} and dtype {dtype} "
                f"need {bits / 8:g}"
            )
        if data_start + end > size:
            raise InputModelError(
                f"{file}: truncated file: tensor {name!r} ends at byte {data_start + end}, file has {size}"
            )
        expected, previous = end, name
    if data_start + expected != size:
        raise InputModelError(
            f"{file}: not a valid safetensors file (its tensors cover {expected} bytes of a {size - data_start}-byte "
            "data section)"
        )
    return {
        name: HeaderEntry(dtype, shape, data_start + begin, data_start + end)
        for name, (dtype, shape, begin, end) in entries.items()
    }


def _header_entry(file: Path, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    def bad(why: str) -> InputModelError:
        return InputModelError(f"{file}: not a valid safetensors file (tensor {name!r}: {why})")

    if not isinstance(entry, dict):
        raise bad("entry is not a mapping")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _ST_BITS:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets):
        raise bad(f"data_offsets {offsets!r} are not two non-negative integers")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsCheckpoint:
    """A Hugging Face folder of safetensors shards, read one tensor at a time.

    Headers are parsed and checked up front (a truncated or corrupt file fails in :meth:`info`, before any
    arithmetic). Tensors are read with ``pread`` straight into a fresh buffer: from a warm page cache that is
    several times faster than first-touching memory-mapped pages, and the GIL is released while it copies, so a
    reader thread overlaps with the computation. :meth:`map` is the zero-copy read the engine streams with.
    """

    maps_files = True

    def __init__(self, path: Path, files: list[Path]) -> None:
        self.path = path
        self._files = files
        self._fds: dict[Path, int] = {}
        self._info: dict[str, TensorInfo] | None = None
        self._offsets: dict[str, tuple[int, int]] = {}
        self._config = read_config(path)

    @property
    def config(self) -> dict[str, Any] | None:
        return self._config

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = os.open(file, os.O_RDONLY)
            except FileNotFoundError:
                raise InputModelError(f"{file}: shard listed in the index does not exist") from None
            except OSError as exc:
                raise InputModelError(f"{file}: cannot open ({exc})") from None
            self._fds[file] = fd
        return fd

    def _read_header(self, file: Path) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        for name, entry in read_safetensors_header(file, self._fd(file)).items():
            dtype = _ST_DTYPES.get(entry.dtype)
            if dtype is None:
                raise InputModelError(
                    f"{file}: tensor {name!r} has dtype {entry.dtype}, which mergescale cannot read "
                    f"({', '.join(_ST_DTYPES)})"
                )
            infos[name] = TensorInfo(entry.shape, dtype, file)
            self._offsets[name] = (entry.begin, entry.end - entry.begin)
        return infos

    def info(self) -> dict[str, TensorInfo]:
        if self._info is None:
            info: dict[str, TensorInfo] = {}
            for file in self._files:
                info.update(self._read_header(file))
            self._info = info
        return self._info

    def read(self, name: str) -> torch.Tensor:
        meta = self.info()[name]
        offset, nbytes = self._offsets[name]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(buf.numpy())
            fd = self._fd(meta.file)
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise InputModelError(f"{meta.file}: truncated while reading tensor {name!r}")
                done += got
        return buf.view(meta.dtype).reshape(meta.shape)

    def map(self, name: str, *, populate: bool = True) -> torch.Tensor:
        """One tensor as a private (copy-on-write) memory map of its bytes in the file: no copy is made, and
        reading it maps the page cache's pages. Measured here on 2.15 GB of bf16 tensors from a warm cache,
        read and converted to float32 once: 0.63 s against 0.95-1.42 s for :meth:`read` (whose copy and fresh
        buffer pages cost more system time than the conversion). The map lives as long as any tensor viewing
        it; writes (none are made) would touch private copies, never the file. The header checks of
        :meth:`info` guarantee the bytes are inside the file. With ``populate`` the page tables are filled
        before returning (see :func:`populate_map`), waiting for the read on a cold cache."""
        meta = self.info()[name]
        offset, nbytes = self._offsets[name]
        if nbytes == 0 or not hasattr(mmap, "MAP_PRIVATE"):  # no private maps (Windows): a plain read
            return self.read(name)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(
                self._fd(meta.file),
                nbytes + offset - start,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=start,
            )
        except (OSError, ValueError) as exc:
            raise InputModelError(f"{meta.file}: cannot map tensor {name!r} ({exc})") from None
        # start reading it from disk now, in the background, if it is not in the page cache: the caller maps
        # ahead of computing, so a cold read overlaps with the arithmetic instead of faulting in page by page
        if hasattr(mmap, "MADV_WILLNEED"):
            mapped.madvise(mmap.MADV_WILLNEED)
        if populate and _POPULATE:
            _populate(mapped)
        t = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset - start)
        return t.view(meta.dtype).reshape(meta.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# MADV_POPULATE_READ (Linux 5.14+; Python's mmap module names it from 3.13): fill the map's page tables now, in the
# thread that maps (the engine's reader), instead of one fault per 16 pages in the thread that computes. Measured
# here on a 0.54 GB checkpoint from a warm cache: converting it costs 0.09-0.12 s of CPU after, 0.12-0.17 s
# without; populating costs 0.02-0.03 s, off the computing threads. On a cold cache it waits for the read.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_POPULATE = os.environ.get("MERGESCALE_POPULATE", "1") != "0" and hasattr(mmap.mmap, "madvise")


def _populate(mapped: mmap.mmap) -> None:
    global _POPULATE
    try:
        mapped.madvise(_MADV_POPULATE_READ)
    except OSError:  # an older kernel (EINVAL): fault as before
        _POPULATE = False


def populate_map(t: torch.Tensor) -> None:
    """Fill the page tables of a tensor returned by ``SafetensorsCheckpoint.map(..., populate=False)`` (for
    callers that map many tensors first, so that their reads from disk overlap, then wait for them)."""
    if not _POPULATE or t.numel() == 0:
        return
    import ctypes

    global _LIBC_MADVISE
    if _LIBC_MADVISE is None:
        _LIBC_MADVISE = ctypes.CDLL(None, use_errno=True).madvise
    addr = t.data_ptr()
    start = addr - addr % mmap.PAGESIZE
    _LIBC_MADVISE(ctypes.c_void_p(start), ctypes.c_size_t(t.numel() * t.element_size() + addr - start),
                  _MADV_POPULATE_READ)  # fmt: skip


_LIBC_MADVISE = None

# Releasing consumed pages of a map (Linux: MADV_DONTNEED on a private map that was never written drops its page
# table entries and nothing else; the page cache keeps the file's bytes). MERGESCALE_RELEASE=0 turns it off.
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
_RELEASE = sys.platform.startswith("linux") and os.environ.get("MERGESCALE_RELEASE", "1") != "0"


def release_map_pages(t: torch.Tensor, start: int, stop: int) -> None:
    """Let go of the memory pages under entries ``start`` … ``stop − 1`` of a flat tensor returned by
    ``SafetensorsCheckpoint.map`` (only whole pages inside the range; a no-op off Linux).

    For callers that read a large map once, front to back: the pages read so far stop counting in the
    process's memory (a curve maps 29 checkpoints' embeddings at once, 1.9 GB on the 268M benchmark). Reading
    them again is correct and maps them again from the page cache: the map is private and never written, so
    its bytes are the file's. Never call it on any other tensor: on anonymous memory it would zero the pages.
    """
    if not _RELEASE or stop <= start:
        return
    import ctypes

    global _LIBC_MADVISE
    if _LIBC_MADVISE is None:
        _LIBC_MADVISE = ctypes.CDLL(None, use_errno=True).madvise
    size = t.element_size()
    lo = t.data_ptr() + start * size
    hi = t.data_ptr() + stop * size
    lo += -lo % mmap.PAGESIZE  # whole pages inside the range only
    hi -= hi % mmap.PAGESIZE
    if hi > lo:
        _LIBC_MADVISE(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


class TorchBinCheckpoint:
    """``pytorch_model*.bin`` files, loaded with ``weights_only=True`` and memory-mapped, one file at a time."""

    maps_files = False  # torch.load's maps are its own: map() is read()

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
            raise InputModelError(_load_refusal(file, exc)) from None
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

    def map(self, name: str) -> torch.Tensor:
        return self.read(name)

    def close(self) -> None:
        self._loaded = None


def _load_refusal(file: Path, exc: Exception) -> str:
    """torch.load's error as one line. A pickle calling code gives a paragraph about the default of
    ``weights_only``; only the line saying what it tried to load is kept."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        detail = [line for line in lines[1:] if not line.startswith(("Check the documentation", "Please file"))]
        reason = detail[0] if detail else lines[0].split(".")[0]
        return f"{file}: refused by torch.load(weights_only=True), it holds more than tensors: {reason}"
    reason = lines[0] if lines else type(exc).__name__
    return f"{file}: cannot load with torch.load(weights_only=True) ({type(exc).__name__}: {reason})"


def _index_files(index_path: Path) -> list[Path]:
    """The shard files an index lists, each inside the model folder: a shard path that is absolute or climbs out
    of it (``../other/model.safetensors``) is refused, so an index cannot make mergescale read other files.
    (Symbolic links are followed: the Hugging Face cache links every file of a snapshot to a blob outside it.)"""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputModelError(f"{index_path}: not a valid index file ({exc})") from None
    if not isinstance(weight_map, dict):
        raise InputModelError(f"{index_path}: not a valid index file (weight_map is not a mapping)")
    files = []
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise InputModelError(f"{index_path}: tensor {name!r}: shard {shard!r} is not a file name")
        parts = PurePosixPath(shard.replace("\\", "/")).parts
        if PurePath(shard).is_absolute() or shard.startswith(("/", "\\")) or ".." in parts or ":" in shard:
            raise InputModelError(
                f"{index_path}: tensor {name!r}: shard path {shard!r} leaves the model folder; refused"
            )
        files.append(shard)
    return [index_path.parent / f for f in dict.fromkeys(files)]


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def looks_like_hub_id(ref: str | Path) -> bool:
    """Whether a reference that is no local folder may be a Hub id: a string ``namespace/name`` whose first
    part is not a local folder either (``models/base`` beside a ``models/`` folder is a missing local path)."""
    return (
        isinstance(ref, str)
        and bool(_HUB_ID.match(ref))
        and not ref.startswith(".")
        and not Path(ref.split("/")[0]).exists()
    )


def missing_model_path(ref: str | Path) -> InputModelError:
    """The error for a local model path that does not exist, naming the deepest part of it that does."""
    path = Path(ref).expanduser()
    existing = next((p for p in path.parents if str(p) not in ("", ".") and p.is_dir()), None)
    hint = f" ({existing} has no {path.relative_to(existing).parts[0]!r})" if existing is not None else ""
    return InputModelError(f"model path {ref} does not exist{hint}")


def resolve_model_path(ref: str | Path) -> Path:
    """A local folder, or a Hub id downloaded (weights, config and tokenizer only) with huggingface_hub."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputModelError(f"{path}: expected a model folder, got a file")
        return path
    if looks_like_hub_id(ref):
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(
                ref,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            )
        except Exception as exc:  # offline, missing repo, auth: all the same to the user
            first = (str(exc).strip().splitlines() or [""])[0]
            raise InputModelError(
                f"model {ref!r}: no such local folder, and the Hub download failed ({type(exc).__name__}: {first})"
            ) from None
        return Path(local)
    raise missing_model_path(ref)


def open_checkpoint(ref: str | Path) -> TensorSource:
    """Open a model folder (or Hub id, or PyTorch distributed checkpoint) as a lazily readable TensorSource."""
    folder = resolve_model_path(ref)
    kind = weights_format(folder)
    if kind == "dcp":
        from mergescale.io.dcp import DCPCheckpoint  # only needed for torch.distributed.checkpoint folders

        return DCPCheckpoint(folder)
    if kind == "safetensors-index":
        return SafetensorsCheckpoint(folder, _index_files(folder / SAFETENSORS_INDEX))
    if kind == "safetensors":
        return SafetensorsCheckpoint(folder, [folder / SAFETENSORS_SINGLE])
    if kind == "bin-index":
        return TorchBinCheckpoint(folder, _index_files(folder / BIN_INDEX))
    if kind == "bin":
        return TorchBinCheckpoint(folder, [folder / BIN_SINGLE])
    if kind == "safetensors-loose":
        return SafetensorsCheckpoint(folder, sorted(folder.glob("*.safetensors")))
    raise no_weights(folder)


def iter_tensors(source: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a source, one at a time, in header order."""
    for name in source.info():
        yield name, source.read(name)
