"""Metrics on known strings and numbers (values worked out by hand in the comments)."""

from __future__ import annotations

import math

import pytest

from mergescale.evaluate import metrics as M


def test_acc_norm_divides_by_character_length_of_the_choice() -> None:
    # log-likelihoods of " yes" and " absolutely not": acc picks the shorter, likelier choice;
    # per character (3 vs 14 characters, delimiter not counted): -6/3 = -2.0 vs -14/14 = -1.0 -> choice 1.
    lls, choices = [-6.0, -14.0], ["yes", "absolutely not"]
    assert M.predict(lls) == 0
    assert M.predict_norm(lls, choices) == 1
    # same characters, same result whatever the token count of each choice
    assert M.predict_norm([-4.0, -4.0001], ["ab", "cd"]) == 0


def test_ties_go_to_the_first_choice_like_numpy_argmax() -> None:
    assert M.argmax([-1.0, -1.0, -2.0]) == 0
    assert M.argmax([-3.0, -1.0, -1.0]) == 1
    assert M.predict_norm([-2.0, -4.0], ["a", "bb"]) == 0  # -2/1 == -4/2


def test_squad_normalisation_exact_match_and_f1() -> None:
    assert M.normalise_answer("  The Cat, sat!  ") == "cat sat"
    assert M.exact_match("The cat sat.", ["a cat sat"]) == 1.0
    assert M.exact_match("cat", ["dog", "the cat"]) == 1.0
    assert M.exact_match("cats", ["cat"]) == 0.0
    # "cat sat" vs "cat sat down": precision 2/2, recall 2/3 -> F1 = 2·1·(2/3)/(1 + 2/3) = 0.8
    assert M.f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    # best reference counts: 0 against "dog", 1 against "cat"
    assert M.f1("cat", ["dog", "cat"]) == 1.0
    # repeated tokens count once per match: "a a b" -> "b"? articles go; "x x y" vs "x y y": common x1 y1 -> 2/3
    assert M.f1("x x y", ["x y y"]) == pytest.approx(2 / 3)
    assert M.f1("the", ["a"]) == 1.0  # both normalise to nothing
    assert M.f1("the", ["cat"]) == 0.0


def test_rouge_l_on_known_strings() -> None:
    # LCS("the cat sat on the mat", "the cat was on the mat") = the cat on the mat = 5; P = R = 5/6
    assert M.rouge_l("the cat sat on the mat", ["the cat was on the mat"]) == pytest.approx(5 / 6)
    # LCS = 2 ("a c"), P = 2/3, R = 2/2 -> F = 2·(2/3)·1 / (5/3) = 0.8
    assert M.rouge_l("a b c", ["a c"]) == pytest.approx(0.8)
    assert (
        M.rouge_l("Hello, World!", ["hello world"]) == 1.0
    )  # rouge_score tokens: lower case, alphanumeric runs
    assert M.rouge_l("x", ["y"]) == 0.0
    assert M.rouge_l("", ["y"]) == 0.0
    assert M.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (CLRS 15.4)


def test_perplexity_is_token_weighted() -> None:
    # two texts: NLL 10 over 2 tokens and 2 over 8 tokens -> (10 + 2) / 10 = 1.2, not mean(5, 0.25)
    out = M.perplexity_metrics(12.0, 10)
    assert out["loss"] == pytest.approx(1.2)
    assert out["ppl"] == pytest.approx(math.exp(1.2))
    with pytest.raises(ValueError):
        M.perplexity_metrics(1.0, 0)
