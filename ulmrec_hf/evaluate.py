"""Evaluation stage: the paper's Table 2 (and Table 4 "uid-only"), plus a fused row beyond the paper.

- rank: users whose ground truth is among the candidates; overall: every sampled user, 0 where the ground truth was not
  retrieved (per user, no rescaling).
- ranker: the trained adapter on the base exactly as trained (or `--zero_shot`: the base LLM alone; or
  `--merge_adapter`: merged into a bf16 base, with its agreement with the as-trained model on validation recorded).
- fused: z(retriever score) + w * z(letter log-prob) over each user's candidates. `w` is chosen on validation users by
  NDCG@10 from `fusion_weights` (which includes 0, the retriever alone): the smallest w within one paired standard
  error of the best (a gain smaller than that is noise on a few hundred users). Test users never inform it.
- retriever: the retriever's own order on the same users.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .common import StageArguments, UlmrecError, file_digest, read_json, settings_of, write_json
from .layout import RankerFolder, RunDir
from .metrics import TIE_RULE, agreement, fuse, gold_ranks, rank_and_overall, score_metrics, tied_gold
from .ranker import check_permutations

logger = logging.getLogger(__name__)
FUSION_WEIGHTS = [0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0]


@dataclass
class EvaluateArguments:
    _argument_group_name = "evaluate"
    _operational = ('batch_size', 'max_batch_tokens')  # fields that do not change the output (left out of the recorded settings)
    batch_size: int = field(default=8, metadata={"help": "Users scored at once."})
    max_batch_tokens: int | None = field(default=None, metadata={"help": "Also cap a batch's padded tokens (useful on GPUs)."})
    uid_only: bool = field(default=True, metadata={"help": "Also score the uid-only prompts (index, no history: Table 4)."})
    zero_shot: bool = field(default=False, metadata={"help": "Score the tasks stage's base LLM without an adapter (no `train` needed)."})
    zero_shot_dtype: str = field(default="float32", metadata={"help": "Weights dtype of the zero-shot model.", "choices": ["float32", "bfloat16", "float16"]})
    merge_adapter: bool = field(default=False, metadata={"help": "Merge the adapter into a bf16 base (faster on GPUs); records agreement with the as-trained model on validation."})
    ranker: str | None = field(default=None, metadata={"help": "Score this ranker folder (e.g. one trained in another run on the same training rows) instead of this run's; recorded in metrics.json."})
    fusion_weights: list[float] = field(default_factory=lambda: list(FUSION_WEIGHTS), metadata={"help": "Grid of w for the fused row (must include 0)."})
    eval_permutations: int = field(default=1, metadata={"help": "Score each user under this many seeded candidate orders (the first the protocol's own) and rank by each candidate's mean letter log-probability over them (k times the scoring)."})


ARGUMENTS = (StageArguments, EvaluateArguments)


def ranks(scores: np.ndarray, gold: np.ndarray) -> list[int]:
    return gold_ranks(scores, gold).tolist()


def choose_weight(weights: list[float], retriever_scores: np.ndarray, letter_scores: np.ndarray, gold: np.ndarray) -> tuple[float, dict]:
    """w on these (validation) users: the smallest w whose rank NDCG@10 is within one standard error of the best w's
    (the one-standard-error rule: with a few hundred users, a smaller gain than that is noise, and w = 0 is the retriever)."""
    if 0.0 not in weights:
        raise UlmrecError("evaluate: --fusion_weights must include 0 (the retriever alone)")
    per_user = {w: np.array(score_metrics(fuse(retriever_scores, letter_scores, w), gold, ks=(10,), per_user=True)["per_user"]["ndcg@10"])
                for w in sorted(float(w) for w in weights)}
    curve = {w: float(v.mean()) for w, v in per_user.items()}
    best = max(curve, key=lambda w: (curve[w], -w))
    se = {w: float((per_user[w] - per_user[best]).std(ddof=1) / np.sqrt(len(gold))) if len(gold) > 1 else 0.0 for w in per_user}
    chosen = min(w for w in per_user if curve[w] >= max(curve[best] - se[w], curve[0.0]))  # never below the retriever alone
    return chosen, {"best": best, "curve": {str(w): round(v, 6) for w, v in curve.items()},
                    "paired_se_vs_best": {str(w): round(v, 6) for w, v in se.items()}}


def ranker_folder(run: RunDir, args: EvaluateArguments) -> Path:
    """The ranker to score: this run's, which must have been trained on this run's tasks, or the one given."""
    if args.ranker:
        folder = Path(args.ranker)
        if RankerFolder(folder).read_config()["letter_token_ids"] != run.mixture()["letter_token_ids"]:
            raise UlmrecError(f"evaluate: {folder} reads other answer-letter ids than this run's prompts (another tokenizer)")
        return folder
    if run.stage_inputs("train")["tasks"] != run.stage_fingerprint("tasks"):
        raise UlmrecError(f"evaluate: {run.ranker} was trained on other tasks than {run.path('tasks')} holds now; "
                          "run `ulmrec train --overwrite`, or score it explicitly with --ranker")
    return run.ranker


def load_model(run: RunDir, args: EvaluateArguments, merge: bool = False):
    from .ranker import load_ranker, load_zero_shot

    if args.zero_shot:
        mixture = run.mixture()
        return load_zero_shot(mixture["model_name_or_path"], run.index_tokens(), mixture["letter_token_ids"], args.zero_shot_dtype)
    return load_ranker(ranker_folder(run, args), merge=merge)


def score(model, tokenizer, config, data, args: EvaluateArguments, name: str, keys: list[str], first: np.ndarray | None = None) -> np.ndarray:
    """Letter scores of `data`'s prompts over `eval_permutations` candidate orders (`ranker.permutation_average`, order j
    of a user seeded by the user's key, `user_keys`); `first`: the scores of the prompts as shown, when already known."""
    from .ranker import permutation_average, score_prompts

    k = args.eval_permutations

    def letters(prompts: list[str], j: int = 0) -> np.ndarray:
        label = f"scoring {name}" + (f" (order {j + 1} of {k})" if k > 1 else "")
        return score_prompts(model, tokenizer, prompts, config["letter_token_ids"], args.batch_size, progress=label, max_batch_tokens=args.max_batch_tokens)

    prompts = list(data["prompt"])
    first = letters(prompts) if first is None else first
    return permutation_average(first, prompts, keys, k, letters)


