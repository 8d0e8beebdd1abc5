"""Terminal tables stay whole in an 80-column terminal or log file: no cell cut to "0.…"."""

from __future__ import annotations

import io

from rich.console import Console
from synthetic import merging_study, paper_like, pma_study

from mergescale.cli.report import print_findings
from mergescale.cli.world import _print_scores
from mergescale.report.data import prepare
from mergescale.report.findings import evaluate_findings
from mergescale.study.results import StudyResults

HELD_IN = ["mcqa", "extractive_qa", "closed_book_qa", "sentiment", "topic", "struct_to_text", "summarisation", "paraphrase"]
HELD_OUT = ["completion", "nli", "coreference", "wsd"]


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=80, color_system=None), buffer


def world_scores() -> dict:
    """A world's scores.json as ``world build`` writes it: two sizes, both kinds, the world's 12 tasks."""
    tasks = HELD_IN + HELD_OUT
    models = {}
    for size in ("s", "m"):
        for kind in ("pt", "it"):
            roles = [("base", None)] + [("expert", t) for t in HELD_IN] + [("multitask", None)]
            for role, task in roles:
                model_id = f"{size}/{kind}/" + (f"experts/{task}" if task else role)
                value = {t: round(0.1 + 0.8 * ((i * 7 + len(model_id)) % 10) / 10, 2) for i, t in enumerate(tasks)}
                if task:
                    value[task] = 1.0
                models[model_id] = {"size": size, "base": kind, "role": role, "task": task,
                                    "scores": {t: {"acc": v} for t, v in value.items()}}  # fmt: skip
    pretrain = {s: {"last_stable_loss": 0.81, "annealed_loss": 0.73, "sma": {"window": 3, "loss": 0.75}} for s in ("s", "m")}
    return {"held_in": HELD_IN, "held_out": HELD_OUT, "primary_metric": {t: "acc" for t in tasks}, "models": models,
            "pretrain": pretrain}  # fmt: skip


def test_world_show_keeps_every_score_whole_at_80_columns() -> None:
    console, buffer = _console()
    _print_scores(world_scores(), console)
    text = buffer.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    # every model's every score is printed in full: 4 bases x 10 models x 12 tasks
    assert len([c for c in text.split() if c.count(".") == 1 and c.replace(".", "").isdigit() and len(c) == 4]) == 480
    assert "s / pt: held-in tasks" in text and "m / it: held-out tasks" in text


def test_the_findings_table_fits_80_columns_whole() -> None:
    console, buffer = _console()
    results = merging_study(paper_like)
    pma = pma_study()
    both = StudyResults(results.study_dir, "both", {}, results.groups, results.tasks, results.cells, results.scores,
                        results.draws, results.diagnostics, pma.pma_points, pma.pma_curves, pma.pma_results)  # fmt: skip
    findings = evaluate_findings(prepare(both))
    print_findings(findings, console)
    text = buffer.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for f in findings:
        assert f.id in text
        assert f.verdict.value in text
        counts = " / ".join(str(n) for n in f.counts)
        assert counts in text
