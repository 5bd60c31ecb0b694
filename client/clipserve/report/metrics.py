"""Per-query ranking measures, as waggle's evaluation code (imsearch_eval) computes them over a
``clip_score`` column, in plain Python: the SDK needs neither NumPy nor scikit-learn.

``ndcg`` is scikit-learn's ``ndcg_score`` for one query (labels as gains, no cutoff, tied scores
averaged as ``ignore_ties=False`` does); tests/e2e/test_report.py checks it against scikit-learn.
``reciprocal_rank`` is 1 / the rank of the first image with a label above 0, images in score
order (ties in file order), 0 when none is relevant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _discounts(n: int) -> list[float]:
    # sklearn's discount, computed the same way: 1 / (ln(rank + 1) / ln 2).
    return [1 / (math.log(i + 2) / math.log(2)) for i in range(n)]


def _tie_averaged_dcg(gains: Sequence[float], scores: Sequence[float], discounts: Sequence[float]) -> float:
    """DCG averaged over every order of the tied scores: a tied group's gain is its mean gain
    times the sum of the discounts of the ranks it spans (McSherry & Najork 2008, as sklearn)."""
    groups: dict[float, list[float]] = {}
    for gain, score in zip(gains, scores):
        groups.setdefault(score, []).append(gain)
    total = 0.0
    start = 0
    for score in sorted(groups, reverse=True):
        members = groups[score]
        end = start + len(members)
        total += (sum(members) / len(members)) * sum(discounts[start:end])
        start = end
    return total


def ndcg(labels: Sequence[float], scores: Sequence[float]) -> float:
    """sklearn's ``ndcg_score([labels], [scores])``; 0.0 for fewer than two candidates (where
    sklearn refuses, imsearch_eval's ``compute_ndcg`` answers 0.0) and when no label is above 0."""
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels for {len(scores)} scores")
    if len(labels) < 2:
        return 0.0
    if min(labels) < 0:
        raise ValueError("NDCG needs labels of 0 or more (they are the gains)")
    discounts = _discounts(len(labels))
    ideal = sum(d * g for d, g in zip(discounts, sorted(labels, reverse=True)))
    if ideal == 0:
        return 0.0
    return _tie_averaged_dcg(labels, scores, discounts) / ideal


def score_order(scores: Sequence[float]) -> list[int]:
    """Indices from the highest score to the lowest; equal scores keep their file order."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def reciprocal_rank(labels: Sequence[float], scores: Sequence[float]) -> float:
    for rank, i in enumerate(score_order(scores), 1):
        if labels[i] > 0:
            return 1.0 / rank
    return 0.0


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def contradictions(labels: Sequence[float], scores: Sequence[float]) -> list[float | None]:
    """How strongly each candidate's score contradicts its label, within its query.

    In units of the query's score spread (population standard deviation): a relevant image's
    distance *below* the mean score of the query's irrelevant images, an irrelevant image's
    distance *above* the mean score of its relevant ones. Above 0: on the wrong side of the
    other label's mean; the higher, the likelier a mislabelled pair (or a CLIP failure). None
    where it is not defined: a query whose images all have one label, or all one score.
    """
    relevant = [s for s, g in zip(scores, labels) if g > 0]
    irrelevant = [s for s, g in zip(scores, labels) if g <= 0]
    if not relevant or not irrelevant:
        return [None] * len(scores)
    centre = mean(scores)
    spread = math.sqrt(mean([(s - centre) ** 2 for s in scores]))
    if spread == 0:
        return [None] * len(scores)
    mean_relevant, mean_irrelevant = mean(relevant), mean(irrelevant)
    return [(mean_irrelevant - s) / spread if g > 0 else (s - mean_relevant) / spread for s, g in zip(scores, labels)]
