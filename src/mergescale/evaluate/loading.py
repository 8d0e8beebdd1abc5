"""Load the model to evaluate (folder, Hub id or an object already in memory) and compute its identity.

Identity hash (``ModelIdentity.hash``, 16 hex digits of SHA-256):

* a folder: ``config.json``, the weight index (``*.index.json``) and, for every weight file, its name, size,
  safetensors header (tensor names, dtypes, shapes, offsets) and the first and last 32 bytes of every tensor
  (``.bin`` files: their last 64 KiB) — cheap to read at any model size, yet two merges of the same
  architecture differ in it;
* a model in memory: its config and every parameter's name, shape and dtype, plus its first and last 8 values
  (so two merges of one architecture differ here too).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergescale.dtypes import parse_dtype as _parse_dtype
from mergescale.errors import InputModelError
from mergescale.evaluate.results import ModelIdentity
from mergescale.io.checkpoint import looks_like_hub_id, missing_model_path, read_safetensors_header

_TAIL_BYTES = 64 * 1024
_SAMPLE_BYTES = 32


@dataclass
class LoadedModel:
    """A model ready to score, its tokenizer and identity."""

    model: Any
    tokenizer: Any
    identity: ModelIdentity
    in_memory: bool


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` ... -> torch dtype; None or "auto" -> None (keep)."""
    return _parse_dtype(dtype, key="dtype", auto=True, any_case=True)


