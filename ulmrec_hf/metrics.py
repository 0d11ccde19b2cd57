"""Ranking metrics with one relevant item per user, shared by the retriever, the ranker and the fusion.

`rank` is the 1-based position of the ground truth in a user's ranked list, or None when it is absent; an absent item
contributes 0 to every metric. "Overall" metrics are the per-user mean over all users. (No maintained package computes
these from ranks: `evaluate` has no MRR/NDCG module with one relevant item, so they are written here, checked against
scikit-learn's ndcg_score in the tests.)
"""

import math
from collections.abc import Sequence

DEFAULT_KS = (1, 5, 10, 20)


def rank_of(ranked: Sequence[int], target: int) -> int | None:
    for position, item in enumerate(ranked, 1):
        if item == target:
            return position
    return None


def user_metrics(rank: int | None, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    out = {}
    for k in ks:
        hit = rank is not None and rank <= k
        out[f"mrr@{k}"] = 1.0 / rank if hit else 0.0
        out[f"ndcg@{k}"] = 1.0 / math.log2(rank + 1) if hit else 0.0
        out[f"recall@{k}"] = 1.0 if hit else 0.0
    return out


def metrics_from_ranks(ranks: Sequence[int | None], ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean of `user_metrics` over all users given (users with rank None count as 0)."""
    if not ranks:
        raise ValueError("no users to compute metrics on")
    total: dict[str, float] = {}
    for rank in ranks:
        for name, value in user_metrics(rank, ks).items():
            total[name] = total.get(name, 0.0) + value
    return {name: value / len(ranks) for name, value in total.items()}


def rank_and_overall(ranks: Sequence[int], total_users: int, ks: Sequence[int] = (5, 10)) -> dict:
    """Rank metrics over the scored users and overall metrics over all users (users not scored count 0)."""
    return {"rank": metrics_from_ranks(ranks, ks), "overall": metrics_from_ranks(list(ranks) + [None] * (total_users - len(ranks)), ks)}
