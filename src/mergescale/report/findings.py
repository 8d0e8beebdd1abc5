"""Each claim of the two papers beside what a study measured, with a verdict computed by a stated rule (pure).

Papers: "What Matters for Model Merging at Scale?" (Yadav et al., 2024, arXiv 2410.03617), its findings 1–6;
"Model Merging in Pre-training of Large Language Models" (Li et al., 2025, arXiv 2505.12082), the claims of
pre-training model averaging (PMA).

How a verdict is reached (:func:`Rules.describe` prints it with the numbers in use):

1. A claim is broken into **comparisons** of two measured values, each oriented so that a positive difference
   goes the claim's way (e.g. instruction-tuned − pre-trained held-in score, for one size, method and k).
2. A comparison is **for** the claim when its difference exceeds its **threshold**, **against** when it falls
   below minus the threshold, and **within the spread** otherwise. For the merging study's normalised scores
   the threshold is the spread over seeds, √(std₁² + std₂²) of the two sides' sample standard deviations, and
   at least ``min_effect`` (0.02 on the normalised scale: draws identical for every seed have no spread). A
   PMA run has one seed: a loss difference counts beyond ``loss_tolerance`` (1 %) of the reference loss, a
   gradient-norm statistic beyond ``grad_tolerance`` (10 %). For a claim of *equality* (finding 5) a
   comparison within its threshold is for the claim, one beyond it against.
3. **Verdict**: *reproduced* when at least half of the comparisons are decided (for or against) and at least
   75 % of the decided ones are for the claim; *not reproduced* when at least half are decided and at least
   75 % of those are against; *inconclusive* otherwise (most differences within the spread, or a mixed
   picture); *not measurable here* when the study holds no comparison of the kind the claim needs (the
   finding says why, e.g. one size only).

Every number a verdict rests on is kept in :attr:`Finding.comparisons` (the report's ``comparisons.csv``).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from mergescale.evaluate.normalise import SeedSummary
from mergescale.report.data import ReportData, human_count, kind_name
from mergescale.study.results import CurvePoint, PMAPoint, SummaryRow


class Verdict(str, Enum):
    REPRODUCED = "reproduced"
    NOT_REPRODUCED = "not reproduced"
    INCONCLUSIVE = "inconclusive"
    NOT_MEASURABLE = "not measurable here"


@dataclass(frozen=True)
class Rules:
    """The numbers of the verdict rule (see the module docstring)."""

    min_effect: float = 0.02  # smallest difference of normalised scores that counts
    decided_share: float = 0.5  # share of comparisons that must be beyond their threshold
    agreement: float = 0.75  # share of the decided comparisons that must go one way
    loss_tolerance: float = 0.01  # relative, for PMA losses (one seed)
    grad_tolerance: float = 0.10  # relative, for gradient-norm statistics

    def describe(self) -> str:
        return (
            "A comparison counts for a claim when its difference goes the claim's way by more than its "
            "threshold, against when it goes the other way by more, and is within the spread otherwise "
            f"(for a claim of equality: within the threshold is for it). Threshold for normalised scores: the "
            f"spread over seeds √(std₁² + std₂²), at least {self.min_effect:g}; for PMA losses "
            f"{self.loss_tolerance:.0%} of the reference loss, for gradient-norm statistics "
            f"{self.grad_tolerance:.0%} (one seed). Verdict: reproduced when at least "
            f"{self.decided_share:.0%} of the comparisons are decided and at least {self.agreement:.0%} of "
            f"the decided ones are for the claim; not reproduced when at least {self.decided_share:.0%} are "
            f"decided and at least {self.agreement:.0%} of those are against; inconclusive otherwise; not "
            "measurable here when the study holds no comparison the claim needs."
        )


@dataclass(frozen=True)
class Est:
    """A measured value: a mean and its spread (sample std over seeds; None with one seed or none known)."""

    mean: float
    std: float | None = None

    def text(self, digits: int = 2) -> str:
        return f"{self.mean:.{digits}f}" + (f" ± {self.std:.{digits}f}" if self.std is not None else "")


def est(value: SeedSummary | float | None) -> Est | None:
    if value is None:
        return None
    if isinstance(value, SeedSummary):
        return None if value.mean is None else Est(value.mean, value.std)
    return None if math.isnan(value) else Est(float(value))


@dataclass(frozen=True)
class Comparison:
    """One comparison a verdict counts: ``delta`` is oriented so that > 0 goes the claim's way."""

    label: str
    value: Est  # the side the claim says is larger (or better)
    reference: Est
    delta: float
    threshold: float
    outcome: int  # +1 for the claim, −1 against, 0 within the spread

    @property
    def outcome_text(self) -> str:
        return {1: "for", -1: "against", 0: "within spread"}[self.outcome]