def load_model(
    model: Any,
    *,
    tokenizer: Any | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> LoadedModel:
    """Load ``model`` (a folder, a Hub id, or a ``PreTrainedModel`` in memory) and its tokenizer.

    A model in memory is used where it is, in its own dtype (``device`` and ``dtype`` apply to loaded
    models only); its tokenizer is ``tokenizer`` or, failing that, loaded from ``model.name_or_path``.
    A folder whose ``config.json`` or ``tokenizer_config.json`` names code of its own (``auto_map``) is
    refused unless ``trust_remote_code`` (see :func:`check_remote_code`); transformers is never asked to prompt.
    ``progress=False`` hides transformers' weight-loading bar too.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            source = getattr(model, "name_or_path", "") or ""
            if not source or not Path(source).is_dir():
                raise InputModelError(
                    f"model in memory ({type(model).__name__}, name_or_path={source!r}): pass tokenizer=, "
                    "its name_or_path is not a folder with a tokenizer"
                )
            check_remote_code(Path(source), trust_remote_code=trust_remote_code)
            tokenizer = _load_tokenizer(AutoTokenizer, source, trust_remote_code)
        identity = ModelIdentity(
            source="memory", name=getattr(model, "name_or_path", None) or None, hash=memory_hash(model)
        )
        return LoadedModel(model=model, tokenizer=tokenizer, identity=identity, in_memory=True)

    if not isinstance(model, str | Path):
        raise InputModelError(
            f"cannot evaluate a {type(model).__name__}: pass a folder, a Hub id or a PreTrainedModel"
        )
    path = Path(model)
    torch_dtype = parse_dtype(dtype)
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputModelError(f"{path}: not a Hugging Face model folder (no config.json)")
        check_remote_code(path, trust_remote_code=trust_remote_code)
        identity = ModelIdentity(
            source="folder", path=str(path.resolve()), name=path.name, hash=folder_hash(path)
        )
        source = str(path)
    elif looks_like_hub_id(model):
        identity = ModelIdentity(source="hub", path=str(model), name=str(model), hash="")
        source = str(model)
    else:
        raise missing_model_path(model)
    try:
        with _transformers_progress(progress):
            loaded = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=torch_dtype if torch_dtype is not None else "auto",
                trust_remote_code=trust_remote_code,
            )
    except Exception as exc:  # transformers raises OSError/ValueError/... with long messages
        _refuse_custom_code(source, exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "no such local folder, and loading it from the Hub failed" if identity.source == "hub" else ""
        raise InputModelError(f"{source}: {where or 'cannot load the model'}: {first}") from None
    loaded.to(device)
    loaded.eval()
    if identity.source == "hub":
        identity = identity.model_copy(update={"hash": memory_hash(loaded)})
    if tokenizer is None:
        tokenizer = _load_tokenizer(AutoTokenizer, source, trust_remote_code)
    return LoadedModel(model=loaded, tokenizer=tokenizer, identity=identity, in_memory=False)


@contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers' progress bars on or off for the duration, restored afterwards."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    if before and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before and not enabled:
            hf_logging.enable_progress_bar()


def _load_tokenizer(auto: Any, source: str, trust_remote_code: bool = False) -> Any:
    try:
        return auto.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        _refuse_custom_code(source, exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputModelError(f"{source}: cannot load the tokenizer: {first}") from None


_REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


def check_remote_code(folder: Path, *, trust_remote_code: bool) -> None:
    """Refuse a model folder that names code of its own, unless ``trust_remote_code``.

    A ``config.json`` or ``tokenizer_config.json`` with an ``auto_map`` asks transformers to import Python files
    shipped with the model: arbitrary code. transformers would prompt for it (and run it on a ``y`` from
    stdin) or, for a known ``model_type``, silently ignore it and load another architecture than the author's;
    here both are an error that names the file and the flag. Unreadable files are left for transformers.

    Raises:
        InputModelError: the folder names its own code and ``trust_remote_code`` is False.
    """
    if trust_remote_code:
        return
    for name in _REMOTE_CODE_FILES:
        path = folder / name
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            values = list(auto_map.values()) if isinstance(auto_map, dict) else list(auto_map)
            code = next((v for v in values if v), values[0] if values else auto_map)
            shown = ", ".join(map(str, code)) if isinstance(code, list | tuple) else str(code)
            raise InputModelError(
                f"{path}: auto_map names code shipped with the model ({shown}); mergescale never runs a "
                "model's own code unless you pass --trust-remote-code (trust_remote_code=True)"
            )


def _refuse_custom_code(source: str, exc: Exception) -> None:
    """transformers' refusal of a Hub model's own code (trust_remote_code=False) as our one-line error."""
    text = str(exc)
    if "trust_remote_code" in text or "custom code" in text:
        raise InputModelError(
            f"{source}: the model needs code of its own to load; mergescale never runs a model's own code "
            "unless you pass --trust-remote-code (trust_remote_code=True)"
        ) from None


def folder_hash(path: Path) -> str:
    """Hash of a model folder's config, weight index and weight files (safetensors: header plus the first and
    last 32 bytes of every tensor; other formats: size and last 64 KiB)."""
    digest = hashlib.sha256()
    digest.update((path / "config.json").read_bytes())
    for index in sorted(path.glob("*.index.json")):
        digest.update(index.name.encode())
        digest.update(index.read_bytes())
    weights = sorted([*path.glob("*.safetensors"), *path.glob("*.bin"), *path.glob("*.pt")])
    for file in weights:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        # a safetensors header is checked as the safetensors library checks it before any offset is used
        entries = read_safetensors_header(file) if file.suffix == ".safetensors" else None
        with file.open("rb") as fh:
            if entries is not None:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                digest.update(fh.read(header_len))
                for name in sorted(entries):
                    start, end = entries[name].begin, entries[name].end
                    fh.seek(start)
                    digest.update(fh.read(min(_SAMPLE_BYTES, end - start)))
                    fh.seek(max(start, end - _SAMPLE_BYTES))
                    digest.update(fh.read(min(_SAMPLE_BYTES, end - start)))
            else:
                fh.seek(max(0, size - _TAIL_BYTES))
                digest.update(fh.read(_TAIL_BYTES))
    return digest.hexdigest()[:16]


def memory_hash(model: Any) -> str:
    """Hash of an in-memory model's config and its parameters' names, shapes, dtypes and first/last values."""
    digest = hashlib.sha256()
    config = {
        k: v
        for k, v in model.config.to_dict().items()
        if not k.startswith("_") and k != "transformers_version"
    }
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.state_dict().items():
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            flat = param.reshape(-1)
            sample = torch.cat([flat[:8], flat[-8:]]).detach().to("cpu", torch.float32)
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