def validation_first(run: RunDir, args: EvaluateArguments, validation) -> tuple[np.ndarray | None, str]:
    """The ranker's validation scores in the shown order that training computed with the kept model, when this is that
    model, as trained, on the same prompts (the same numbers; one pass saved); else None (scored here)."""
    from .prompts import prompts_digest

    saved = None if args.zero_shot or args.merge_adapter else RankerFolder(ranker_folder(run, args)).validation_scores
    if saved is not None and saved.exists():
        record = read_json(saved)
        if record["prompts_sha256"] == prompts_digest(validation["prompt"]):
            logger.info("evaluate: validation scores of the kept model read from %s (same model, same prompts)", saved)
            return np.array(record["scores"], dtype=np.float32), f"from training ({saved})"
    return None, "scored here"


def merge_check(run: RunDir, args: EvaluateArguments, validation) -> dict:
    """Validation scores of the as-trained model, to compare with the merged one."""
    model, tokenizer, config = load_model(run, args)
    scores = score(model, tokenizer, config, validation, args, "validation (as trained)", user_keys(run, "validation", validation))
    del model
    return {"as_trained": scores, "loaded_as": config["loaded_as"]}


def main(stage: StageArguments, args: EvaluateArguments) -> Path:
    run = RunDir(stage.run_dir)
    check_permutations(args.eval_permutations)
    if args.zero_shot and (args.merge_adapter or args.ranker):
        raise UlmrecError("evaluate: --zero_shot scores the base model; it has no adapter to merge or load")
    inputs = ("tasks",) if args.zero_shot or args.ranker else ("tasks", "train")
    settings = {**settings_of(args), "ranking": TIE_RULE, "ranker_fingerprint": ranker_fingerprint(args.ranker)}
    if not run.begin("evaluate", settings, stage.overwrite, inputs=inputs):
        print(run.eval_table.read_text())
        return run.path("evaluate")
    validation, test, meta = run.eval_set("validation"), run.eval_set("test"), run.eval_meta()
    checked = merge_check(run, args, validation) if args.merge_adapter else None
    model, tokenizer, config = load_model(run, args, merge=args.merge_adapter)
    summary = {"ranker": config["ranker"] if args.zero_shot else str(ranker_folder(run, args)), "loaded_as": config["loaded_as"],
               "protocol": run.mixture()["protocol"], "tie_rule": TIE_RULE, "user_text": run.user_text_provenance(),
               "users": {split: meta[split] for split in ("validation", "test")}}
    first, summary["validation_scores"] = validation_first(run, args, validation)
    clock = Clock()
    val_scores = clock.time("validation", score, model, tokenizer, config, validation, args, "validation", user_keys(run, "validation", validation), first)
    if checked:
        summary["merge_agreement"] = {"compared_with": checked["loaded_as"], **agreement(checked["as_trained"], val_scores)}
    w, summary["fusion"] = fusion_weight(args, validation, val_scores)
    summary["validation"] = split_metrics(validation, val_scores, w, meta["validation"]["users"])
    test_scores = clock.time("test", score, model, tokenizer, config, test, args, "test", user_keys(run, "test", test))
    summary["test"] = split_metrics(test, test_scores, w, meta["test"]["users"])
    per_user = {"validation": per_user_table(validation, val_scores, w), "test": per_user_table(test, test_scores, w)}
    if args.uid_only:
        uid_only_rows(run, (model, tokenizer, config), args, summary, per_user, clock)
    summary["scoring"] = {"eval_permutations": args.eval_permutations, "cost": f"{args.eval_permutations}x the scoring of one candidate order",
                          "seconds": clock.seconds}
    untrained = None if args.zero_shot else untrained_validation(ranker_folder(run, args))
    if untrained is not None:
        summary["validation"]["untrained_rank_ndcg@10"] = untrained
    save(run, summary, per_user)
    run.finish("evaluate")
    return run.path("evaluate")


