"""The study's results store: one SQLite file (WAL mode) in the study folder, written by the runner alone.

Schema (``STUDY_DIR/study.sqlite``):

``meta(key, value)``
    ``name``, ``spec`` (the spec as JSON), ``spec_key``, ``format``, ``created``.
``groups(name, base_kind, size, parameters, base, base_identity, multitask, experts)``
    one row per group; ``experts`` is JSON (task -> folder).
``tasks(name, split, category, primary_metric)``
    the suite: ``split`` is ``held_in`` or ``held_out``.
``cells(key, kind, group_name, base_kind, size, method, label, entry, params, k, seed, experts, task, draw_key,
selection, wall_s, merge_s, eval_s, peak_rss, bytes_read, versions, finished, current)``
    one row per evaluated model: ``kind`` is ``merge``, ``base``, ``expert`` or ``multitask``; ``params`` the
    resolved parameters (JSON; with selection, the chosen set), ``experts`` the merged tasks (JSON list),
    ``selection`` the candidates with their validation scores (JSON), ``current`` 1 when the cell belongs to the
    spec of the last run (a changed spec leaves the old cells in place, marked 0, and reruns only new keys).
``scores(cell_key, task, split, eval_split, metric, score, normalised)``
    one row per (cell, task, evaluated split, metric): ``split`` held_in / held_out, ``eval_split`` test /
    validation, ``normalised`` the score ÷ the group's expert on that task (held-in) or ÷ the group's base
    (held-out); NULL when undefined, and for lower-is-better metrics (loss, ppl).
``draws(key, group_name, k, seed, experts, bytes_read, merge_s, plans, outputs, peak_rss, finished)``
    what one read cost: every merge of a draw shares it.
``diagnostics(draw_key, stat, a, b, value)``
    task-vector statistics of a draw (:mod:`.diagnostics`).
``pma_points(run, kind, strategy, alpha, n, interval, end_step, loss, last_loss, annealed_loss, recovered, scores,
key)``
    the pre-training paper's averages (``kind``: ``along`` the run, or ``ablation`` at chosen end steps): the
    average's validation loss, the last checkpoint's and the annealed model's at that step, the share of the
    anneal's gain recovered, (PMA − last) / (annealed − last), and task scores (JSON).
``pma_curves(run, experiment, variant, step, loss, grad_norm, key)``
    training curves of PMA-init (``experiment`` ``pma_init``; variants ``pma`` / ``last``) and spike recovery
    (``spike``; variants ``spiked``, ``average``, ``rollback``, ``unspiked``).
``pma_results(run, experiment, variant, metric, value, key)``
    their final numbers (final validation loss, gradient-norm std and largest jump, injected / detected spike
    step, ...).
``pma_jobs(key, run, experiment, seconds, peak_rss, versions, finished, current)``
    one row per finished PMA job (curve, ablation, pma_init, spike of a run); the rows of the three tables above
    carry their job's key, and a job's rows are replaced together.

A job's rows (its cells, their scores, its draw and diagnostics) are written in one transaction, so a kill at any
moment leaves each cell entirely written or absent, and a rerun computes exactly the absent ones.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mergescale.errors import OutputError

STORE_FILE = "study.sqlite"
STORE_FORMAT = 1
LOWER_IS_BETTER = frozenset({"loss", "ppl", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    name TEXT PRIMARY KEY, base_kind TEXT, size TEXT, parameters INTEGER, base TEXT NOT NULL,
    base_identity TEXT NOT NULL, multitask TEXT, experts TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (name TEXT PRIMARY KEY, split TEXT NOT NULL, category TEXT NOT NULL,
    primary_metric TEXT);
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, group_name TEXT NOT NULL, base_kind TEXT, size TEXT,
    method TEXT, label TEXT, entry INTEGER, params TEXT, k INTEGER, seed INTEGER, experts TEXT, task TEXT,
    draw_key TEXT, selection TEXT, wall_s REAL, merge_s REAL, eval_s REAL, peak_rss INTEGER, bytes_read INTEGER,
    versions TEXT, finished TEXT, current INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS scores (
    cell_key TEXT NOT NULL REFERENCES cells(key) ON DELETE CASCADE, task TEXT NOT NULL, split TEXT NOT NULL,
    eval_split TEXT NOT NULL, metric TEXT NOT NULL, score REAL, normalised REAL,
    PRIMARY KEY (cell_key, task, eval_split, metric));
CREATE TABLE IF NOT EXISTS draws (
    key TEXT PRIMARY KEY, group_name TEXT NOT NULL, k INTEGER NOT NULL, seed INTEGER NOT NULL,
    experts TEXT NOT NULL, bytes_read INTEGER, merge_s REAL, plans INTEGER, outputs INTEGER, peak_rss INTEGER,
    finished TEXT);
CREATE TABLE IF NOT EXISTS diagnostics (
    draw_key TEXT NOT NULL, stat TEXT NOT NULL, a TEXT NOT NULL, b TEXT NOT NULL, value REAL,
    PRIMARY KEY (draw_key, stat, a, b));
CREATE TABLE IF NOT EXISTS pma_points (
    run TEXT NOT NULL, kind TEXT NOT NULL, strategy TEXT NOT NULL, alpha REAL, n INTEGER NOT NULL,
    interval TEXT NOT NULL DEFAULT '', end_step INTEGER NOT NULL, loss REAL, last_loss REAL, annealed_loss REAL,
    recovered REAL, scores TEXT, key TEXT,
    PRIMARY KEY (run, kind, strategy, alpha, n, interval, end_step));
CREATE TABLE IF NOT EXISTS pma_curves (
    run TEXT NOT NULL, experiment TEXT NOT NULL, variant TEXT NOT NULL, step INTEGER NOT NULL, loss REAL,
    grad_norm REAL, key TEXT, PRIMARY KEY (run, experiment, variant, step));
CREATE TABLE IF NOT EXISTS pma_jobs (
    key TEXT PRIMARY KEY, run TEXT NOT NULL, experiment TEXT NOT NULL, seconds REAL, peak_rss INTEGER,
    versions TEXT, finished TEXT, current INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS pma_results (
    run TEXT NOT NULL, experiment TEXT NOT NULL, variant TEXT NOT NULL, metric TEXT NOT NULL, value REAL,
    key TEXT, PRIMARY KEY (run, experiment, variant, metric));
CREATE INDEX IF NOT EXISTS scores_by_cell ON scores(cell_key);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StudyStore:
    """The SQLite store of one study folder. Use :meth:`create_or_open` (runner) or :meth:`open` (readers)."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn

    # -- opening -------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, study_dir: str | Path) -> StudyStore:
        """Open an existing study folder for reading."""
        path = Path(study_dir) / STORE_FILE
        if not path.is_file():
            raise OutputError(f"{study_dir}: not a study folder (no {STORE_FILE}); run `mergescale study run` first")
        try:
            conn = sqlite3.connect(path, timeout=60, isolation_level=None)
            conn.execute("SELECT value FROM meta WHERE key = 'name'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise OutputError(f"{path}: not a readable study store ({exc})") from None
        return cls(path, conn)

    @classmethod
    def create_or_open(cls, study_dir: str | Path, name: str, spec_json: str, *, force_new: bool = False) -> StudyStore:
        """The store of ``study_dir`` for the study ``name``: created when the folder is new or empty; an existing
        store of another study is refused unless ``force_new`` (which starts it afresh)."""
        folder = Path(study_dir)
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{folder}: exists and is not a folder")
        path = folder / STORE_FILE
        if folder.is_dir() and not path.exists() and any(p for p in folder.iterdir() if not p.name.startswith(".")):
            raise OutputError(f"{folder}: folder is not empty and holds no study ({STORE_FILE}); choose another")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{folder}: cannot create the study folder ({exc.strerror or exc})") from None
        if path.exists():
            store = cls.open(folder)
            existing = store.meta("name")
            if existing != name and not force_new:
                store.close()
                raise OutputError(
                    f"{folder}: holds study {existing!r}, not {name!r}; choose another folder or pass --force-new "
                    "to start this one afresh"
                )
            if existing != name:
                store.close()
                for suffix in ("", "-wal", "-shm"):
                    Path(str(path) + suffix).unlink(missing_ok=True)
        try:
            # autocommit mode: transactions are begun and ended by :meth:`transaction` alone
            conn = sqlite3.connect(path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise OutputError(f"{path}: cannot open the study store ({exc})") from None
        store = cls(path, conn)
        with store.transaction():
            if store.meta("name") is None:
                store._set_meta("name", name)
                store._set_meta("created", _now())
                store._set_meta("format", str(STORE_FORMAT))
            store._set_meta("spec", spec_json)
        return store

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> StudyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Everything inside is written, or nothing (a kill mid-way leaves the store as it was)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.rollback()
            raise
        self.conn.commit()

    # -- meta, groups, tasks -------------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def write_setup(self, groups: Iterable[dict[str, Any]], tasks: Iterable[dict[str, Any]], spec_key: str) -> None:
        """The groups and tasks of the current spec (replacing what an earlier spec wrote)."""
        with self.transaction() as c:
            self._set_meta("spec_key", spec_key)
            c.execute("DELETE FROM groups")
            c.executemany(
                "INSERT INTO groups VALUES (:name, :base_kind, :size, :parameters, :base, :base_identity, "
                ":multitask, :experts)",
                list(groups),
            )
            for t in tasks:  # the primary metric is learnt from the first evaluation; keep it
                c.execute(
                    "INSERT INTO tasks (name, split, category) VALUES (:name, :split, :category) "
                    "ON CONFLICT(name) DO UPDATE SET split = excluded.split, category = excluded.category",
                    t,
                )

    def mark_current(self, keys: Iterable[str]) -> tuple[int, int]:
        """Flag the cells of the current spec; returns (cells done already, stored cells no longer in the spec)."""
        with self.transaction() as c:
            c.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (key TEXT PRIMARY KEY)")
            c.execute("DELETE FROM wanted")
            c.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", [(k,) for k in keys])
            done = stale = 0
            for table in ("cells", "pma_jobs"):
                c.execute(f"UPDATE {table} SET current = (key IN (SELECT key FROM wanted))")
                done += c.execute(f"SELECT COUNT(*) FROM {table} WHERE current = 1").fetchone()[0]
                stale += c.execute(f"SELECT COUNT(*) FROM {table} WHERE current = 0").fetchone()[0]
        return done, stale

    def done_keys(self) -> set[str]:
        cells = {r[0] for r in self.conn.execute("SELECT key FROM cells")}
        return cells | {r[0] for r in self.conn.execute("SELECT key FROM pma_jobs")}

    # -- results -------------------------------------------------------------------------------------------------
    def primary_metrics(self) -> dict[str, str]:
        return {n: m for n, m in self.conn.execute("SELECT name, primary_metric FROM tasks") if m}

    def group_scores(self, group: str, kind: str, eval_split: str = "test") -> dict[str, dict[str, dict[str, float]]]:
        """Scores of a group's baseline cells of one kind: {task (expert) or "" : {task: {metric: score}}}."""
        rows = self.conn.execute(
            "SELECT c.task, s.task, s.metric, s.score FROM cells c JOIN scores s ON s.cell_key = c.key "
            "WHERE c.group_name = ? AND c.kind = ? AND s.eval_split = ? AND c.current = 1",
            (group, kind, eval_split),
        )
        out: dict[str, dict[str, dict[str, float]]] = {}
        for owner, task, metric, score in rows:
            out.setdefault(owner or "", {}).setdefault(task, {})[metric] = score
        return out

    def references(self, group: str, eval_split: str = "test") -> tuple[dict, dict]:
        """(expert score per task and metric, base score per task and metric) of a group."""
        experts = {owner: tasks.get(owner, {}) for owner, tasks in self.group_scores(group, "expert", eval_split).items()}
        base = self.group_scores(group, "base", eval_split).get("", {})
        return experts, base

    def write_cells(
        self,
        cells: Sequence[dict[str, Any]],
        scores: Sequence[dict[str, Any]],
        *,
        draw: dict[str, Any] | None = None,
        diagnostics: Sequence[dict[str, Any]] = (),
        primary: dict[str, str] | None = None,
    ) -> None:
        """One job's rows, in one transaction (a cell's rows replace any earlier ones with its key)."""
        with self.transaction() as c:
            for cell in cells:
                c.execute("DELETE FROM scores WHERE cell_key = ?", (cell["key"],))
                c.execute("DELETE FROM cells WHERE key = ?", (cell["key"],))
                c.execute(
                    f"INSERT INTO cells ({', '.join(cell)}, finished, current) "
                    f"VALUES ({', '.join(':' + k for k in cell)}, :finished, 1)",
                    {**cell, "finished": _now()},
                )
            c.executemany(
                "INSERT INTO scores VALUES (:cell_key, :task, :split, :eval_split, :metric, :score, :normalised)",
                list(scores),
            )
            for task, metric in (primary or {}).items():
                c.execute("UPDATE tasks SET primary_metric = ? WHERE name = ? AND primary_metric IS NULL", (metric, task))
            if draw is not None:
                c.execute(
                    "INSERT OR REPLACE INTO draws VALUES (:key, :group_name, :k, :seed, :experts, :bytes_read, "
                    ":merge_s, :plans, :outputs, :peak_rss, :finished)",
                    {**draw, "finished": _now()},
                )
                c.execute("DELETE FROM diagnostics WHERE draw_key = ?", (draw["key"],))
                c.executemany("INSERT INTO diagnostics VALUES (:draw_key, :stat, :a, :b, :value)", list(diagnostics))

    def write_pma(self, job: dict[str, Any], points: Sequence[dict], curves: Sequence[dict], results: Sequence[dict]) -> None:
        """One PMA job's rows, replacing any earlier rows of its key, in one transaction."""
        with self.transaction() as c:
            for table in ("pma_points", "pma_curves", "pma_results"):
                c.execute(f"DELETE FROM {table} WHERE key = ?", (job["key"],))
            # rows of this run and experiment from an earlier spec (another key) give way to this job's
            kinds = {"curve": "along", "ablation": "ablation"}
            if job["experiment"] in kinds:
                c.execute(
                    "DELETE FROM pma_points WHERE run = ? AND kind = ?", (job["run"], kinds[job["experiment"]])
                )
            else:
                for table in ("pma_curves", "pma_results"):
                    c.execute(f"DELETE FROM {table} WHERE run = ? AND experiment = ?", (job["run"], job["experiment"]))
            c.execute("DELETE FROM pma_jobs WHERE key = ?", (job["key"],))
            c.execute(
                "INSERT INTO pma_jobs (key, run, experiment, seconds, peak_rss, versions, finished, current) "
                "VALUES (:key, :run, :experiment, :seconds, :peak_rss, :versions, :finished, 1)",
                {**job, "finished": _now()},
            )
            c.executemany(
                "INSERT OR REPLACE INTO pma_points VALUES (:run, :kind, :strategy, :alpha, :n, :interval, :end_step, "
                ":loss, :last_loss, :annealed_loss, :recovered, :scores, :key)",
                list(points),
            )
            c.executemany(
                "INSERT OR REPLACE INTO pma_curves VALUES (:run, :experiment, :variant, :step, :loss, :grad_norm, :key)",
                list(curves),
            )
            c.executemany(
                "INSERT OR REPLACE INTO pma_results VALUES (:run, :experiment, :variant, :metric, :value, :key)",
                list(results),
            )

    def renormalise_baselines(self, group: str) -> None:
        """Normalised scores of a group's baseline cells, once its base and experts are all stored."""
        experts, base = self.references(group)
        splits = dict(self.conn.execute("SELECT name, split FROM tasks").fetchall())
        with self.transaction() as c:
            rows = c.execute(
                "SELECT s.cell_key, s.task, s.eval_split, s.metric, s.score FROM scores s JOIN cells c "
                "ON s.cell_key = c.key WHERE c.group_name = ? AND c.kind != 'merge'",
                (group,),
            ).fetchall()
            for key, task, eval_split, metric, score in rows:
                if eval_split != "test":
                    continue
                value = normalised(score, splits.get(task), task, metric, experts, base)
                c.execute(
                    "UPDATE scores SET normalised = ? WHERE cell_key = ? AND task = ? AND eval_split = ? AND metric = ?",
                    (value, key, task, eval_split, metric),
                )

    # -- reading -------------------------------------------------------------------------------------------------
    def has_table(self, name: str) -> bool:
        """Whether the store has this table (a store written by an older mergescale may lack newer ones)."""
        row = self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
        return row is not None

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        self.conn.row_factory = sqlite3.Row
        try:
            return self.conn.execute(sql, params).fetchall()
        finally:
            self.conn.row_factory = None


def normalised(
    score: float | None, split: str | None, task: str, metric: str, experts: dict, base: dict
) -> float | None:
    """The paper's normalisation of one score: held-in ÷ the task's expert, held-out ÷ the base (same metric);
    None when undefined (missing or zero reference) or for lower-is-better metrics."""
    if score is None or metric in LOWER_IS_BETTER or split is None:
        return None
    ref = experts.get(task, {}).get(metric) if split == "held_in" else base.get(task, {}).get(metric)
    if ref is None or ref == 0:
        return None
    return float(score) / float(ref)


def dumps(value: Any) -> str:
    """JSON as stored in the store (sorted keys, so equal values store equal text)."""
    return json.dumps(value, sort_keys=True)
