"""A PyTorch distributed checkpoint (``torch.distributed.checkpoint``) folder as a lazily readable TensorSource.

torchtitan, OLMo-core, Megatron's ``torch_dist`` format and FSDP2 training loops save a folder with a
``.metadata`` file and ``__<rank>_<n>.distcp`` shards. :class:`DCPCheckpoint` lists the model tensors from the
metadata alone and reads one tensor at a time with torch's own reader (``torch.distributed.checkpoint.load`` with
``no_dist=True``: no process group is needed), which also reassembles tensors saved in chunks by many ranks.

Safety: DCP's ``.metadata`` file is a pickle, which torch unpickles without restriction; we read it once with an
unpickler that only builds DCP's own metadata classes, torch dtypes/sizes/layouts and paths, and hand that
object to torch's reader, so a crafted checkpoint cannot run code. Tensor payloads are read by torch with
``torch.load(weights_only=True)``. Non-tensor entries (``BytesStorageMetadata``: step counters, param groups,
data-loader state) are never read.

Which entries are model weights. DCP flattens a nested state dict into dotted names and records the original
key path of each. Entries under an optimizer, scheduler, data-loader, RNG or train-state group (see
:data:`NON_MODEL_GROUPS`) are ignored. When the trainer wrapped the model's state dict in a group (``{"model":
model.state_dict(), "optim": ...}``, as OLMo-core and HF-style trainers do) that group's name is stripped, so
``model.model.layers.0.mlp.up_proj.weight`` reads back as ``model.layers.0.mlp.up_proj.weight``, and entries
outside the model group are ignored. torchtitan already flattens model weights to the top level: names are
kept as they are. For checkpoints without the key paths (very old torch), a common ``model.`` or ``module.``
prefix shared by every tensor is stripped. Pass ``strip_prefix=""`` to keep names exactly as stored.
"""

from __future__ import annotations

import io
import logging
import pickle
import warnings
from dataclasses import is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from mergescale.errors import InputModelError
from mergescale.io.sources import DCP_METADATA, TensorInfo, read_config

log = logging.getLogger(__name__)

MODEL_GROUPS = ("model", "module", "model_state_dict", "state_dict")
NON_MODEL_GROUPS = frozenset(
    {
        "optim",
        "optimizer",
        "optimizers",
        "optim_state",
        "optimizer_state",
        "optimizer_state_dict",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "schedulers",
        "dataloader",
        "data_loader",
        "train_state",
        "trainer",
        "trainer_state",
        "rng",
        "rng_state",
        "rng_states",
        "args",
        "config",
    }
)