class Clock:
    """Seconds each scoring took, by name (the cost `eval_permutations` multiplies)."""

    def __init__(self):
        self.seconds = {}

    def time(self, name: str, fn, *args):
        import time

        start = time.time()
        out = fn(*args)
        self.seconds[name] = round(time.time() - start, 1)
        return out


def user_keys(run: RunDir, split: str, data) -> list[str]:
    """What seeds each user's extra candidate orders in a split (`prompts.user_key`)."""
    from .prompts import user_key

    seed = run.eval_meta()["eval_seed"]
    return [user_key(seed, split, u) for u in data["user_id"]]


def uid_only_rows(run: RunDir, loaded: tuple, args: EvaluateArguments, summary: dict, per_user: dict, clock: Clock) -> None:
    """Table 4's uid-only row (the index and the candidates, no history), the same prompts with every user's index
    replaced by another user's, and a seeded random order of the candidates: if the index carries nothing about its
    user, the first two rows tie; if the model reads nothing from the candidates either, all three do."""
    data = run.eval_set("test", uid_only=True)
    if data is None:
        return
    gold, users = np.array(data["target_position"]), run.eval_meta()["test"]["users"]
    swapped, unchanged = swapped_index(run, data)
    for name, rows in (("ranker_uid_only", data), ("ranker_uid_only_swapped_index", swapped)):
        if rows is None:
            continue
        scores = clock.time(f"test {name.removeprefix('ranker_')}", score, *loaded, rows, args, f"test {name}", user_keys(run, "test", rows))
        summary["test"][name] = score_metrics(scores, gold, users)
        per_user["test"] = per_user["test"].add_column(name.replace("ranker", "rank"), ranks(scores, gold))
    if swapped is not None:
        summary["test"]["ranker_uid_only_swapped_index"]["users_shown_their_own_index"] = unchanged
    random = np.random.default_rng(run.eval_meta()["eval_seed"]).random((len(data), len(data[0]["candidates"]))).astype(np.float32)
    summary["test"]["random_order"] = score_metrics(random, gold, users)
    per_user["test"] = per_user["test"].add_column("rank_random_order", ranks(random, gold))


def swapped_index(run: RunDir, data):
    """(the uid-only prompts with each user's index replaced by another user's, how many users still see their own index
    string): a seeded derangement, each user taking the index of the next user in a seeded cycle; an index scheme
    with repeated strings (an import can have them) leaves some users theirs, counted. (None, 0) with fewer than two users."""
    from .prompts import permutation, with_user_field

    if len(data) < 2:
        return None, 0
    table, index = run.prepared()["users"], run.index()
    name = dict(zip(table["user_id"], table["user"]))
    own = [index[name[u]] for u in data["user_id"]]
    cycle = permutation(len(own), f"{run.eval_meta()['eval_seed']}-swapped-index")
    donor = {a: b for a, b in zip(cycle, cycle[1:] + cycle[:1])}
    prompts = [with_user_field(p, own[i], own[donor[i]]) for i, p in enumerate(data["prompt"])]
    unchanged = sum(own[i] == own[donor[i]] for i in range(len(own)))
    if unchanged:
        logger.warning("evaluate: %d users' index strings repeat another user's, so the swapped-index row shows them their own", unchanged)
    return data.remove_columns("prompt").add_column("prompt", prompts), unchanged


def fusion_weight(args: EvaluateArguments, validation, val_scores: np.ndarray) -> tuple[float, dict]:
    """The fusion weight chosen on validation, and its record for metrics.json."""
    w, choice = choose_weight(args.fusion_weights, np.array(validation["retriever_scores"]), val_scores, np.array(validation["target_position"]))
    return w, {"weight": w, "chosen_on": "validation rank NDCG@10: the smallest w within one paired standard error of the best",
               "best_weight": choice["best"], "validation_ndcg@10_by_weight": choice["curve"], "paired_se_vs_best": choice["paired_se_vs_best"]}