@dataclass(frozen=True)
class Finding:
    """A claim of a paper, what this study measured, and the verdict."""

    id: str
    paper: str  # "merging" (Yadav et al. 2024) or "pma" (Li et al. 2025)
    claim: str
    short: str  # the claim in a few words, for the terminal table
    verdict: Verdict
    measured: str
    rule: str  # which comparisons the verdict counts
    comparisons: tuple[Comparison, ...] = ()

    @property
    def counts(self) -> tuple[int, int, int]:
        """(for, against, within the spread)."""
        out = [c.outcome for c in self.comparisons]
        return out.count(1), out.count(-1), out.count(0)

    @property
    def tally(self) -> str:
        if not self.comparisons:
            return "–"
        f, a, w = self.counts
        return f"{f} for, {a} against, {w} within spread (of {len(self.comparisons)})"


# -- comparisons -----------------------------------------------------------------------------------------------
def _spread(*values: Est) -> float:
    return math.sqrt(sum((v.std or 0.0) ** 2 for v in values))


def greater(label: str, value: Est, reference: Est, threshold: float) -> Comparison:
    """The claim ``value > reference``."""
    delta = value.mean - reference.mean
    outcome = 1 if delta > threshold else -1 if delta < -threshold else 0
    return Comparison(label, value, reference, delta, threshold, outcome)


def greater_over_seeds(label: str, value: Est, reference: Est, rules: Rules) -> Comparison:
    return greater(label, value, reference, max(_spread(value, reference), rules.min_effect))


def same_over_seeds(label: str, value: Est, reference: Est, rules: Rules) -> Comparison:
    """The claim ``value ≈ reference``: for when |Δ| is within the threshold, against beyond it."""
    threshold = max(_spread(value, reference), rules.min_effect)
    delta = value.mean - reference.mean
    return Comparison(label, value, reference, delta, threshold, 1 if abs(delta) <= threshold else -1)


def lower(label: str, value: float, reference: float, tolerance: float) -> Comparison:
    """The claim ``value < reference`` (a loss, a gradient-norm spread), beyond ``tolerance`` × |reference|."""
    threshold = tolerance * abs(reference)
    delta = reference - value
    outcome = 1 if delta > threshold else -1 if delta < -threshold else 0
    return Comparison(label, Est(value), Est(reference), delta, threshold, outcome)


def verdict_of(comparisons: Sequence[Comparison], rules: Rules) -> Verdict:
    """The tally rule of the module docstring."""
    n = len(comparisons)
    if n == 0:
        return Verdict.NOT_MEASURABLE
    support = sum(c.outcome == 1 for c in comparisons)
    against = sum(c.outcome == -1 for c in comparisons)
    decided = support + against
    if decided < rules.decided_share * n or decided == 0:
        return Verdict.INCONCLUSIVE
    if support >= rules.agreement * decided:
        return Verdict.REPRODUCED
    if against >= rules.agreement * decided:
        return Verdict.NOT_REPRODUCED
    return Verdict.INCONCLUSIVE


def _mean_est(values: Iterable[Est]) -> Est | None:
    """Mean of the means, with the root mean square of the stds (the typical spread)."""
    values = list(values)
    if not values:
        return None
    stds = [v.std for v in values if v.std is not None]
    return Est(
        sum(v.mean for v in values) / len(values), math.sqrt(sum(s * s for s in stds) / len(stds)) if stds else None
    )


def _headline(
    comparisons: Sequence[Comparison], value_name: str, reference_name: str, over: str, what: str = ""
) -> str:
    """``what: value ± std vs reference ± std (mean over n <over>)``, the stds being typical seed spreads."""
    v = _mean_est(c.value for c in comparisons)
    r = _mean_est(c.reference for c in comparisons)
    if v is None or r is None:
        return ""
    prefix = f"{what}: " if what else ""
    return (
        f"{prefix}{value_name} {v.text()} vs {reference_name} {r.text()} (mean of {len(comparisons)} comparisons, one "
        f"per {over}; ± the typical std over seeds)"
    )


