"""``mergescale study export``: the store as one row per (cell, task, evaluated split, metric)."""

from __future__ import annotations

import csv
from pathlib import Path

from mergescale.errors import ConfigError, OutputError
from mergescale.io.atomic import AtomicPath
from mergescale.study.results import StudyResults

COLUMNS = (
    "group", "base_kind", "size", "kind", "method", "label", "params", "k", "seed", "experts", "task", "split",
    "eval_split", "metric", "primary", "score", "normalised", "cell",
)  # fmt: skip


def export_rows(results: StudyResults, output: str | Path) -> int:
    """Write ``results.rows()`` to ``output`` (``.csv``, or ``.parquet`` with pyarrow installed), atomically;
    returns the number of rows."""
    path = Path(output)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ConfigError(f"{path}: export to a .csv or .parquet file")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    rows = results.rows()
    try:
        with AtomicPath(path) as tmp:
            if suffix == ".csv":
                with tmp.open("w", newline="", encoding="utf-8") as fh:
                    writer = csv.DictWriter(fh, fieldnames=COLUMNS)
                    writer.writeheader()
                    writer.writerows(rows)
            else:
                try:
                    import pyarrow as pa
                    import pyarrow.parquet as pq
                except ImportError:
                    raise ConfigError("Parquet export needs pyarrow: pip install pyarrow (or export to .csv)") from None
                table = pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in COLUMNS})
                pq.write_table(table, tmp)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return len(rows)
