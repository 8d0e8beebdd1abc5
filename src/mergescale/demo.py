"""``mergescale demo``: both papers' studies on the offline world, from nothing to a report, in one command.

Order of work (each phase cached, so a rerun only checks it is done):

1. **world** — :func:`mergescale.world.build_world` (generated tasks, tiny Llamas pre-trained with checkpoints,
   annealed, instruction-tuned, one expert per held-in task and a multitask model per base);
2. **study** — :func:`mergescale.study.run_study` on the spec :func:`demo_spec` makes: the merging paper's grid
   (every size × {pt, it} base, 4 methods, k ∈ {2, 4, 6, 8}, 3 seeds) and the pre-training paper's experiments on
   every size's run (PMA curves along the run, the window ablation, PMA-init, spike recovery), one store;
3. **report** — :func:`mergescale.report.build_report`: figures, tables and the findings table (rebuilt only
   when the study changed).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergescale.errors import ConfigError, OutputError
from mergescale.stages.keys import stage_key
from mergescale.stages.store import write_json_atomic

DEMO_STATE = ".demo.json"
# the merging paper's grid; task arithmetic's λ is chosen on validation, as the methods' own papers do
METHODS = [
    {"method": "linear"},
    {"method": "task_arithmetic", "lambda": [0.5, 1.0], "select": "validation"},
    {"method": "ties", "density": 0.2, "lambda": 1.0},
    {"method": "dare_ties", "density": 0.2, "lambda": 1.0},
]
# per preset: the grid's k and seeds, evaluation limits, and the PMA experiments' sizes
PRESETS: dict[str, dict[str, Any]] = {
    "micro": {
        "num_experts": [2, 4],
        "seeds": [0, 1],
        "eval": {"limit": 4, "batch_size": 8},
        "pma": {
            "window": 2,
            "ablation": {"windows": [2, 3], "ends": ["middle", "late"]},
            "pma_init": {"steps": 3, "batch_size": 4},
            "spike": {"branch": 0.25, "at": 8, "length": 3, "steps": 12, "save_every": 2, "k": 2,
                      "resume_steps": 3, "batch_size": 4, "factor": 300.0},
            "heldout_limit": 6,
            "task_limit": 3,
        },
    },
    "quick": {
        "num_experts": [2, 4, 6, 8],
        "seeds": [0, 1, 2],
        "eval": {"batch_size": 64},
        "pma": {"window": 10, "every": 2, "heldout_limit": 100, "task_limit": 50},
    },
    "full": {
        "num_experts": [2, 4, 6, 8],
        "seeds": [0, 1, 2],
        "eval": {"batch_size": 64},
        "pma": {"window": 10, "heldout_limit": 200, "task_limit": 100},
    },
}  # fmt: skip

# (phase, event, fields): phases "world", "study", "report"; events "start", "done" and the phases' own
Reporter = Callable[[str, str, dict[str, Any]], None]


@dataclass
class PhaseTime:
    phase: str
    seconds: float
    cached: bool


@dataclass
class DemoResult:
    """What the demo did and where its results are."""

    out_dir: Path
    preset: str
    world: Path
    study: Path
    report: Path
    phases: list[PhaseTime] = field(default_factory=list)
    merges: int = 0
    evaluations: int = 0
    findings: list[Any] = field(default_factory=list)
    seconds: float = 0.0


def demo_spec(world: Path, preset: str) -> dict[str, Any]:
    """The demo's study spec on a built world (both papers; see :data:`PRESETS`)."""
    try:
        settings = PRESETS[preset]
    except KeyError:
        raise ConfigError(f"unknown demo preset {preset!r}; available: {', '.join(PRESETS)}") from None
    return {
        "name": f"demo-{preset}",
        "world": str(world),
        "methods": METHODS,
        "num_experts": settings["num_experts"],
        "seeds": settings["seeds"],
        "eval": settings["eval"],
        "pma": settings["pma"],
    }


