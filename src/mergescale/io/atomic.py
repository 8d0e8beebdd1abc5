"""Outputs that appear whole or not at all, and the checks made before writing one.

Every output — a model folder, a report, a stage's files, a results JSON, a statistics file — is written under
a hidden temporary sibling name ``.<name>.tmp-<pid>-<random>`` and renamed into place when it is complete, so
a crash, an error or Ctrl-C never leaves a half-written output at its path; a temporary left by a killed
process (its pid is gone) is removed the next time the same output is written. This module imports no torch:
the report, the study export and the stage store use it without paying torch's import.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

from mergescale.errors import OutputError

__all__ = [
    "AtomicFolder",
    "AtomicPath",
    "check_apart_from_inputs",
    "check_output_folder",
    "check_writable",
    "pid_alive",
    "remove",
    "write_json_atomic",
    "write_text_atomic",
]


class AtomicPath:
    """A file or folder written at a temporary sibling of ``target`` and renamed into place on :meth:`commit`.

    :meth:`create` reserves the temporary path (its parent made, stale temporaries of ``target`` removed) and
    returns it; the caller writes a file or a folder there. :meth:`commit` renames it to ``target``, replacing
    what is there (a folder is renamed aside first and deleted after, so ``target`` is never missing half-way);
    :meth:`abort` deletes it. As a context manager, ``with AtomicPath(p) as tmp:`` (then any writer: a text, a
    safetensors, a Parquet file) commits when the block ends and aborts when it raises.
    """

    def __init__(self, target: str | Path) -> None:
        self.target = Path(target)
        self.tmp: Path | None = None

    def create(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.target)
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        return self.tmp

    def commit(self) -> None:
        assert self.tmp is not None, "create() first"
        trash = None
        if self.tmp.is_dir() and (self.target.exists() or self.target.is_symlink()):
            trash = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            self.target.rename(trash)
        os.replace(self.tmp, self.target)
        self.tmp = None
        if trash is not None:
            _discard(trash)

    def abort(self) -> None:
        if self.tmp is not None:
            _discard(self.tmp)
            self.tmp = None

    def __enter__(self) -> Path:
        return self.create()

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if kind is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:  # e.g. a file to put where a folder stands: leave no temporary behind
            self.abort()
            raise


class AtomicFolder(AtomicPath):
    """A temporary sibling folder that becomes ``target`` on :meth:`commit` and vanishes on :meth:`abort`.

    ``target`` is checked when this is made (:func:`check_output_folder`: not a file, empty unless
    ``overwrite``, in a writable place), and again at :meth:`commit`: a non-empty folder that appeared there
    meanwhile is replaced only with ``overwrite``.
    """

    def __init__(self, target: str | Path, *, overwrite: bool = False) -> None:
        super().__init__(target)
        self.overwrite = overwrite
        check_output_folder(self.target, overwrite=overwrite)

    def create(self) -> Path:
        try:
            tmp = super().create()
            tmp.mkdir()
        except OSError as exc:
            self.tmp = None
            raise OutputError(f"output folder {self.target}: cannot create it ({_why(exc)})") from None
        return tmp

    def commit(self) -> None:
        target = self.target
        if not self.overwrite and target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise OutputError(f"{target} appeared while merging; not replacing it (use --overwrite)")
        super().commit()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers see the old file or the new one, never a part."""
    with AtomicPath(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON (keys in their order), written atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def remove(path: Path) -> None:
    """Delete a file, a link or a folder with everything in it; nothing when there is nothing."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _discard(path: Path) -> None:
    """:func:`remove`, as far as it goes: for temporaries, whose leftovers the next write removes."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(OSError):
            path.unlink(missing_ok=True)


def remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries of ``target`` left by a killed process (their pid is gone)."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not pid_alive(pid):
            _discard(tmp)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_folder(target: Path, *, overwrite: bool) -> None:
    """Refuse an output path that is a file, a non-empty folder unless ``overwrite``, or a place that cannot be
    written (its nearest existing folder is not writable, or on a read-only file system)."""
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise OutputError(f"output path {target} exists and is not a folder")
        if not overwrite and any(target.iterdir()):
            raise OutputError(f"output folder {target} is not empty (use --overwrite to replace it)")
    # the output is made as a temporary sibling, renamed into place: its parent folder must take new entries
    check_writable(target.absolute().parent, f"output folder {target}")


def check_apart_from_inputs(target: Path, inputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse an output folder that is, lies inside, or contains one of the ``(label, folder)`` inputs, paths
    resolved (symbolic links, ``..``): with ``--overwrite`` the output replaces its folder at the end, which
    would delete an input (``mergescale merge cfg.yaml models/base --overwrite`` replaced the base model), and
    without it the output would be written into an input's folder.

    Raises:
        OutputError: naming the output and the input.
    """
    out = Path(target).expanduser().resolve()
    for label, folder in inputs:
        src = Path(folder).expanduser().resolve()
        if out == src:
            how = "is"
        elif src in out.parents:
            how = "is inside"
        elif out in src.parents:
            how = "contains"
        else:
            continue
        raise OutputError(f"output folder {target} {how} the input {label} ({folder}); choose another output folder")


def check_writable(folder: Path, what: str) -> None:
    """Refuse ``what`` (an output, for the message) when entries cannot be created in ``folder``: the folder, or
    its nearest existing ancestor when it is still to be made, is a file, is not writable, or sits on a
    read-only file system. (A pseudo file system such as ``/proc`` passes here and fails when the output is
    created, with the same kind of one-line error.)"""
    folder = Path(folder).absolute()
    existing = folder if folder.exists() else next((p for p in folder.parents if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise OutputError(f"{what}: cannot create it ({existing} is a file)")
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY) if hasattr(os, "statvfs") else False
    except OSError:
        read_only = False
    if read_only:
        raise OutputError(f"{what}: cannot write there ({existing} is on a read-only file system)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what}: cannot write there (no permission to write in {existing})")


def _why(exc: OSError) -> str:
    """An OSError as a short reason: ``Read-only file system: '/mnt/x'``."""
    return f"{exc.strerror}: {str(exc.filename)!r}" if exc.strerror and exc.filename else str(exc)
