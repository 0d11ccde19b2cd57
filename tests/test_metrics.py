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
    nan = np.array([[np.nan] * 4, [0.1, np.nan, 0.3, 0.2]])
    assert gold_ranks(nan, np.array([3, 1])).tolist() == [4, 4] == [list(o).index(g) + 1 for o, g in zip(ranking_order(nan), [3, 1])]


def test_the_evaluate_module_by_hand():
    """Loaded with `evaluate.load` from its local path. Four users shown three candidates each, five users in all:
    user 1's gold (column 1) is below 0.9 and ties a later column: rank 2; user 2's gold (column 2) is below 0.8 and
    ties column 0, shown earlier: rank 3; user 3's gold is the top score: rank 1; user 4's ground truth is not among the
    candidates (-1); the fifth user was not scored at all."""
    import evaluate

    from ulmrec_hf.metrics import METRIC_PATH

    metric = evaluate.load(METRIC_PATH, "scores", keep_in_memory=True)
    scores = [[0.9, 0.5, 0.5], [0.3, 0.8, 0.3], [0.7, 0.1, 0.2], [0.1, 0.2, 0.3]]
    out = metric.compute(predictions=scores, references=[1, 2, 0, -1], ks=[1, 2], total_users=5, per_user=True)
    third = 1 / math.log2(3)
    assert out["per_user"]["rank"] == [2, 3, 1] and out["tied_gold_users"] == 2
    assert out["rank"] == pytest.approx({"mrr@1": 1 / 3, "ndcg@1": 1 / 3, "recall@1": 1 / 3,
                                         "mrr@2": (0.5 + 1) / 3, "ndcg@2": (third + 1) / 3, "recall@2": 2 / 3})
    assert out["overall"] == pytest.approx({"mrr@1": 1 / 5, "ndcg@1": 1 / 5, "recall@1": 1 / 5,
                                            "mrr@2": (0.5 + 1) / 5, "ndcg@2": (third + 1) / 5, "recall@2": 2 / 5})
    by_rank = evaluate.load(METRIC_PATH, "ranks", keep_in_memory=True).compute(predictions=[2, 3, 1, None], ks=[1, 2], total_users=5)
    assert by_rank == {"rank": out["rank"], "overall": out["overall"]}


def test_the_trainer_and_evaluate_read_the_module():
    from types import SimpleNamespace

    from ulmrec_hf.evaluate import split_metrics
    from ulmrec_hf.ranker import compute_metrics

    scores, gold = np.array([[0.9, 0.5, 0.5], [0.3, 0.8, 0.3], [0.7, 0.1, 0.2]]), np.array([1, 2, 0])
    m = compute_metrics(SimpleNamespace(predictions=scores, label_ids=gold))
    assert m["ndcg@1"] == pytest.approx(1 / 3) and m["mrr@5"] == pytest.approx((0.5 + 1 / 3 + 1) / 3) and m["tied_gold_users"] == 2
    data = {"target_position": gold.tolist(), "retriever_scores": [[1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], "retriever_rank": [1, 1, 1]}
    out = split_metrics(data, scores, 0.0, total_users=6)
    assert out["ranker"]["rank"]["mrr@5"] == pytest.approx(m["mrr@5"]) and out["ranker"]["overall"]["mrr@5"] == pytest.approx(m["mrr@5"] / 2)
    assert set(out) == {"ranker", "fused", "retriever"} and all(set(v) == {"rank", "overall", "tied_gold_users"} for v in out.values())
    assert out["fused"]["rank"]["mrr@5"] == out["retriever"]["rank"]["mrr@5"] == 1.0  # w = 0: the retriever's order, every gold first