def save(run: RunDir, summary: dict, per_user: dict) -> None:
    """metrics.json, the per-user ranks and table.md (printed)."""
    import datasets

    write_json(run.eval_metrics_file, summary)
    datasets.DatasetDict(per_user).save_to_disk(str(run.eval_per_user))
    table = markdown_table(summary)
    run.eval_table.write_text(table)
    print(table)


def split_metrics(data, scores: np.ndarray, w: float, total_users: int) -> dict:
    """Rank and overall metrics of each row, with how many users' gold score tied another candidate's."""
    gold, retriever = np.array(data["target_position"]), np.array(data["retriever_scores"])
    out = {name: score_metrics(s, gold, total_users) for name, s in (("ranker", scores), ("fused", fuse(retriever, scores, w)))}
    # The retriever's own order is its stored list (ties there: the lower item id first, as `retrieve` ranks).
    out["retriever"] = {**rank_and_overall(data["retriever_rank"], total_users), "tied_gold_users": tied_gold(retriever, gold)}
    return out


def per_user_table(data, scores: np.ndarray, w: float):
    import datasets

    gold = np.array(data["target_position"])
    return datasets.Dataset.from_dict({"user_id": data["user_id"], "candidates": data["candidates"], "scores": scores.tolist(),
                                       "rank": ranks(scores, gold), "fused_rank": ranks(fuse(np.array(data["retriever_scores"]), scores, w), gold),
                                       "retriever_rank": data["retriever_rank"]})


def untrained_validation(folder: Path) -> float | None:
    """The untrained model's validation NDCG@10 that training measured (same validation users when the ranker is this run's)."""
    path = RankerFolder(folder).train_metrics
    metrics = read_json(path).get("untrained") if path.exists() else None
    return metrics["untrained_ndcg@10"] if metrics else None


def ranker_fingerprint(folder: str | None) -> str | None:
    """What identifies a ranker given with --ranker: its own completion record, or its adapter's bytes."""
    if not folder:
        return None
    files = RankerFolder(folder)
    return file_digest(files.complete) or file_digest(files.adapter)


def markdown_table(summary: dict) -> str:
    cols = [f"{m}@{k}" for k in (5, 10) for m in ("mrr", "ndcg", "recall")]
    test, users, w = summary["test"], summary["users"]["test"], summary["fusion"]["weight"]
    head = "| method | " + " | ".join(f"rank {c}" for c in cols) + " | " + " | ".join(f"overall {c}" for c in cols) + " | tied gold |"
    lines = [f"test users: {users['users']} of {users['all_users']} (ground truth in the candidates: {users['in_candidates']}); "
             f"protocol: {summary['protocol']['name']} (evaluation order: {summary['protocol']['eval_order']}); ranker: {summary['ranker']} "
             f"({summary['loaded_as']})", f"ties: {summary['tie_rule']}; 'tied gold' counts the users whose ground truth's score "
             "equals another candidate's", scoring_line(summary), "", head, "|---" * (2 + 2 * len(cols)) + "|"]
    for name, m in test.items():
        label = f"fused (w={w:g})" if name == "fused" else name
        lines.append(f"| {label} | " + " | ".join(f"{m['rank'][c]:.4f}" for c in cols) + " | " + " | ".join(f"{m['overall'][c]:.4f}" for c in cols)
                     + f" | {m['tied_gold_users']} |")
    val = summary["validation"]
    parts = [f"untrained {val['untrained_rank_ndcg@10']:.4f}"] if "untrained_rank_ndcg@10" in val else []
    best = summary["fusion"]["best_weight"]
    parts += [f"ranker {val['ranker']['rank']['ndcg@10']:.4f}",
              f"fused {val['fused']['rank']['ndcg@10']:.4f} (w={w:g}, chosen here; best w={best:g} at "
              f"{summary['fusion']['validation_ndcg@10_by_weight'][str(float(best))]:.4f}, one standard error rule)",
              f"retriever {val['retriever']['rank']['ndcg@10']:.4f}"]
    lines += ["", f"validation rank NDCG@10 ({summary['users']['validation']['in_candidates']} users): " + ", ".join(parts)]
    if "merge_agreement" in summary:
        a = summary["merge_agreement"]
        lines.append(f"merged bf16 vs {a['compared_with']} on validation: top-1 identical {a['top1_identical']:.3f}, top-10 identical {a['top10_identical']:.3f}")
    return "\n".join(lines) + "\n"


def scoring_line(summary: dict) -> str:
    scoring = summary.get("scoring", {"eval_permutations": 1, "seconds": {}})
    k, seconds = scoring["eval_permutations"], ", ".join(f"{name} {s:g} s" for name, s in scoring["seconds"].items())
    orders = "the protocol's order alone" if k == 1 else f"mean letter log-probability over {k} candidate orders, the first the protocol's ({k}x the scoring)"
    return f"scores: {orders}; scoring time: {seconds or 'n/a'}"
