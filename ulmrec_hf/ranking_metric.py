"""An `evaluate` metric module: MRR, NDCG and Recall@k with one relevant item per user, "rank" and "overall".

Load it from its local path (the Hub copy of `evaluate` modules is out of reach offline, and this one is ours):

    import evaluate
    from ulmrec_hf.metrics import METRIC_PATH
    metric = evaluate.load(METRIC_PATH, "scores", keep_in_memory=True)
    metric.compute(predictions=[[0.1, 0.7, 0.7], [0.9, 0.2, 0.1]], references=[2, -1], ks=[1, 3], total_users=5)

Configurations:
- `scores`: `predictions` are each user's candidate scores in the order shown, `references` the ground truth's column
  (-1 when it is not among the candidates). Ranks follow `ulmrec_hf.metrics.TIE_RULE` (`gold_ranks`), and the result
  counts the users whose ground-truth score ties another candidate's (`tied_gold_users`).
- `ranks`: `predictions` are 1-based ranks of the ground truth, None when it is absent.

"rank" metrics average over the users whose ground truth is ranked; "overall" metrics average over `total_users`
(default: every user given), a user without a rank counting 0. `per_user=True` adds the ranked users' own values.
"""

import math

import datasets
import evaluate
import numpy as np

from ulmrec_hf.metrics import gold_ranks, tied_gold

FEATURES = {
    "scores": datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}),
    "ranks": datasets.Features({"predictions": datasets.Value("int64")}),
}


def user_metrics(rank: int | None, ks=(5, 10)) -> dict[str, float]:
    """One user's MRR, NDCG and Recall at each k: 1/rank, 1/log2(rank + 1) and 1 within the top k, else 0."""
    out = {}
    for k in ks:
        hit = rank is not None and rank <= k
        out[f"mrr@{k}"] = 1.0 / rank if hit else 0.0
        out[f"ndcg@{k}"] = 1.0 / math.log2(rank + 1) if hit else 0.0
        out[f"recall@{k}"] = 1.0 if hit else 0.0
    return out


def mean_metrics(ranks: list, ks, users: int) -> dict[str, float]:
    """The sum of `user_metrics` over `ranks`, divided by `users` (users beyond the list count 0)."""
    if users < 1:
        raise ValueError("no users to compute metrics on")
    total = dict.fromkeys(user_metrics(None, ks), 0.0)
    for rank in ranks:
        for name, value in user_metrics(rank, ks).items():
            total[name] += value
    return {name: value / users for name, value in total.items()}


class RankingMetric(evaluate.Metric):
    def _info(self):
        if self.config_name not in FEATURES:
            raise KeyError(f"ranking metric: unknown configuration {self.config_name!r}; use one of {list(FEATURES)}")
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description=__doc__, features=FEATURES[self.config_name])

    def _compute(self, predictions, references=None, ks=(5, 10), total_users=None, per_user=False):
        out = {}
        if self.config_name == "scores":
            scores, gold = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=int)
            ranked = gold >= 0
            ranks = gold_ranks(scores[ranked], gold[ranked]).tolist() if ranked.any() else []
            out["tied_gold_users"] = tied_gold(scores[ranked], gold[ranked]) if ranked.any() else 0
        else:
            ranks = [int(r) for r in predictions if r is not None]
        total_users = len(predictions) if total_users is None else total_users
        if total_users < len(predictions):
            raise ValueError(f"total_users={total_users} is fewer than the {len(predictions)} users given")
        out = {"rank": mean_metrics(ranks, ks, len(ranks)), "overall": mean_metrics(ranks, ks, total_users), **out}
        if per_user:
            values = [user_metrics(r, ks) for r in ranks]
            out["per_user"] = {"rank": ranks, **{name: [v[name] for v in values] for name in user_metrics(None, ks)}}
        return out