def run_demo(
    out_dir: str | Path = "demo",
    *,
    preset: str = "quick",
    workers: int | None = None,
    seed: int = 0,
    report: Reporter | None = None,
    world_report: Callable[..., None] | None = None,
    study_report: Callable[[str, dict[str, Any]], None] | None = None,
) -> DemoResult:
    """Build the world, run both studies on it and write the report into ``out_dir`` (resumable, cached).

    ``out_dir/world`` (the world), ``out_dir/study`` (the study store), ``out_dir/report/report.html``. A folder
    that holds something else is refused. ``workers``: processes for the world build and the study (default: 2
    on a machine with 2 cores or more). ``world_report`` / ``study_report`` receive the phases' own progress.
    """
    from mergescale.study import run_study
    from mergescale.world.build import build_world, default_workers

    start = time.perf_counter()
    out = Path(out_dir)
    spec_preview = demo_spec(out / "world", preset)  # an unknown preset fails before anything is written
    _check_folder(out)
    workers = workers or default_workers()
    tell = report or (lambda phase, event, fields: None)
    result = DemoResult(out, preset, out / "world", out / "study", out / "report")

    tell("world", "start", {})
    t = time.perf_counter()
    built = build_world(out / "world", preset, seed=seed, workers=workers, report=world_report)
    result.phases.append(PhaseTime("world", time.perf_counter() - t, not built.ran))
    tell("world", "done", {"ran": len(built.ran), "cached": len(built.skipped)})

    tell("study", "start", {})
    t = time.perf_counter()
    summary = run_study(spec_preview, out / "study", workers=workers, report=study_report, spec_dir=out)
    result.phases.append(PhaseTime("study", time.perf_counter() - t, summary.ran == 0))
    tell("study", "done", {"ran": summary.ran, "cached": summary.cached})

    tell("report", "start", {})
    t = time.perf_counter()
    cached = _write_report(result)
    result.phases.append(PhaseTime("report", time.perf_counter() - t, cached))
    tell("report", "done", {"cached": cached})
    _count(result)
    result.seconds = time.perf_counter() - start
    return result


def _check_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_STATE).is_file():
        raise OutputError(f"{out}: folder is not empty and holds no demo ({DEMO_STATE}); choose another")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the demo folder ({exc.strerror or exc})") from None
    if not (out / DEMO_STATE).is_file():
        write_json_atomic(out / DEMO_STATE, {})


def study_fingerprint(study_dir: Path) -> str:
    """A hash of what a study holds now (its current cells and PMA jobs): the report changes iff it does."""
    from mergescale import __version__
    from mergescale.study.store import StudyStore

    with StudyStore.open(study_dir) as store:
        cells = [r[0] for r in store.conn.execute("SELECT key FROM cells WHERE current = 1 ORDER BY key")]
        jobs = [r[0] for r in store.conn.execute("SELECT key FROM pma_jobs WHERE current = 1 ORDER BY key")]
        spec = store.meta("spec_key")
    return stage_key("demo-report", __version__, spec, cells, jobs)


def _write_report(result: DemoResult) -> bool:
    """Build the report unless the one in place was built from the same study; True when it was kept."""
    from mergescale.report.build import build_report

    state_path = result.out_dir / DEMO_STATE
    state = json.loads(state_path.read_text(encoding="utf-8") or "{}")
    fingerprint = study_fingerprint(result.study)
    html = result.report / "report.html"
    if state.get("report") == fingerprint and html.is_file():
        from mergescale.report.data import load, prepare
        from mergescale.report.findings import evaluate_findings

        result.findings = list(evaluate_findings(prepare([load(result.study)])))
        return True
    built = build_report([result.study], result.report, overwrite=True)
    result.findings = list(built.findings)
    write_json_atomic(state_path, {**state, "report": fingerprint})
    return False


def _count(result: DemoResult) -> None:
    from mergescale.study.store import StudyStore

    with StudyStore.open(result.study) as store:
        result.merges = store.conn.execute("SELECT COUNT(*) FROM cells WHERE current = 1 AND kind = 'merge'").fetchone()[0]
        result.evaluations = store.conn.execute(
            "SELECT COUNT(*) FROM scores s JOIN cells c ON s.cell_key = c.key WHERE c.current = 1 AND s.metric = "
            "(SELECT primary_metric FROM tasks t WHERE t.name = s.task)"
        ).fetchone()[0]