def _finding(
    id: str, paper: str, claim: str, short: str, comparisons: list[Comparison], rules: Rules, rule: str,
    headline: str, why_not: str = "", extra: str = "",
) -> Finding:  # fmt: skip
    if not comparisons:
        return Finding(id, paper, claim, short, Verdict.NOT_MEASURABLE, why_not or "no data", rule)
    f, a, w = (sum(c.outcome == o for c in comparisons) for o in (1, -1, 0))
    measured = f"{headline}. {f} for, {a} against, {w} within the spread, of {len(comparisons)}."
    if extra:
        measured += " " + extra
    return Finding(id, paper, claim, short, verdict_of(comparisons, rules), measured, rule, tuple(comparisons))


# -- the merging paper -----------------------------------------------------------------------------------------
MERGING_CLAIMS = {
    "S1": "Merging works better when experts come from a strong (instruction-tuned) base than from a pre-trained one.",
    "S2": "Larger models merge more easily (held-in closer to the experts).",
    "S3a": "Merged models generalise better than the base on held-out tasks, for every size, method and count.",
    "S3b": "With a strong base, more experts give better held-out scores.",
    "S4a": "Bigger models can merge more experts with little held-in loss.",
    "S4b": "Small weak (pre-trained) bases lose held-in performance quickly as k grows.",
    "S5": "At large scale with a strong base, the four methods perform about the same (simple averaging is enough).",
    "S6": "When merging many large experts, the merged model can beat the multitask model on held-out tasks.",
}


def _group_label(data: ReportData, group: str) -> str:
    g = data.results.group(group)
    return f"{g.size or g.name} {g.base_kind or ''}".strip()


def _size_note(data: ReportData) -> str:
    parts = []
    for size in data.sizes:
        params = next((g.parameters for g in data.groups if (g.size or g.name) == size), None)
        parts.append(f"{size} ({human_count(params)} parameters)")
    return "Sizes here: " + ", ".join(parts) + "; the paper's are 1B–64B."


def merging_findings(data: ReportData, rules: Rules = Rules()) -> list[Finding]:
    """Findings 1–6 of Yadav et al. (2024) on the study's summary rows."""
    if not data.has_merges:
        why = "the study holds no evaluated merge (no merging study among the folders given)"
        return [
            Finding(i, "merging", claim, _SHORT[i], Verdict.NOT_MEASURABLE, why, _RULES[i])
            for i, claim in MERGING_CLAIMS.items()
        ]
    return [
        _s1(data, rules), _s2(data, rules), _s3a(data, rules), _s3b(data, rules), _s4a(data, rules),
        _s4b(data, rules), _s5(data, rules), _s6(data, rules),
    ]  # fmt: skip


_SHORT = {
    "S1": "IT base merges better than PT",
    "S2": "larger models merge more easily",
    "S3a": "merges beat the base held-out",
    "S3b": "IT: more experts, better held-out",
    "S4a": "bigger models lose less as k grows",
    "S4b": "small PT base loses held-in with k",
    "S5": "methods alike at scale (IT)",
    "S6": "large merges beat multitask held-out",
    "P1": "average beats last checkpoint",
    "P2": "average recovers part of anneal",
    "P3a": "larger N helps late",
    "P3b": "larger N hurts early",
    "P4a": "EMA α=0.2 beats α=0.1",
    "P4b": "WMA best early",
    "P5": "PMA-init smooths grad norms",
    "P6": "spike: average beats rollback",
}

_RULES = {
    "S1": "per size, method and k: instruction-tuned − pre-trained normalised held-in score",
    "S2": "per base kind, method, k and pair of consecutive sizes: larger − smaller normalised held-in score",
    "S3a": "per group, method and k: normalised held-out score − 1 (the base)",
    "S3b": "per instruction-tuned group and method: held-out score at the largest k − at the smallest k",
    "S4a": (
        "per base kind, method and pair of consecutive sizes: held-in drop from the smallest to the largest k "
        "of the smaller model − that of the larger"
    ),
    "S4b": "per method, smallest pre-trained group: held-in score at the smallest k − at the largest k",
    "S5": "largest instruction-tuned group, per k and split: best − worst method, for when within the threshold",
    "S6": (
        "largest size (its instruction-tuned group when there is one), largest k, per method: normalised held-out "
        "score − the multitask model's"
    ),
    "P1": "per averaging series and end step along the run: last checkpoint's validation loss − the average's",
    "P2": "per averaging series, at each end step with an annealed model: last checkpoint's loss − the average's",
    "P3a": "per run, strategy and interval, at the latest ablation end step: loss at the smallest N − at the largest",
    "P3b": "per run, strategy and interval, at the earliest ablation end step: loss at the largest N − at the smallest",
    "P4a": "per run, N and interval, at the earliest end step: loss of EMA α=0.1 − of EMA α=0.2",
    "P4b": "per run, N and interval, at the earliest end step: best other strategy's loss − WMA's",
    "P5": "per run: std over steps of the gradient norm, continued from the last checkpoint − from the PMA model",
    "P6": "per run: final loss after rolling back to the last pre-spike checkpoint − after resuming from the average",
}


