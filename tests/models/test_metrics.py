import math

import pytest

from models.metrics import average_precision, evaluate_lists, ndcg_at_k, reciprocal_rank


def test_ndcg_perfect_order_is_one():
    assert ndcg_at_k([3, 2, 0, 1], [4.0, 3.0, 1.0, 2.0]) == pytest.approx(1.0)


def test_ndcg_matches_hand_computation():
    # Ranked grades: [0, 3, 1] -> DCG = 0 + 7/log2(3) + 1/log2(4); ideal [3, 1, 0] -> 7 + 1/log2(3)
    dcg = 7 / math.log2(3) + 1 / 2
    ideal = 7 + 1 / math.log2(3)
    assert ndcg_at_k([3, 1, 0], [0.5, 0.1, 0.9]) == pytest.approx(dcg / ideal)


def test_ndcg_cuts_at_k_and_handles_no_relevant():
    assert ndcg_at_k([0, 0, 3], [3.0, 2.0, 1.0], k=2) == 0.0
    assert ndcg_at_k([0, 0], [1.0, 2.0]) == 0.0


def test_average_precision_by_hand():
    # Ranked relevance (grade >= 2): [1, 0, 1, 0] -> (1/1 + 2/3) / 2
    assert average_precision([3, 0, 2, 1], [4, 3, 2, 1]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([1, 0], [2, 1]) == 0.0


def test_reciprocal_rank_by_hand():
    assert reciprocal_rank([0, 1, 2], [3, 2, 1]) == pytest.approx(1 / 3)
    assert reciprocal_rank([0, 0], [1, 2]) == 0.0


def test_evaluate_lists_averages_queries():
    result = evaluate_lists([[3, 0], [0, 3]], [[1.0, 0.0], [1.0, 0.0]])
    assert result["mrr"] == pytest.approx((1 + 0.5) / 2)
    assert set(result) == {"ndcg@10", "map", "mrr"}
