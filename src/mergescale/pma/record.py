"""``pma.json``: what an average was made of, written beside its weights (pydantic, round-trips).

One model for both kinds of average, told apart by ``mode``:

- ``offline`` (``mergescale pma``, sweeps, curves, recovery): the window's checkpoints and the weight of each;
- ``online`` (:class:`~mergescale.pma.online.PMAAverager`, :class:`~mergescale.pma.online.PMACallback`): how
  many updates the running average folded in, from which step to which, and how often.

A file written before ``mode`` existed is an offline record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from mergescale.errors import ConfigError

PMA_JSON = "pma.json"
SWEEP_JSON = "sweep.json"

# The fields each mode writes, in this order (``PMARecord`` holds the union).
_COMMON = ("mergescale_version", "mode")
_OFFLINE = (
    *_COMMON, "label", "strategy", "alpha", "window", "interval", "end", "dtype", "raw_weights", "checkpoints",
    "skipped_incomplete",
)  # fmt: skip
_ONLINE = (*_COMMON, "strategy", "alpha", "updates", "first_step", "last_step", "every", "start_step")


class AveragedCheckpoint(BaseModel):
    """One checkpoint of a window and its weight in the average."""

    model_config = ConfigDict(extra="forbid")
    name: str
    path: str
    step: int | None
    tokens: int | None
    weight: float


class PMARecord(BaseModel):
    """The content of ``pma.json``.

    Offline: ``weights`` are the normalised weights actually used (they sum to 1); for ``custom`` the user's raw
    weights are kept in ``raw_weights``. ``interval`` is as given (``"500"`` steps or ``"2B"`` tokens).
    Online: ``updates`` weights folded in from ``first_step`` to ``last_step`` (steps as the training loop gave
    them), ``every`` and ``start_step`` when a :class:`~mergescale.pma.online.PMACallback` chose them.
    ``alpha`` is the EMA's, None for other strategies.
    """

    model_config = ConfigDict(extra="forbid")
    mergescale_version: str
    mode: Literal["offline", "online"] = "offline"
    label: str | None = None
    strategy: str
    alpha: float | None = None
    # offline
    window: int | None = None
    interval: str | None = None
    end: int | None = None
    dtype: str | None = None
    raw_weights: list[float] | None = None
    checkpoints: list[AveragedCheckpoint] = []
    # step folders inside the window's span that held no weights and were left out (--skip-incomplete)
    skipped_incomplete: list[str] = []
    # online
    updates: int | None = None
    first_step: int | None = None
    last_step: int | None = None
    every: int | None = None
    start_step: int | None = None

    @model_validator(mode="after")
    def _complete_for_its_mode(self) -> PMARecord:
        mine = _OFFLINE if self.mode == "offline" else _ONLINE
        foreign = sorted(f for f in self.model_fields_set - set(mine) if getattr(self, f) not in (None, []))
        if foreign:
            raise ValueError(f"an {self.mode} record has no {', '.join(foreign)}")
        if self.mode == "offline" and (self.label is None or self.window is None or not self.checkpoints):
            raise ValueError("an offline record needs label, window and checkpoints")
        if self.mode == "online" and self.updates is None:
            raise ValueError("an online record needs updates")
        return self

    @model_serializer(mode="wrap")
    def _fields_of_its_mode(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        """Written (alone, or inside ``sweep.json``) with the fields of its mode only, in their order."""
        data = handler(self)
        return {f: data[f] for f in (_OFFLINE if self.mode == "offline" else _ONLINE) if f in data}

    @property
    def weights(self) -> list[float]:
        return [c.weight for c in self.checkpoints]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def read_record(folder: str | Path) -> PMARecord:
    """The ``pma.json`` of an averaged model folder (offline or online).

    Raises:
        ConfigError: missing, not JSON, or not a record; naming the file.
    """
    path = Path(folder) / PMA_JSON
    try:
        return PMARecord.model_validate(json.loads(path.read_text()))
    except ValidationError as exc:  # one line: the first error, with its field
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        why = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}: not a valid {PMA_JSON} ({f'{field}: ' if field else ''}{why})") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a valid {PMA_JSON} ({exc})") from None


class SweepRecord(BaseModel):
    """``sweep.json`` in a sweep's output folder: every average it wrote, by folder name."""

    model_config = ConfigDict(extra="forbid")
    mergescale_version: str
    checkpoints_read: list[str]
    outputs: dict[str, PMARecord]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"