def _s1(data: ReportData, rules: Rules) -> Finding:
    comps = []
    for size in data.sizes:
        it, pt = data.group_at("it", size), data.group_at("pt", size)
        if it is None or pt is None:
            continue
        for label in data.labels:
            for k in data.ks:
                a, b = data.row(it.name, label, k), data.row(pt.name, label, k)
                va, vb = est(a.held_in) if a else None, est(b.held_in) if b else None
                if va and vb:
                    comps.append(greater_over_seeds(f"{size}, {label}, k={k}", va, vb, rules))
    why = f"needs a pre-trained and an instruction-tuned base of one size; base kinds here: {_kinds(data)}"
    return _finding(
        "S1", "merging", MERGING_CLAIMS["S1"], _SHORT["S1"], comps, rules, _RULES["S1"],
        _headline(comps, "instruction-tuned", "pre-trained", "size, method and k", "held-in"), why,
    )  # fmt: skip


def _kinds(data: ReportData) -> str:
    return ", ".join(kind_name(k) for k in data.kinds) or "none"


def _consecutive_sizes(data: ReportData, kind: str) -> list[tuple[str, str, str]]:
    """(smaller group, larger group, label) for consecutive sizes of one base kind."""
    groups = [data.group_at(kind, s) for s in data.sizes]
    present = [g for g in groups if g is not None]
    return [(a.name, b.name, f"{a.size}→{b.size}") for a, b in zip(present, present[1:], strict=False)]


def _s2(data: ReportData, rules: Rules) -> Finding:
    comps = []
    for kind in data.kinds:
        for small, large, pair in _consecutive_sizes(data, kind):
            for label in data.labels:
                for k in data.ks:
                    a, b = data.row(large, label, k), data.row(small, label, k)
                    va, vb = est(a.held_in) if a else None, est(b.held_in) if b else None
                    if va and vb:
                        comps.append(greater_over_seeds(f"{kind} {pair}, {label}, k={k}", va, vb, rules))
    return _finding(
        "S2", "merging", MERGING_CLAIMS["S2"], _SHORT["S2"], comps, rules, _RULES["S2"],
        _headline(comps, "larger", "smaller", "base kind, size pair, method and k", "held-in"),
        f"needs two sizes of one base kind. {_size_note(data)}", _size_note(data),
    )  # fmt: skip


def _s3a(data: ReportData, rules: Rules) -> Finding:
    comps = []
    for r in data.rows:
        v = est(r.held_out)
        if v:
            comps.append(greater_over_seeds(f"{_group_label(data, r.group)}, {r.label}, k={r.k}", v, Est(1.0), rules))
    return _finding(
        "S3a", "merging", MERGING_CLAIMS["S3a"], _SHORT["S3a"], comps, rules, _RULES["S3a"],
        _headline(comps, "merged", "base", "group, method and k", "held-out ÷ base"),
        "the study has no held-out task scored (or no base model to normalise by)",
    )  # fmt: skip


def _extreme_ks(data: ReportData, group: str, label: str) -> tuple[SummaryRow, SummaryRow] | None:
    rows = data.rows_of(group, label)
    if len(rows) < 2 or rows[0].k == rows[-1].k:
        return None
    return rows[0], rows[-1]


def _s3b(data: ReportData, rules: Rules) -> Finding:
    comps = []
    for g in data.groups:
        if g.base_kind != "it":
            continue
        for label in data.labels:
            pair = _extreme_ks(data, g.name, label)
            if pair is None:
                continue
            lo, hi = (est(r.held_out) for r in pair)
            if lo and hi:
                comps.append(greater_over_seeds(f"{_group_label(data, g.name)}, {label}, k={pair[0].k}→{pair[1].k}", hi, lo, rules))
    why = (
        "needs an instruction-tuned base" if "it" not in data.kinds else "needs at least two numbers of experts"
    ) + f"; base kinds here: {_kinds(data)}, k: {data.ks}"
    return _finding(
        "S3b", "merging", MERGING_CLAIMS["S3b"], _SHORT["S3b"], comps, rules, _RULES["S3b"],
        _headline(comps, "largest k", "smallest k", "group and method", "held-out"), why,
    )  # fmt: skip


