"""`evaluate` metric: MRR/NDCG/Recall@k of ranked lists against one ground-truth item per user."""

import datasets
import evaluate

from ulmrec_hf.metrics import DEFAULT_KS, metrics_from_ranks, rank_of

_DESCRIPTION = "MRR@k, NDCG@k and Recall@k for next-item recommendation with one relevant item per user."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of ranked item-id lists, best first.
    references: the ground-truth item id of each list.
    ks: cut-offs (default 1, 5, 10, 20).
Returns: dict with `mrr@k`, `ndcg@k`, `recall@k`; a list without its ground truth counts 0.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Ranking(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, ks=DEFAULT_KS):
        return metrics_from_ranks([rank_of(p, r) for p, r in zip(predictions, references)], ks)
