"""``pma.json``: what an average was made of, written beside its weights (pydantic, round-trips)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

PMA_JSON = "pma.json"
SWEEP_JSON = "sweep.json"


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

    ``weights`` are the normalised weights actually used (they sum to 1); for ``custom`` the user's raw
    weights are kept in ``raw_weights``. ``interval`` is as given (``"500"`` steps or ``"2B"`` tokens).
    """

    model_config = ConfigDict(extra="forbid")
    mergescale_version: str
    label: str
    strategy: str
    alpha: float | None = None
    window: int
    interval: str | None = None
    end: int | None = None
    dtype: str | None = None
    raw_weights: list[float] | None = None
    checkpoints: list[AveragedCheckpoint]
    # step folders inside the window's span that held no weights and were left out (--skip-incomplete)
    skipped_incomplete: list[str] = []

    @property
    def weights(self) -> list[float]:
        return [c.weight for c in self.checkpoints]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


class SweepRecord(BaseModel):
    """``sweep.json`` in a sweep's output folder: every average it wrote, by folder name."""

    model_config = ConfigDict(extra="forbid")
    mergescale_version: str
    checkpoints_read: list[str]
    outputs: dict[str, PMARecord]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"