def _drop(pair: tuple[SummaryRow, SummaryRow]) -> Est | None:
    lo, hi = est(pair[0].held_in), est(pair[1].held_in)
    if lo is None or hi is None:
        return None
    return Est(lo.mean - hi.mean, math.sqrt((lo.std or 0) ** 2 + (hi.std or 0) ** 2) if (lo.std or hi.std) else None)


def _s4a(data: ReportData, rules: Rules) -> Finding:
    comps = []
    for kind in data.kinds:
        for small, large, pair_label in _consecutive_sizes(data, kind):
            for label in data.labels:
                ps, pl = _extreme_ks(data, small, label), _extreme_ks(data, large, label)
                if ps is None or pl is None:
                    continue
                ds, dl = _drop(ps), _drop(pl)
                if ds and dl:
                    comps.append(greater_over_seeds(f"{kind} {pair_label}, {label}, k={ps[0].k}→{ps[1].k}", ds, dl, rules))
    why = f"needs two sizes of one base kind and two numbers of experts (k here: {data.ks}). {_size_note(data)}"
    return _finding(
        "S4a", "merging", MERGING_CLAIMS["S4a"], _SHORT["S4a"], comps, rules, _RULES["S4a"],
        _headline(comps, "smaller model", "larger", "base kind, size pair and method", "held-in drop from smallest to largest k"), why,
        _size_note(data),
    )  # fmt: skip


def _s4b(data: ReportData, rules: Rules) -> Finding:
    comps = []
    pt = [g for g in data.groups if g.base_kind == "pt"]
    smallest = min(pt, key=lambda g: (g.parameters or 0, g.size or "")) if pt else None
    if smallest is not None:
        for label in data.labels:
            pair = _extreme_ks(data, smallest.name, label)
            if pair is None:
                continue
            lo, hi = est(pair[0].held_in), est(pair[1].held_in)
            if lo and hi:
                comps.append(greater_over_seeds(f"{_group_label(data, smallest.name)}, {label}, k={pair[0].k}→{pair[1].k}", lo, hi, rules))
    why = ("needs a pre-trained base" if smallest is None else "needs at least two numbers of experts") + (
        f"; base kinds here: {_kinds(data)}, k: {data.ks}"
    )
    return _finding(
        "S4b", "merging", MERGING_CLAIMS["S4b"], _SHORT["S4b"], comps, rules, _RULES["S4b"],
        _headline(comps, "smallest k", "largest k", "method", "held-in"), why,
    )  # fmt: skip


def _largest_groups(data: ReportData, kind: str | None) -> list:
    if not data.sizes:
        return []
    size = data.sizes[-1]
    return [g for g in data.groups if (g.size or g.name) == size and (kind is None or g.base_kind == kind)]


def _s5(data: ReportData, rules: Rules) -> Finding:
    comps = []
    groups = _largest_groups(data, "it")
    for g in groups:
        for k in data.ks:
            for split in ("held_in", "held_out"):
                values = {lab: est(getattr(r, split)) for lab in data.labels if (r := data.row(g.name, lab, k))}
                values = {lab: v for lab, v in values.items() if v is not None}
                if len(values) < 2:
                    continue
                best = max(values, key=lambda lab: values[lab].mean)
                worst = min(values, key=lambda lab: values[lab].mean)
                comps.append(
                    same_over_seeds(f"{_group_label(data, g.name)}, k={k}, {split.replace('_', '-')}: {best} vs {worst}",
                                    values[best], values[worst], rules)
                )  # fmt: skip
    why = (
        "needs an instruction-tuned base at the largest size" if not groups else "needs at least two methods"
    ) + f"; base kinds here: {_kinds(data)}"
    extra = f"{_size_note(data)} The largest, {data.sizes[-1]}, is the one judged." if comps else ""
    return _finding(
        "S5", "merging", MERGING_CLAIMS["S5"], _SHORT["S5"], comps, rules, _RULES["S5"],
        _headline(comps, "best method", "worst", "k and split", "normalised score"), why, extra,
    )  # fmt: skip


