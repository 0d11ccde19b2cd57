"""Ranking metrics with one relevant item per user, shared by the retriever, the ranker and the fusion.

The tie rule lives here (`TIE_RULE`, `ranking_order`, `gold_ranks`, `tied_gold`); the arithmetic (MRR, NDCG and Recall@k,
"rank" and "overall") is the `evaluate` metric module `ranking_metric.py`, loaded from its local path by `load_metric`.
`rank` is the 1-based position of the ground truth in a user's ranked list, or None when it is absent; an absent item
contributes 0 to every metric. "Overall" metrics are the per-user mean over all users (checked against scikit-learn's
ndcg_score in the tests).
"""

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_KS = (1, 5, 10, 20)
METRIC_PATH = str(Path(__file__).with_name("ranking_metric.py"))
TIE_RULE = ("equal scores keep the order the candidates were shown in (the earlier letter ranks higher): a stable sort by "
            "score, the same in evaluation, checkpoint selection, fusion and serving")


def comparable(scores: np.ndarray) -> np.ndarray:
    """float64 scores with NaN as -inf: a NaN (an overflow, a broken adapter) ranks last, never first by failing comparisons."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.where(np.isnan(scores), -np.inf, scores)


def ranking_order(scores: np.ndarray) -> np.ndarray:
    """Candidate columns best first, per row, under TIE_RULE (the order serving returns)."""
    return np.argsort(-comparable(scores), axis=-1, kind="stable")


def gold_ranks(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """1-based rank of the gold column in each row under TIE_RULE: the candidates scored higher, plus those scored the
    same that were shown earlier, rank above it (equal to its position in `ranking_order`)."""
    scores, gold = comparable(scores), np.asarray(gold, dtype=int)
    if (gold < 0).any():
        raise ValueError("gold_ranks: a row has no gold column (-1); only users whose target is among the candidates are ranked")
    gold_scores = scores[np.arange(len(gold)), gold][:, None]
    earlier = np.arange(scores.shape[1])[None, :] < gold[:, None]
    return 1 + (scores > gold_scores).sum(1) + ((scores == gold_scores) & earlier).sum(1)


def tied_gold(scores: np.ndarray, gold: np.ndarray) -> int:
    """Users whose gold score equals another candidate's (where TIE_RULE decided the rank)."""
    scores, gold = comparable(scores), np.asarray(gold, dtype=int)
    gold_scores = scores[np.arange(len(gold)), gold][:, None]
    return int(((scores == gold_scores).sum(1) > 1).sum())


def rank_of(ranked: Sequence[int], target: int) -> int | None:
    for position, item in enumerate(ranked, 1):
        if item == target:
            return position
    return None


@functools.cache
def load_metric(config: str = "scores"):
    """The ranking metric module (`ranking_metric.py`) through `evaluate.load` from its local path, kept in memory."""
    import evaluate

    return evaluate.load(METRIC_PATH, config, keep_in_memory=True)


def user_metrics(rank: int | None, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """One user's metrics by the metric module's own arithmetic, reached through `evaluate.load` rather than an import
    (the module imports the tie rule from here)."""
    import sys

    return sys.modules[type(load_metric("ranks")).__module__].user_metrics(rank, tuple(ks))


def metrics_from_ranks(ranks: Sequence[int | None], ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean over all users given (users with rank None count as 0)."""
    if not len(ranks):
        raise ValueError("no users to compute metrics on")
    return load_metric("ranks").compute(predictions=list(ranks), ks=list(ks))["overall"]


def rank_and_overall(ranks: Sequence[int], total_users: int, ks: Sequence[int] = (5, 10)) -> dict:
    """Rank metrics over the scored users and overall metrics over all users (users not scored count 0)."""
    out = load_metric("ranks").compute(predictions=list(ranks), ks=list(ks), total_users=total_users)
    return {"rank": out["rank"], "overall": out["overall"]}


def score_metrics(scores: np.ndarray, gold: np.ndarray, total_users: int | None = None, ks: Sequence[int] = (5, 10), per_user: bool = False) -> dict:
    """Rank and overall metrics of candidate scores under TIE_RULE, with `tied_gold_users` (gold -1: not among them)."""
    return load_metric("scores").compute(predictions=np.asarray(scores, dtype=np.float64).tolist(), references=np.asarray(gold, dtype=int).tolist(),
                                         ks=list(ks), total_users=total_users, per_user=per_user)


# -- fusion and the agreement of two scorers (evaluate, recommend and export use the same ones) --------------------------
def zscore(x: np.ndarray) -> np.ndarray:
    std = x.std(axis=1, keepdims=True)
    return (x - x.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)


def fuse(retriever_scores: np.ndarray, letter_scores: np.ndarray, w: float) -> np.ndarray:
    """z(retriever) + w * z(letter log-prob); log-softmax only shifts a row, so z of the logits is the same."""
    return zscore(retriever_scores) + w * zscore(letter_scores)


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """How often two scorers give the same top-1 and the same top-10 (in order) per user."""
    ta, tb = ranking_order(a), ranking_order(b)
    return {"users": len(a), "top1_identical": float((ta[:, 0] == tb[:, 0]).mean()), "top10_identical": float((ta[:, :10] == tb[:, :10]).all(1).mean()),
            "top10_same_set": float(np.mean([set(x[:10]) == set(y[:10]) for x, y in zip(ta, tb)]))}
