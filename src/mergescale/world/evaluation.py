"""The world build's two calls into other parts of mergescale: scoring a model on tasks (``mergescale eval``'s
Python API) and averaging the last stable checkpoints (``mergescale pma``'s offline API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergescale.world.presets import EvalSettings


def score_model(
    model_dir: Path,
    tasks: list[Any],
    settings: EvalSettings,
    *,
    limit: bool = True,
) -> dict[str, dict[str, float]]:
    """Every metric of every task for the model in ``model_dir`` (tasks loaded once by the caller, so their
    tokenised examples are cached across models)."""
    from mergescale.evaluate import evaluate

    results = evaluate(
        str(model_dir),
        tasks,
        limit=settings.limit if limit else None,
        batch_size=settings.batch_size,
        progress=False,
    )
    return {name: {k: float(v) for k, v in r.metrics.items()} for name, r in results.tasks.items()}


def average_last_checkpoints(run_dir: Path, out_dir: Path, window: int) -> list[str]:
    """SMA of the newest ``window`` checkpoints of a Trainer run into ``out_dir`` (``mergescale pma``'s Python
    API); returns the names of the checkpoints averaged."""
    from mergescale.pma import average_checkpoints

    result = average_checkpoints(run_dir, out_dir, strategy="sma", window=window, progress=False)
    return [f"checkpoint-{step}" for step in result.steps]