def _s6(data: ReportData, rules: Rules) -> Finding:
    comps = []
    k = data.ks[-1] if data.ks else None
    # the paper's evidence is its instruction-tuned 64B groups; with no instruction-tuned base, every largest group
    for g in _largest_groups(data, "it") or _largest_groups(data, None):
        for label in data.labels:
            r = data.row(g.name, label, k) if k is not None else None
            if r is None:
                continue
            v, m = est(r.held_out), est(r.multitask_held_out)
            if v and m:
                comps.append(greater_over_seeds(f"{_group_label(data, g.name)}, {label}, k={k}", v, m, rules))
    return _finding(
        "S6", "merging", MERGING_CLAIMS["S6"], _SHORT["S6"], comps, rules, _RULES["S6"],
        _headline(comps, "merged", "multitask", "group and method", f"held-out at k={k}"),
        "needs a multitask model and held-out tasks in the largest size's groups", _size_note(data),
    )  # fmt: skip


# -- the pre-training paper ------------------------------------------------------------------------------------
PMA_CLAIMS = {
    "P1": "In the stable (constant learning rate) phase, the average of recent checkpoints beats the last checkpoint.",
    "P2": "The average recovers part of the gain of annealing the learning rate, without the anneal.",
    "P3a": "Late in training, averaging more checkpoints (larger N) helps.",
    "P3b": "Early in training, a larger N hurts (it pulls in unstable early weights).",
    "P4a": "EMA with α = 0.2 beats α = 0.1 (early in training).",
    "P4b": "WMA is the best strategy early in training.",
    "P5": "Initialising continued training from a PMA model (PMA-init) gives smoother gradient norms.",
    "P6": "After a loss spike, resuming from the average of the checkpoints before it beats rolling back to the last one.",
}


def _series(p: PMAPoint) -> str:
    strategy = p.strategy + (f" α={p.alpha:g}" if p.strategy == "ema" and p.alpha is not None else "")
    return f"{strategy} N={p.n}" + (f" V={p.interval}" if p.interval else "")


def pma_findings(data: ReportData, rules: Rules = Rules()) -> list[Finding]:
    """The pre-training paper's claims on the study's PMA tables (pma_points, pma_curves, pma_results)."""
    r = data.results
    return [
        _p1(r.pma_points, rules), _p2(r.pma_points, rules), _p3(r.pma_points, rules, late=True),
        _p3(r.pma_points, rules, late=False), _p4a(r.pma_points, rules), _p4b(r.pma_points, rules),
        _p5(r.pma_curves, r.pma_results, rules), _p6(r.pma_curves, r.pma_results, rules),
    ]  # fmt: skip


def _pma_finding(id: str, comps: list[Comparison], rules: Rules, headline: str, why: str, extra: str = "") -> Finding:
    return _finding("P" + id[1:], "pma", PMA_CLAIMS[id], _SHORT[id], comps, rules, _RULES[id], headline, why, extra)


def _loss_headline(
    comps: Sequence[Comparison], value_name: str, reference_name: str, over: str, what: str = "validation loss"
) -> str:
    if not comps:
        return ""
    v = sum(c.value.mean for c in comps) / len(comps)
    ref = sum(c.reference.mean for c in comps) / len(comps)
    return f"{what}: {value_name} {v:.4g} vs {reference_name} {ref:.4g} (mean of {len(comps)} comparisons, one per {over})"


def _p1(points: Sequence[PMAPoint], rules: Rules) -> Finding:
    comps = [
        lower(f"{p.run}, {_series(p)}, step {p.end_step}", p.loss, p.last_loss, rules.loss_tolerance)
        for p in points
        if p.kind == "along" and p.loss is not None and p.last_loss is not None
    ]
    return _pma_finding(
        "P1", comps, rules, _loss_headline(comps, "average", "last checkpoint", "averaging series and end step"),
        "the study holds no PMA point along a run (pma_points, kind 'along')",
    )


def _p2(points: Sequence[PMAPoint], rules: Rules) -> Finding:
    with_anneal = [p for p in points if p.loss is not None and p.last_loss is not None and p.annealed_loss is not None]
    along = [p for p in with_anneal if p.kind == "along"] or with_anneal
    comps = [lower(f"{p.run}, {_series(p)}, step {p.end_step}", p.loss, p.last_loss, rules.loss_tolerance) for p in along]
    shares = [p.recovered for p in along if p.recovered is not None and math.isfinite(p.recovered)]
    extra = ""
    if shares:
        extra = (
            f"Share of the anneal's gain recovered, (PMA − last) / (annealed − last): median {statistics.median(shares):.0%}"
            f" (range {min(shares):.0%} to {max(shares):.0%})."
        )
    gains = [p.last_loss - p.annealed_loss for p in along if p.last_loss is not None and p.annealed_loss is not None]
    if gains and all(g <= 0 for g in gains):
        extra += " The anneal itself did not lower the loss here, so there is no gain to recover."
    return _pma_finding(
        "P2", comps, rules, _loss_headline(comps, "average", "last checkpoint", "point with an annealed model"),
        "the study holds no PMA point with an annealed model's loss (pma_points.annealed_loss)", extra,
    )


