"""Findings verdicts on synthetic study tables built to make each claim true, false and inconclusive."""

from __future__ import annotations

import math

import pytest
from synthetic import GROUPS, Group, merging_study, paper_like, pma_study

from mergescale.report.data import prepare
from mergescale.report.findings import (
    Comparison,
    Est,
    Rules,
    Verdict,
    evaluate_findings,
    greater_over_seeds,
    lower,
    merging_findings,
    pma_findings,
    same_over_seeds,
    verdict_of,
)

R, NR, INC, NM = Verdict.REPRODUCED, Verdict.NOT_REPRODUCED, Verdict.INCONCLUSIVE, Verdict.NOT_MEASURABLE


def verdicts(results) -> dict[str, Verdict]:
    return {f.id: f.verdict for f in evaluate_findings(prepare(results))}


# -- the rule itself -------------------------------------------------------------------------------------------
def test_a_difference_counts_only_beyond_the_spread_over_seeds() -> None:
    rules = Rules()
    # 0.10 apart, each ± 0.05: spread √(0.05² + 0.05²) = 0.0707 < 0.10 -> for
    c = greater_over_seeds("x", Est(0.6, 0.05), Est(0.5, 0.05), rules)
    assert c.outcome == 1 and c.threshold == pytest.approx(math.sqrt(0.005))
    # 0.06 apart with the same spread: within
    assert greater_over_seeds("x", Est(0.56, 0.05), Est(0.5, 0.05), rules).outcome == 0
    assert greater_over_seeds("x", Est(0.4, 0.05), Est(0.5, 0.05), rules).outcome == -1
    # no spread at all (identical draws): the floor min_effect decides
    assert greater_over_seeds("x", Est(0.51), Est(0.5), rules).outcome == 0
    assert greater_over_seeds("x", Est(0.53), Est(0.5), rules).outcome == 1
    # equality: within the threshold is for the claim
    assert same_over_seeds("x", Est(0.51, 0.01), Est(0.5, 0.01), rules).outcome == 1
    assert same_over_seeds("x", Est(0.7, 0.01), Est(0.5, 0.01), rules).outcome == -1
    # losses: lower is the claim's way, beyond the relative tolerance
    assert lower("x", 2.9, 3.0, 0.01).outcome == 1
    assert lower("x", 2.99, 3.0, 0.01).outcome == 0
    assert lower("x", 3.1, 3.0, 0.01).outcome == -1


def _comps(*outcomes: int) -> list[Comparison]:
    return [Comparison("c", Est(0), Est(0), 0.0, 0.0, o) for o in outcomes]


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ((1, 1, 1, 1), R),
        ((1, 1, 1, -1), R),  # 3 of 4 decided for: 75 %
        ((1, 1, -1, -1), INC),  # mixed
        ((-1, -1, -1, 0), NR),
        ((1, 0, 0, 0), INC),  # most within the spread
        ((1, 1, 0, 0), R),  # half decided, all for
        ((), NM),
    ],
)
def test_the_tally_rule(outcomes: tuple[int, ...], expected: Verdict) -> None:
    assert verdict_of(_comps(*outcomes), Rules()) is expected


# -- the merging paper -----------------------------------------------------------------------------------------
def test_a_paper_like_study_reproduces_every_merging_claim() -> None:
    found = verdicts(merging_study(paper_like))
    assert {k: v for k, v in found.items() if k.startswith("S")} == {
        "S1": R, "S2": R, "S3a": R, "S3b": R, "S4a": R, "S4b": R, "S5": R, "S6": R,
    }  # fmt: skip


def _flip(values, **changes):
    """paper_like with some claims turned around."""

    def v(g: Group, method: str, k: int):
        held_in, held_out, spread = values(g, method, k)
        size = {"s": 0, "m": 1}[g.size]
        if changes.get("pt_better") and g.kind == "pt":
            held_in += 0.4
        if changes.get("smaller_better"):
            held_in += 0.3 * (1 - size)
        if changes.get("held_out_below_base"):
            held_out -= 0.4
        if changes.get("it_held_out_falls") and g.kind == "it":
            held_out -= 0.04 * (k - 2)
        if changes.get("large_drops_more"):
            held_in -= 0.3 * size * (k - 2) / 6
        if changes.get("pt_rises_with_k") and g.kind == "pt" and size == 0:
            held_in += 0.5 * (k - 2) / 6  # paper_like drops 0.30 from k = 2 to 8: now it rises 0.20
        if changes.get("methods_differ") and g.kind == "it" and size == 1:
            held_in += {"linear": 0.0, "task_arithmetic": 0.1, "ties": 0.2, "dare_ties": -0.2}[method]
            held_out += {"linear": 0.0, "task_arithmetic": 0.1, "ties": 0.2, "dare_ties": -0.2}[method]
        if changes.get("noisy"):
            spread = 0.5
        return held_in, held_out, spread

    return v


@pytest.mark.parametrize(
    ("change", "finding"),
    [
        ("pt_better", "S1"),
        ("smaller_better", "S2"),
        ("held_out_below_base", "S3a"),
        ("it_held_out_falls", "S3b"),
        ("large_drops_more", "S4a"),
        ("pt_rises_with_k", "S4b"),
        ("methods_differ", "S5"),
    ],
)
def test_each_merging_claim_turned_around_is_not_reproduced(change: str, finding: str) -> None:
    found = verdicts(merging_study(_flip(paper_like, **{change: True})))
    assert found[finding] is NR, found


