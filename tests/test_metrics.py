import math

import pytest
import torch

import numpy as np

from ulmrec_hf.metrics import gold_ranks, metrics_from_ranks, rank_and_overall, rank_of, ranking_order, tied_gold, user_metrics


def test_metrics_by_hand():
    assert rank_of([7, 3, 9], 9) == 3 and rank_of([7, 3], 9) is None
    m = user_metrics(3, ks=(1, 5))
    assert m == {"mrr@1": 0.0, "ndcg@1": 0.0, "recall@1": 0.0, "mrr@5": 1 / 3, "ndcg@5": 0.5, "recall@5": 1.0}
    overall = metrics_from_ranks([1, None, 4, 30], ks=(5,))
    assert overall["recall@5"] == 0.5
    assert math.isclose(overall["mrr@5"], (1 + 0.25) / 4)
    assert math.isclose(overall["ndcg@5"], (1 + 1 / math.log2(5)) / 4)


def test_ndcg_agrees_with_sklearn():
    from sklearn.metrics import ndcg_score

    rng = torch.Generator().manual_seed(1)
    for _ in range(20):
        scores = torch.rand(1, 20, generator=rng)
        target = int(torch.randint(0, 20, (1,), generator=rng))
        truth = torch.zeros(1, 20)
        truth[0, target] = 1
        ranked = scores[0].argsort(descending=True).tolist()
        for k in (5, 10):
            ours = user_metrics(rank_of(ranked, target), ks=(k,))[f"ndcg@{k}"]
            assert math.isclose(ours, ndcg_score(truth.numpy(), scores.numpy(), k=k), abs_tol=1e-9)


def test_overall_is_per_user_over_all_users():
    result = rank_and_overall([1, 2, 7], total_users=10)
    rank, overall = result["rank"], result["overall"]
    assert rank["recall@5"] == pytest.approx(2 / 3) and overall["recall@5"] == pytest.approx(2 / 10)
    assert overall["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(8)) / 10)
    assert overall["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 7) / 10)


def test_the_tie_rule_is_the_serving_order():
    """gold_ranks counts higher scores plus equal scores shown earlier: exactly the gold's place in ranking_order."""
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(300, 20)).astype(np.float32)  # many ties
    gold = rng.integers(0, 20, size=300)
    order = ranking_order(scores)
    assert gold_ranks(scores, gold).tolist() == [int(np.where(o == g)[0][0]) + 1 for o, g in zip(order, gold)]
    assert gold_ranks(np.array([[1.0, 1.0, 1.0]]), np.array([1])).tolist() == [2]  # neither optimistic (1) nor pessimistic (3)
    assert tied_gold(np.array([[1.0, 1.0, 0.0], [1.0, 0.5, 0.0]]), np.array([0, 0])) == 1
    with pytest.raises(ValueError, match="no gold column"):
        gold_ranks(np.zeros((1, 3)), np.array([-1]))
