"""Scoring of generated answers: recall (the suite's score) and exact match.

Normalisation (`normalize_answer`), applied to the prediction and to every expected answer alike: Unicode NFKC,
lower case, every character other than ``a-z``, ``0-9`` and ``-`` becomes a space, runs of spaces collapse,
and words made only of hyphens are dropped. So ``"The number is 1,234."`` reads ``"the number is 1 234"``,
UUIDs and hyphenated keys stay whole, and variable names match whatever their case.

* **recall** — the fraction of expected answers found in the normalised prediction as whole words (an answer
  ``"123"`` is not found in ``"1234"``). Order and extra words do not matter. This is the score reported per task.
* **exact match** — 1 when the first non-empty line of the prediction, normalised and without the word ``"and"``,
  holds exactly the expected answers (as a multiset, in any order) and nothing else; 0 otherwise. It is strict
  about format: an answer that is right but chatty (``"is 1234567, as the text says"``) scores recall 1, exact 0.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

_FILLER_WORDS = frozenset({"and"})


def normalize_answer(text: str) -> str:
    """Normalised form of ``text`` (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower()
    words = re.sub(r"[^a-z0-9-]+", " ", text).split()
    return " ".join(w for w in words if w.strip("-"))


def answer_recall(prediction: str, answers: Sequence[str]) -> float:
    """Fraction (0-1) of ``answers`` that occur as whole words in ``prediction`` after normalisation."""
    if not answers:
        raise ValueError("answers is empty")
    haystack = f" {normalize_answer(prediction)} "
    return sum(f" {normalize_answer(a)} " in haystack for a in answers) / len(answers)


def answer_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the prediction's first non-empty line holds exactly ``answers`` (any order), else 0.0."""
    if not answers:
        raise ValueError("answers is empty")
    first_line = next((line for line in prediction.splitlines() if normalize_answer(line)), "")
    got = Counter(w for w in normalize_answer(first_line).split() if w not in _FILLER_WORDS)
    want = Counter(w for a in answers for w in normalize_answer(a).split())
    return float(got == want)


def score_answer(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """``{"recall": ..., "exact": ...}`` of one prediction (each in 0-1)."""
    return {"recall": answer_recall(prediction, answers), "exact": answer_exact_match(prediction, answers)}
