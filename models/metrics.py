"""Ranking metrics over graded relevance (grades 0-3).

- NDCG@k with exponential gain 2^grade - 1 and log2 discount; the ideal ordering is the
  candidate list's own grades sorted, so 1.0 means a perfect order of what was given.
- MAP and MRR count a candidate as relevant when its grade is >= `relevant_grade` (2: exact or
  substitute). A query with no relevant candidate contributes 0 to both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _order(scores: Sequence[float]) -> np.ndarray:
    # Stable sort on -score: ties keep the candidate order, so results are reproducible.
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def ndcg_at_k(grades: Sequence[int], scores: Sequence[float], k: int = 10) -> float:
    grades = np.asarray(grades, dtype=np.float64)
    gains = 2.0**grades - 1.0
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ranked = gains[_order(scores)][:k]
    ideal = np.sort(gains)[::-1][:k]
    ideal_dcg = float((ideal * discounts[: len(ideal)]).sum())
    if ideal_dcg == 0.0:
        return 0.0
    return float((ranked * discounts[: len(ranked)]).sum()) / ideal_dcg


def average_precision(
    grades: Sequence[int], scores: Sequence[float], relevant_grade: int = 2
) -> float:
    relevant = (np.asarray(grades)[_order(scores)] >= relevant_grade).astype(np.float64)
    if relevant.sum() == 0:
        return 0.0
    precision_at_hit = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
    return float((precision_at_hit * relevant).sum() / relevant.sum())


def reciprocal_rank(
    grades: Sequence[int], scores: Sequence[float], relevant_grade: int = 2
) -> float:
    relevant = np.asarray(grades)[_order(scores)] >= relevant_grade
    hits = np.flatnonzero(relevant)
    return 0.0 if len(hits) == 0 else 1.0 / (hits[0] + 1)


def evaluate_lists(
    grade_lists: Sequence[Sequence[int]], score_lists: Sequence[Sequence[float]], k: int = 10
) -> dict[str, float]:
    """Mean NDCG@k, MAP and MRR over queries."""
    if len(grade_lists) != len(score_lists):
        raise ValueError("one score list per grade list is required")
    rows = [
        (ndcg_at_k(g, s, k), average_precision(g, s), reciprocal_rank(g, s))
        for g, s in zip(grade_lists, score_lists, strict=True)
    ]
    ndcg, ap, rr = (float(np.mean(col)) for col in zip(*rows, strict=True))
    return {f"ndcg@{k}": ndcg, "map": ap, "mrr": rr}