def _ablation_by(points: Sequence[PMAPoint]) -> dict[str, list[PMAPoint]]:
    by_run: dict[str, list[PMAPoint]] = defaultdict(list)
    for p in points:
        if p.kind == "ablation" and p.loss is not None:
            by_run[p.run].append(p)
    return by_run


def _p3(points: Sequence[PMAPoint], rules: Rules, *, late: bool) -> Finding:
    id = "P3a" if late else "P3b"
    comps = []
    why = "the study holds no window ablation (pma_points, kind 'ablation') with two window sizes N"
    for run, pts in sorted(_ablation_by(points).items()):
        ends = sorted({p.end_step for p in pts})
        if len(ends) < 2:
            why = f"the ablation of run {run!r} has one end step ({ends[0]}): early and late cannot be told apart"
            continue
        end = ends[-1] if late else ends[0]
        series: dict[tuple, dict[int, PMAPoint]] = defaultdict(dict)
        for p in pts:
            if p.end_step == end:
                series[(p.strategy, p.alpha, p.interval)][p.n] = p
        for (_strategy, _alpha, interval), by_n in sorted(series.items(), key=lambda kv: repr(kv[0])):
            if len(by_n) < 2:
                continue
            small, large = by_n[min(by_n)], by_n[max(by_n)]
            label = f"{run}, {_series(small).split(' N=')[0]}{' V=' + interval if interval else ''}, step {end}: N={small.n} vs N={large.n}"
            if late:  # larger N helps: its loss is lower
                comps.append(lower(label, large.loss, small.loss, rules.loss_tolerance))
            else:  # larger N hurts: the smaller window's loss is lower
                comps.append(lower(label, small.loss, large.loss, rules.loss_tolerance))
    name = ("largest N", "smallest N") if late else ("smallest N", "largest N")
    return _pma_finding(id, comps, rules, _loss_headline(comps, *name, "run, strategy and interval"), why)


def _earliest(points: Sequence[PMAPoint]) -> dict[str, list[PMAPoint]]:
    """Per run, the points (ablation first, else along) at its earliest end step holding several strategies."""
    out: dict[str, list[PMAPoint]] = {}
    for kind in ("ablation", "along"):
        by_run: dict[str, list[PMAPoint]] = defaultdict(list)
        for p in points:
            if p.kind == kind and p.loss is not None:
                by_run[p.run].append(p)
        for run, pts in by_run.items():
            if run in out:
                continue
            for end in sorted({p.end_step for p in pts}):
                here = [p for p in pts if p.end_step == end]
                if len({(p.strategy, p.alpha) for p in here}) > 1:
                    out[run] = here
                    break
    return out


def _p4a(points: Sequence[PMAPoint], rules: Rules) -> Finding:
    comps = []
    for run, pts in sorted(_earliest(points).items()):
        ema = defaultdict(dict)
        for p in pts:
            if p.strategy == "ema" and p.alpha is not None:
                ema[(p.n, p.interval)][round(p.alpha, 6)] = p
        for (n, interval), by_alpha in sorted(ema.items(), key=lambda kv: repr(kv[0])):
            if 0.2 in by_alpha and 0.1 in by_alpha:
                a2, a1 = by_alpha[0.2], by_alpha[0.1]
                comps.append(lower(f"{run}, N={n}{' V=' + interval if interval else ''}, step {a2.end_step}", a2.loss, a1.loss, rules.loss_tolerance))
    return _pma_finding(
        "P4a", comps, rules, _loss_headline(comps, "EMA α=0.2", "α=0.1", "run, N and interval"),
        "the study holds no pair of EMA averages with α = 0.2 and α = 0.1 at one end step (pma_points)",
    )


