"""Evaluation stage: the paper's Table 2 (and Table 4 "uid-only") on the test users.

- rank: users whose ground truth is among the 20 candidates.
- overall: every test user; a user whose ground truth was not retrieved counts 0 (per user, no rescaling).
The retriever's own ordering is reported on the same users. The candidate order used is recorded.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .common import RunArguments, mark_complete, read_json, require, should_skip, stage_dir, write_json

logger = logging.getLogger(__name__)
KS = (5, 10)


@dataclass
class EvaluateArguments:
    eval_batch_size: int = field(default=8, metadata={"help": "Users scored at once."})
    eval_split: str = field(default="test", metadata={"help": "Split to evaluate.", "choices": ["test", "validation"]})
    uid_only: bool = field(default=True, metadata={"help": "Also score the uid-only prompts (index, no history: Table 4)."})
    zero_shot: bool = field(default=False, metadata={"help": "Score the tasks stage's base LLM without an adapter (no `train` needed)."})
    zero_shot_dtype: str = field(default="float32", metadata={"help": "Weights dtype of the zero-shot model.", "choices": ["float32", "bfloat16", "float16"]})


def rank_and_overall(ranks: list[int], total_users: int) -> dict:
    """Rank metrics over the scored users and overall metrics over all users (missing users count 0)."""
    from .metrics import metrics_from_ranks

    rank = metrics_from_ranks(ranks, ks=KS)
    overall = metrics_from_ranks(list(ranks) + [None] * (total_users - len(ranks)), ks=KS)
    return {"rank": rank, "overall": overall}


def main(run_args: RunArguments, args: EvaluateArguments) -> Path:
    import datasets

    from .ranker import load_ranker, load_zero_shot, ranks_from_scores, score_prompts

    out = stage_dir(run_args, "eval")
    if should_skip(run_args, out, "evaluate"):
        return out
    run = Path(run_args.run_dir)
    require(run / "tasks", "tasks")
    if not args.zero_shot:
        require(run / "ranker", "train")
    meta = read_json(run / "tasks" / "eval_meta.json")
    total = meta[args.eval_split]["users"]
    candidates = datasets.load_from_disk(str(run / "retriever" / "candidates" / args.eval_split))
    target_rank = dict(zip(candidates["user_id"], candidates["target_rank"]))
    model, tokenizer, config = load_zero_shot(run, args.zero_shot_dtype) if args.zero_shot else load_ranker(run / "ranker")
    out.mkdir(parents=True, exist_ok=True)
    results, per_user = {}, {}
    for variant, name in (("", "ulmrec"), ("_uid_only", "ulmrec_uid_only")):
        path = run / "tasks" / f"next_item_{args.eval_split}{variant}"
        if not path.exists() or (variant and not args.uid_only):  # no uid-only set without a user index, or not asked for
            continue
        data = datasets.load_from_disk(str(path))
        scores = score_prompts(model, tokenizer, data["prompt"], config["letter_token_ids"], args.eval_batch_size, progress=f"scoring {name}")
        ranks = ranks_from_scores(scores, np.array(data["target_position"])).tolist()
        results[name] = rank_and_overall(ranks, total)
        per_user[name] = {"user_id": data["user_id"], "scores": scores.tolist(), "rank": ranks}
    users = per_user["ulmrec"]["user_id"]
    results["retriever"] = rank_and_overall([target_rank[u] for u in users], total)
    summary = {"split": args.eval_split, "ranker": config.get("ranker", "adapter"), "candidate_order": config["candidate_order"], "users": total,
               "users_in_candidates": len(users), "all_users_of_split": meta[args.eval_split]["all_users"],
               "retriever_recall@20": len(users) / total,
               "note": "overall = per-user mean over the evaluated users, 0 where the ground truth was not retrieved",
               "metrics": results}
    write_json(out / "metrics.json", summary)
    columns = {"user_id": users, "scores": per_user["ulmrec"]["scores"], "rank": per_user["ulmrec"]["rank"]}
    if "ulmrec_uid_only" in per_user:
        columns["rank_uid_only"] = per_user["ulmrec_uid_only"]["rank"]
    datasets.Dataset.from_dict(columns).save_to_disk(str(out / "per_user"))
    table = markdown_table(summary)
    (out / "table.md").write_text(table)
    print(table)
    mark_complete(out)
    return out


def markdown_table(summary: dict) -> str:
    cols = [f"{m}@{k}" for k in KS for m in ("mrr", "ndcg", "recall")]
    head = "| method | " + " | ".join(f"rank {c}" for c in cols) + " | " + " | ".join(f"overall {c}" for c in cols) + " |"
    lines = [f"{summary['split']} users: {summary['users']} of {summary['all_users_of_split']} (ground truth in top 20: {summary['users_in_candidates']}); "
             f"candidate order: {summary['candidate_order']}; ranker: {summary.get('ranker', 'adapter')}", "", head, "|---" * (1 + 2 * len(cols)) + "|"]
    for name, m in summary["metrics"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m['rank'][c]:.4f}" for c in cols) + " | "
                     + " | ".join(f"{m['overall'][c]:.4f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"
