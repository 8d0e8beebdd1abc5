"""The files of a Hugging Face model folder beside its weights: which they are, where to find them, copying them.

A merged or averaged model takes its ``config.json``, tokenizer and generation settings from one of its inputs;
a checkpoint keeps them in its weights folder, its step folder or the run folder above. Every part that looks
for them or copies them (merge, PMA offline and online, held-out loss, continued training) uses these
functions. No torch here.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mergescale.errors import InputModelError

CONFIG_JSON = "config.json"
GENERATION_CONFIG = "generation_config.json"
# Files of a model folder that travel with the weights (tokenizer, chat template).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# What an output copies from the folder it takes its files from (``config.json`` is written, not copied).
COPIED_FILES = (*TOKENIZER_FILES, GENERATION_CONFIG)


def find_folder(candidates: Iterable[Path | None], names: Sequence[str]) -> Path | None:
    """The first of ``candidates`` (None skipped) holding a file named in ``names``; None when none does."""
    for folder in candidates:
        if folder is not None and any((folder / name).is_file() for name in names):
            return folder
    return None


def find_tokenizer_folder(candidates: Sequence[Path | None], purpose: str) -> Path:
    """The first of ``candidates`` holding tokenizer files.

    Raises:
        InputModelError: none does; the message names the folders and ``purpose`` (what needs a tokenizer).
    """
    found = find_folder(candidates, TOKENIZER_FILES)
    if found is None:
        names = ", ".join(str(c) for c in candidates if c is not None)
        raise InputModelError(f"no tokenizer files in {names}; {purpose} needs a tokenizer")
    return found


def read_model_config(folder: Path, purpose: str) -> dict[str, Any]:
    """``config.json`` of ``folder``, which ``purpose`` needs.

    Raises:
        InputModelError: there is none, or it is not JSON; naming the file and ``purpose``.
    """
    from mergescale.io.checkpoint import read_config  # imported here: it brings torch

    config = read_config(Path(folder))
    if config is None:
        raise InputModelError(f"{folder}: no {CONFIG_JSON}; {purpose} needs one")
    return config


def copy_model_files(
    source: Path, target: Path, names: Sequence[str] = COPIED_FILES, *, keep_existing: bool = False
) -> list[str]:
    """Copy the files of ``names`` that ``source`` holds into ``target``; returns the names copied.

    ``keep_existing`` leaves a file ``target`` already has (e.g. written by ``save_pretrained``) as it is.
    """
    copied = []
    for name in names:
        src = Path(source) / name
        if src.is_file() and not (keep_existing and (target / name).exists()):
            shutil.copy2(src, target / name)
            copied.append(name)
    return copied
