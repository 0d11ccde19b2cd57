"""Ranking metrics with one relevant item per user, shared by the retriever, the ranker and the fusion.

`rank` is the 1-based position of the ground truth in a user's ranked list, or None when it is absent; an absent item
contributes 0 to every metric. "Overall" metrics are the per-user mean over all users. (No maintained package computes
these from ranks: `evaluate` has no MRR/NDCG module with one relevant item, so they are written here, checked against
scikit-learn's ndcg_score in the tests.)
"""

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10, 20)
TIE_RULE = ("equal scores keep the order the candidates were shown in (the earlier letter ranks higher): a stable sort by "
            "score, the same in evaluation, checkpoint selection, fusion and serving")


def ranking_order(scores: np.ndarray) -> np.ndarray:
    """Candidate columns best first, per row, under TIE_RULE (the order serving returns)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=-1, kind="stable")


def gold_ranks(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """1-based rank of the gold column in each row under TIE_RULE: the candidates scored higher, plus those scored the
    same that were shown earlier, rank above it (equal to its position in `ranking_order`)."""
    scores, gold = np.asarray(scores, dtype=np.float64), np.asarray(gold, dtype=int)
    if (gold < 0).any():
        raise ValueError("gold_ranks: a row has no gold column (-1); only users whose target is among the candidates are ranked")
    gold_scores = scores[np.arange(len(gold)), gold][:, None]
    earlier = np.arange(scores.shape[1])[None, :] < gold[:, None]
    return 1 + (scores > gold_scores).sum(1) + ((scores == gold_scores) & earlier).sum(1)


def tied_gold(scores: np.ndarray, gold: np.ndarray) -> int:
    """Users whose gold score equals another candidate's (where TIE_RULE decided the rank)."""
    scores, gold = np.asarray(scores, dtype=np.float64), np.asarray(gold, dtype=int)
    gold_scores = scores[np.arange(len(gold)), gold][:, None]
    return int(((scores == gold_scores).sum(1) > 1).sum())


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
