import math

import pytest
import torch

from ulmrec_hf.metrics import metrics_from_ranks, rank_and_overall, rank_of, user_metrics


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
