"""Task metrics (pure functions on numbers and strings, no model).

Multiple choice, as lm-evaluation-harness defines them (``ConfigurableTask.process_results``):

* ``acc``: the choice with the highest summed log-likelihood is the gold one;
* ``acc_norm``: the same after dividing each log-likelihood by the **character** length of the choice
  (without the target delimiter); ties go to the first choice (``numpy.argmax``).

Generation (best over the references):

* ``exact_match``: the normalised output equals a normalised reference;
* ``f1``: token-overlap F1 of the normalised strings (SQuAD v1.1's ``evaluate-v1.1.py``); normalisation =
  lower case, punctuation removed, articles (a, an, the) removed, whitespace collapsed;
* ``rouge_l``: ROUGE-L F-measure (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries"):
  longest common subsequence of the tokens, F = 2PR / (P + R), tokens as ``rouge_score`` makes them (lower
  case, runs of ``[a-z0-9]``), no stemming.

Perplexity: ``loss`` is the token-weighted mean negative log-likelihood over all tokens of all texts
(Σ NLL / Σ tokens, not a mean of per-text means) and ``ppl = exp(loss)``.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (as ``numpy.argmax``)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def predict(loglikelihoods: Sequence[float]) -> int:
    """``acc``'s prediction: argmax of the summed log-likelihoods."""
    return argmax(loglikelihoods)


def predict_norm(loglikelihoods: Sequence[float], choices: Sequence[str]) -> int:
    """``acc_norm``'s prediction: argmax of log-likelihood / character length of the choice."""
    return argmax([ll / float(len(c)) for ll, c in zip(loglikelihoods, choices, strict=True)])


# -- generation ----------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalise_answer(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalise_answer(prediction)
    return float(any(pred == normalise_answer(ref) for ref in references))


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)  # both empty: a match; one empty: nothing in common
    common = Counter(pred_tokens) & Counter(ref_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD token F1 against the best reference."""
    pred = normalise_answer(prediction).split()
    return max(_f1(pred, normalise_answer(ref).split()) for ref in references)


_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Tokens as ``rouge_score``'s default tokenizer makes them: lower case, runs of letters and digits."""
    return _ROUGE_TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a)·len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure against the best reference."""
    pred = rouge_tokens(prediction)
    best = 0.0
    for ref in references:
        ref_tokens = rouge_tokens(ref)
        lcs = lcs_length(pred, ref_tokens)
        if lcs == 0:
            continue
        precision, recall = lcs / len(pred), lcs / len(ref_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


GENERATION_METRICS = {"exact_match": exact_match, "f1": f1, "rouge_l": rouge_l}


# -- perplexity ----------------------------------------------------------------------------------------------


def perplexity_metrics(total_nll: float, total_tokens: int) -> dict[str, float]:
    """``loss`` = Σ NLL / Σ tokens over all texts (token-weighted) and ``ppl`` = exp(loss)."""
    if total_tokens <= 0:
        raise ValueError("no tokens were scored")
    loss = total_nll / total_tokens
    return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf}


def mean(values: Sequence[float]) -> float:
    """Plain mean (a task's score over its examples)."""
    return sum(values) / len(values) if values else math.nan