def test_merges_below_the_multitask_model_do_not_reproduce_finding_6() -> None:
    assert verdicts(merging_study(paper_like, multitask=(0.95, 1.6)))["S6"] is NR


def test_differences_inside_a_wide_seed_spread_are_inconclusive() -> None:
    found = verdicts(merging_study(_flip(paper_like, noisy=True)))
    for finding in ("S1", "S2", "S3a", "S3b", "S4a", "S6"):
        assert found[finding] is INC, (finding, found[finding])


def test_finding_5_is_inconclusive_when_methods_agree_at_some_k_only() -> None:
    def v(g: Group, method: str, k: int):
        held_in, held_out, spread = paper_like(g, method, k)
        if g.name == "m-it" and k == 8:
            offset = {"linear": 0.0, "task_arithmetic": 0.1, "ties": 0.2, "dare_ties": -0.2}[method]
            held_in, held_out = held_in + offset, held_out + offset
        if g.name == "m-it" and k == 4:
            offset = {"linear": 0.0, "task_arithmetic": 0.1, "ties": 0.2, "dare_ties": -0.2}[method]
            held_in += offset
        return held_in, held_out, spread

    # k = 2: 2 for; k = 4: 1 for (held-out), 1 against; k = 8: 2 against -> 3 for, 3 against
    finding = next(f for f in evaluate_findings(prepare(merging_study(v))) if f.id == "S5")
    assert finding.counts == (3, 3, 0)
    assert finding.verdict is INC


def test_claims_the_study_cannot_test_say_why() -> None:
    one_size = [g for g in GROUPS if g.size == "s"]
    found = {f.id: f for f in merging_findings(prepare(merging_study(paper_like, groups=one_size)))}
    for finding in ("S2", "S4a"):
        assert found[finding].verdict is NM
        assert "two sizes" in found[finding].measured
    assert found["S1"].verdict is R  # both kinds at size s: still measurable

    pt_only = [g for g in GROUPS if g.kind == "pt"]
    found = {f.id: f for f in merging_findings(prepare(merging_study(paper_like, groups=pt_only)))}
    for finding in ("S1", "S3b", "S5"):
        assert found[finding].verdict is NM
        assert "instruction-tuned" in found[finding].measured
    found = {f.id: f for f in merging_findings(prepare(merging_study(paper_like, multitask=None)))}
    assert found["S6"].verdict is NM and "multitask" in found["S6"].measured
    found = {f.id: f for f in merging_findings(prepare(merging_study(paper_like, ks=[4])))}
    assert found["S3b"].verdict is NM and found["S4b"].verdict is NM


def test_a_pma_only_study_leaves_every_merging_claim_not_measurable() -> None:
    found = evaluate_findings(prepare(pma_study()))
    assert all(f.verdict is NM for f in found if f.paper == "merging")
    assert all(f.verdict is R for f in found if f.paper == "pma"), [(f.id, f.verdict) for f in found]


def test_every_comparison_is_kept_with_its_numbers() -> None:
    f = next(f for f in evaluate_findings(prepare(merging_study(paper_like))) if f.id == "S1")
    # 2 sizes x 4 methods x 3 k
    assert len(f.comparisons) == 24
    c = f.comparisons[0]
    assert c.delta == pytest.approx(c.value.mean - c.reference.mean)
    assert c.value.std == pytest.approx(0.01)
    assert "24" in f.measured and "for" in f.measured


# -- the pre-training paper ------------------------------------------------------------------------------------
def pma_verdicts(**kwargs) -> dict[str, Verdict]:
    return {f.id: f.verdict for f in pma_findings(prepare(pma_study(**kwargs)))}


def test_paper_like_pma_rows_reproduce_every_pma_claim() -> None:
    assert pma_verdicts() == {k: R for k in ("P1", "P2", "P3a", "P3b", "P4a", "P4b", "P5", "P6")}


def test_pma_claims_turned_around_are_not_reproduced() -> None:
    found = pma_verdicts(
        average_gain=-0.05, late_n_gain=-0.03, early_n_gain=0.03, ema_gain=-0.02, wma_gain=-0.02,
        grad_std=(0.3, 0.05), spike=(2.6, 2.0),
    )  # fmt: skip
    assert found == {k: NR for k in ("P1", "P2", "P3a", "P3b", "P4a", "P4b", "P5", "P6")}


def test_pma_differences_within_the_tolerance_are_inconclusive() -> None:
    found = pma_verdicts(
        average_gain=0.002, late_n_gain=0.002, early_n_gain=-0.002, ema_gain=0.002, wma_gain=0.002,
        grad_std=(0.30, 0.31), spike=(2.5, 2.51),
    )  # fmt: skip
    assert found == {k: INC for k in ("P1", "P2", "P3a", "P3b", "P4a", "P4b", "P5", "P6")}


def test_the_recovered_share_is_reported() -> None:
    f = next(f for f in pma_findings(prepare(pma_study(average_gain=0.04, anneal_gain=0.08))) if f.id == "P2")
    assert "(range 49% to 50%)" in f.measured  # SMA: 0.04 / 0.08; EMA and WMA 0.1 % worse


def test_a_merging_only_study_leaves_every_pma_claim_not_measurable_and_says_what_is_missing() -> None:
    found = pma_findings(prepare(merging_study(paper_like)))
    assert all(f.verdict is NM for f in found)
    assert all("pma_" in f.measured for f in found)