def _p4b(points: Sequence[PMAPoint], rules: Rules) -> Finding:
    comps = []
    for run, pts in sorted(_earliest(points).items()):
        by_window: dict[tuple, list[PMAPoint]] = defaultdict(list)
        for p in pts:
            by_window[(p.n, p.interval)].append(p)
        for (n, interval), here in sorted(by_window.items(), key=lambda kv: repr(kv[0])):
            wma = [p for p in here if p.strategy == "wma"]
            others = [p for p in here if p.strategy != "wma"]
            if not wma or not others:
                continue
            best = min(others, key=lambda p: p.loss)
            comps.append(
                lower(f"{run}, N={n}{' V=' + interval if interval else ''}, step {wma[0].end_step}: WMA vs {_series(best).split(' N=')[0]}",
                      wma[0].loss, best.loss, rules.loss_tolerance)
            )  # fmt: skip
    return _pma_finding(
        "P4b", comps, rules, _loss_headline(comps, "WMA", "best other strategy", "run, N and interval"),
        "the study holds no WMA average beside another strategy at one end step (pma_points)",
    )


def _curve(curves: Sequence[CurvePoint], run: str, experiment: str, variant: str) -> list[CurvePoint]:
    return sorted((c for c in curves if (c.run, c.experiment, c.variant) == (run, experiment, variant)), key=lambda c: c.step)


def _p5(curves: Sequence[CurvePoint], results: dict, rules: Rules) -> Finding:
    comps = []
    jumps = []
    for run in sorted({c.run for c in curves if c.experiment == "pma_init"}):
        g_pma = [c.grad_norm for c in _curve(curves, run, "pma_init", "pma") if c.grad_norm is not None]
        g_last = [c.grad_norm for c in _curve(curves, run, "pma_init", "last") if c.grad_norm is not None]
        if len(g_pma) < 2 or len(g_last) < 2:
            continue
        comps.append(lower(f"{run}: std of the gradient norm", statistics.pstdev(g_pma), statistics.pstdev(g_last), rules.grad_tolerance))
        jumps.append((run, max(abs(b - a) for a, b in zip(g_pma, g_pma[1:], strict=False)),
                      max(abs(b - a) for a, b in zip(g_last, g_last[1:], strict=False))))  # fmt: skip
    extra = "; ".join(f"{run}: largest step-to-step jump {jp:.3g} (PMA-init) vs {jl:.3g} (last)" for run, jp, jl in jumps)
    headline = ""
    if comps:
        headline = _loss_headline(comps, "PMA-init", "last checkpoint", "run", "std of the gradient norm over steps")
    return _pma_finding(
        "P5", comps, rules, headline,
        "the study holds no PMA-init curves with gradient norms (pma_curves, experiment 'pma_init', variants "
        "'pma' and 'last')", (extra + ".") if extra else "",
    )  # fmt: skip


_FINAL_METRICS = ("heldout_loss", "final_heldout_loss", "final_loss", "final_validation_loss", "validation_loss")


def final_loss(curves: Sequence[CurvePoint], results: dict, run: str, experiment: str, variant: str) -> tuple[float | None, str]:
    """An arm's final loss: from pma_results (held-out loss preferred) or else the last point of its curve."""
    for metric in _FINAL_METRICS:
        value = results.get((run, experiment, variant, metric))
        if value is not None and math.isfinite(value):
            return float(value), metric
    points = [c for c in _curve(curves, run, experiment, variant) if c.loss is not None]
    return (points[-1].loss, f"training loss at step {points[-1].step}") if points else (None, "")


def _p6(curves: Sequence[CurvePoint], results: dict, rules: Rules) -> Finding:
    comps = []
    notes = []
    runs = sorted({c.run for c in curves if c.experiment == "spike"} | {k[0] for k in results if k[1] == "spike"})
    for run in runs:
        avg, how = final_loss(curves, results, run, "spike", "average")
        back, _ = final_loss(curves, results, run, "spike", "rollback")
        if avg is None or back is None:
            continue
        comps.append(lower(f"{run}: {how}", avg, back, rules.loss_tolerance))
        unspiked, _ = final_loss(curves, results, run, "spike", "unspiked")
        if unspiked is not None:
            notes.append(f"{run}: unspiked control {unspiked:.4f}")
    return _pma_finding(
        "P6", comps, rules, _loss_headline(comps, "average", "rollback", "run", "final loss"),
        "the study holds no spike-recovery arms 'average' and 'rollback' (pma_curves / pma_results, experiment "
        "'spike')", ("; ".join(notes) + ".") if notes else "",
    )  # fmt: skip


def evaluate_findings(data: ReportData, rules: Rules = Rules()) -> list[Finding]:
    """Every claim of both papers, each with its verdict (merging findings first)."""
    return [*merging_findings(data, rules), *pma_findings(data, rules)]
