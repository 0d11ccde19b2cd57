"""Ranking metrics with one relevant item per user, shared by the retriever and the ranker.

`rank` is the 1-based position of the ground truth in a user's ranked list, or None when it is absent;
an absent item contributes 0 to every metric. "Overall" metrics are the per-user mean over all users.
"""

import math
from collections.abc import Sequence
from pathlib import Path

DEFAULT_KS = (1, 5, 10, 20)
METRIC_DIR = Path(__file__).parent / "ranking"


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


def load_ranking_metric():
    """The same metrics as an `evaluate` module, loaded from this package (works offline)."""
    import evaluate

    return evaluate.load(str(METRIC_DIR))
