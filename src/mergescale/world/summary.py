"""Reading a world's ``scores.json``: the matrix as rows, and the quality checks the world must pass (pure).

The checks are the issue's: every expert beats its base on its own task (by at least +0.25 for the largest
size), the multitask model is close to the experts on held-in tasks, the IT base beats the PT base on held-out
tasks on average, and in pre-training both the annealed model and the SMA of the last stable checkpoints have a
lower validation loss than the last stable checkpoint.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from statistics import mean
from typing import Any

from mergescale.evaluate.normalise import NormalisationWarning, mean_defined, normalise_held_in

EXPERT_MARGIN = 0.25
# The multitask model must keep at least this share of the experts' held-in scores on average: the study
# compares merges with it, so it must be a credible "trained on everything" reference. The paper's multitask
# models sit at 0.88-1.06 of their experts (its appendix tables); 0.85 leaves room for the tiny world's noise.
MULTITASK_RETENTION = 0.85

# Column labels for the printed matrix (a terminal is narrower than 12 task names).
SHORT = {
    "mcqa": "mcqa",
    "extractive_qa": "extqa",
    "closed_book_qa": "cbqa",
    "sentiment": "sent",
    "topic": "topic",
    "struct_to_text": "s2t",
    "summarisation": "summ",
    "paraphrase": "para",
    "completion": "compl",
    "nli": "nli",
    "coreference": "coref",
    "wsd": "wsd",
}


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    passed: bool
    detail: str


def primary(scores: dict[str, Any], model_id: str, task: str) -> float:
    metric = scores["primary_metric"][task]
    return float(scores["models"][model_id]["scores"][task][metric])


def sizes(scores: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for entry in scores["models"].values():
        if entry["size"] not in out:
            out.append(entry["size"])
    return out


def matrix(scores: dict[str, Any], size: str, kind: str) -> list[tuple[str, list[float]]]:
    """Rows (model label, primary score per task in held-in then held-out order) of one base's models."""
    tasks = [*scores["held_in"], *scores["held_out"]]
    rows = []
    for model_id, entry in scores["models"].items():
        if entry["size"] == size and entry["base"] == kind:
            label = entry["task"] or entry["role"]
            rows.append((label, [primary(scores, model_id, t) for t in tasks]))
    return rows


def quality_checks(scores: dict[str, Any]) -> list[Check]:
    """The world's quality checks, largest size last."""
    checks: list[Check] = []
    all_sizes = sizes(scores)
    for size in all_sizes:
        largest = size == all_sizes[-1]
        for kind in ("pt", "it"):
            base = f"{size}/{kind}/base"
            gains = {
                t: primary(scores, f"{size}/{kind}/experts/{t}", t) - primary(scores, base, t)
                for t in scores["held_in"]
            }
            worst = min(gains, key=gains.__getitem__)
            checks.append(
                Check(
                    f"{size}/{kind}: expert - base on own task (min)",
                    gains[worst],
                    gains[worst] >= EXPERT_MARGIN if largest else gains[worst] > 0,
                    f"worst {worst}; mean {mean(gains.values()):+.3f}",
                )
            )
            with warnings.catch_warnings():  # an expert scoring 0 leaves its task out of the mean
                warnings.simplefilter("ignore", NormalisationWarning)
                held_in = normalise_held_in(
                    {t: primary(scores, f"{size}/{kind}/multitask", t) for t in scores["held_in"]},
                    {t: primary(scores, f"{size}/{kind}/experts/{t}", t) for t in scores["held_in"]},
                )
            ratio = mean_defined(held_in.values())
            ratio = 0.0 if ratio is None else ratio  # every expert scoring 0 fails the check
            checks.append(
                Check(
                    f"{size}/{kind}: multitask / expert on held-in (mean)", ratio, ratio >= MULTITASK_RETENTION, ""
                )
            )
        pt = mean(primary(scores, f"{size}/pt/base", t) for t in scores["held_out"])
        it = mean(primary(scores, f"{size}/it/base", t) for t in scores["held_out"])
        checks.append(
            Check(
                f"{size}: IT base - PT base on held-out (mean)", it - pt, it > pt, f"PT {pt:.3f}, IT {it:.3f}"
            )
        )
        pre = scores["pretrain"][size]
        last = pre["last_stable_loss"]
        checks.append(
            Check(
                f"{size}: annealed - last stable (val loss)",
                pre["annealed_loss"] - last,
                pre["annealed_loss"] < last,
                f"last {last:.4f}",
            )
        )
        sma = pre["sma"]
        checks.append(
            Check(
                f"{size}: SMA of last {sma['window']} - last stable (val loss)",
                sma["loss"] - last,
                sma["loss"] < last,
                f"last {last:.4f}",
            )
        )
    return checks