# plain constructors that run no code of the file's choosing
_SAFE_GLOBALS = frozenset(
    {
        ("torch.serialization", "_get_layout"),  # maps a layout's name to the torch.layout
        *(("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata objects and nothing else (no functions that could run code)."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") or module.startswith(
            "torch.distributed._shard."
        ):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (is_dataclass(obj) or issubclass(obj, Enum)):
                return obj
        elif module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, torch.dtype | torch.layout | torch.memory_format):
                return obj
        elif (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


def load_metadata(folder: Path) -> Any:
    """The ``.metadata`` of a DCP folder, unpickled with :class:`_MetadataUnpickler`."""
    path = folder / DCP_METADATA
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        AttributeError,
        ImportError,
        TypeError,
        ValueError,
    ) as exc:
        raise InputModelError(
            f"{path}: not a readable torch.distributed.checkpoint metadata file ({exc})"
        ) from None
    if not hasattr(metadata, "state_dict_metadata") or not hasattr(metadata, "storage_data"):
        raise InputModelError(f"{path}: not a torch.distributed.checkpoint metadata file")
    return metadata


def _names(metadata: Any, strip_prefix: str | None) -> dict[str, str]:
    """Output tensor name -> stored (flattened) key, for the model's tensors only."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    paths: dict[str, tuple[Any, ...]] = dict(getattr(metadata, "planner_data", None) or {})
    tensors = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]
    tensors = [k for k in tensors if not k.endswith("._extra_state")]
    keep: list[tuple[str, tuple[str, ...]]] = []
    for key in tensors:
        path = tuple(str(p) for p in paths.get(key, (key,)))
        if path[0].split(".")[0] in NON_MODEL_GROUPS:
            continue
        keep.append((key, path))
    if strip_prefix is not None:
        return {(k.removeprefix(strip_prefix) if strip_prefix else k): k for k, _ in keep}
    wrapped = [(k, p) for k, p in keep if len(p) > 1 and p[0] in MODEL_GROUPS]
    if wrapped:
        ignored = len(keep) - len(wrapped)
        if ignored:
            log.info("DCP checkpoint: %d tensors outside the model group ignored", ignored)
        return {".".join(p[1:]): k for k, p in wrapped}
    if not paths:
        for prefix in ("model.", "module."):
            if keep and all(k.startswith(prefix) for k, _ in keep):
                return {k.removeprefix(prefix): k for k, _ in keep}
    return {k: k for k, _ in keep}


def _first_line(exc: BaseException) -> str:
    """A one-line reason: torch wraps the reader's error (with its traceback) in CheckpointException."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        exc = getattr(inner, "exc", inner)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class DCPCheckpoint:
    """A ``torch.distributed.checkpoint`` folder, read one tensor at a time in one process.

    Args:
        folder: the folder with ``.metadata`` and ``*.distcp`` files.
        strip_prefix: None (default) to strip the model group found in the metadata (see the module docstring);
            a string to strip exactly that prefix from every stored name; ``""`` to keep names as stored.

    ``config`` is the ``config.json`` of the folder, or of its parent or grandparent (a run folder), when any.
    """

    maps_files = False  # every tensor is loaded by torch.distributed.checkpoint: map() is read()

    def __init__(self, folder: str | Path, *, strip_prefix: str | None = None) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.path = Path(folder)
        if not (self.path / DCP_METADATA).is_file():
            raise InputModelError(
                f"{self.path}: no {DCP_METADATA} file (not a torch.distributed.checkpoint folder)"
            )
        self._metadata = load_metadata(self.path)
        self._keys = _names(self._metadata, strip_prefix)
        metadata = self._metadata

        class _Reader(FileSystemReader):  # torch's reader, fed the metadata we unpickled safely
            def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
                return metadata

        self._reader = _Reader(str(self.path))
        self._config = next(
            (
                cfg
                for cfg in (read_config(p) for p in (self.path, self.path.parent, self.path.parent.parent))
                if cfg
            ),
            None,
        )
        self._info: dict[str, TensorInfo] | None = None

    @property
    def config(self) -> dict[str, Any] | None:
        return self._config

    @property
    def stored_names(self) -> dict[str, str]:
        """Tensor name -> the key it is stored under."""
        return dict(self._keys)

    def info(self) -> dict[str, TensorInfo]:
        if self._info is None:
            files: dict[str, Path] = {}
            for index, storage in self._metadata.storage_data.items():
                files.setdefault(index.fqn, self.path / storage.relative_path)
            info: dict[str, TensorInfo] = {}
            for name, key in self._keys.items():
                md = self._metadata.state_dict_metadata[key]
                info[name] = TensorInfo(
                    tuple(md.size), md.properties.dtype, files.get(key, self.path / DCP_METADATA)
                )
            self._info = info
        return self._info

    def read(self, name: str) -> torch.Tensor:
        from torch.distributed.checkpoint import CheckpointException, load

        key = self._keys.get(name)
        if key is None:
            raise InputModelError(f"{self.path}: no tensor {name!r}")
        info = self.info()[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        try:
            with warnings.catch_warnings():
                # torch warns on every load that no process group exists: that is exactly our intent
                warnings.filterwarnings(
                    "ignore", message=r"torch\.distributed is (disabled|unavailable)", category=UserWarning
                )
                load({key: out}, storage_reader=self._reader, no_dist=True)
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            raise InputModelError(
                f"{info.file}: cannot read tensor {name!r} of {self.path} ({_first_line(exc)})"
            ) from None
        return out

    def map(self, name: str) -> torch.Tensor:
        return self.read(name)

    def close(self) -> None:
        """Nothing stays open between reads."""
