"""Serving: rank a user's candidates with the trained ranker (optionally fused with the retriever's scores).

`Recommender` builds exactly the prompt that `ulmrec evaluate` scores for a user (the same history, candidates and
candidate order) on the base exactly as trained, so both give the same order. Users whose ground truth the retriever
missed are served too: their prompt does not depend on it.
"""

import logging
from dataclasses import dataclass, field

import numpy as np

from .common import RunArguments, UlmrecError
from .layout import RunDir

logger = logging.getLogger(__name__)


@dataclass
class RecommendArguments:
    _argument_group_name = "recommend"
    user: list[str] = field(default_factory=list, metadata={"help": "User id(s): original id or number."})
    split: str = field(default="test", metadata={"help": "Which candidate list: test (history up to the test item) or validation.", "choices": ["test", "validation"]})
    top_k: int = field(default=10, metadata={"help": "Recommendations printed per user."})
    fusion_weight: float | None = field(default=None, metadata={"help": "Rank by z(retriever) + w * z(letter log-prob) with this w (default: the w `evaluate` chose on validation, else the ranker alone)."})
    ranker_only: bool = field(default=False, metadata={"help": "Rank by the ranker's letter scores alone."})
    eval_permutations: int | None = field(default=None, metadata={"help": "Candidate orders per user whose letter log-probabilities are averaged (default: what `evaluate` used, else 1)."})


ARGUMENTS = (RunArguments, RecommendArguments)


class Recommender:
    """Loads a finished run once and scores any of its users."""

    def __init__(self, run_dir: str, fusion_weight: float | None = None, ranker_only: bool = False, eval_permutations: int | None = None):
        from .llm import load_tokenizer
        from .prompts import build_builder
        from .ranker import check_permutations, load_ranker

        self.run = RunDir(run_dir)
        self.model, self.tokenizer, self.config = load_ranker(self.run.require("train"))
        mixture, meta = self.run.mixture(), self.run.eval_meta()
        self.eval_order, self.eval_seed = mixture["protocol"]["eval_order"], meta["eval_seed"]
        self.builder = build_builder(load_tokenizer(mixture["model_name_or_path"]), self.run.titles(), self.run.prompt_settings())
        users = self.run.prepared()["users"]
        self.names = dict(zip(users["user_id"], users["user"]))
        self.by_name = {name: uid for uid, name in self.names.items()}
        self.index = self.run.index()
        self.candidates = {s: self.run.candidates(s) for s in ("validation", "test")}
        self.positions = {s: {uid: i for i, uid in enumerate(c["user_id"])} for s, c in self.candidates.items()}
        evaluated = self.run.eval_metrics() if self.run.is_complete("evaluate") else None
        if fusion_weight is None and evaluated:
            fusion_weight = evaluated["fusion"]["weight"]
        self.fusion_weight = None if ranker_only else fusion_weight
        if eval_permutations is None:
            eval_permutations = evaluated.get("scoring", {}).get("eval_permutations", 1) if evaluated else 1
        check_permutations(eval_permutations)
        self.eval_permutations = eval_permutations

    def user_id(self, user: str) -> int:
        if user in self.by_name:
            return self.by_name[user]
        if user.isdigit() and int(user) in self.names:
            return int(user)
        raise UlmrecError(f"unknown user {user!r} in {self.run.path('prepare')}")

    def rank(self, users: list[str], split: str = "test") -> list[list[tuple[int, str, float]]]:
        """Per user, (item id, title, score) best first; the score is fused when a fusion weight is set."""
        from .metrics import fuse, ranking_order
        from .prompts import eval_row, user_key
        from .ranker import permutation_average, score_prompts

        table = self.candidates[split]
        rows = []
        for user in users:
            uid = self.user_id(user)
            rows.append(eval_row(self.builder, self.eval_order, table[self.positions[split][uid]], self.index.get(self.names[uid]),
                                 self.eval_seed, split))
        prompts, letters = [r["prompt"] for r in rows], self.config["letter_token_ids"]
        keys = [user_key(self.eval_seed, split, r["user_id"]) for r in rows]
        scores = permutation_average(score_prompts(self.model, self.tokenizer, prompts, letters), prompts, keys, self.eval_permutations,
                                     lambda shown, j: score_prompts(self.model, self.tokenizer, shown, letters))
        if self.fusion_weight is not None:
            scores = fuse(np.array([r["retriever_scores"] for r in rows]), scores, self.fusion_weight)
        out = []
        for r, s, order in zip(rows, scores, ranking_order(scores)):  # ties: the shown order, as evaluate ranks them
            out.append([(r["candidates"][i], self.builder.titles[r["candidates"][i]], float(s[i])) for i in order])
        return out


def recommend_users(run_dir: str, users: list[str], split: str = "test", fusion_weight: float | None = None, ranker_only: bool = False,
                    eval_permutations: int | None = None):
    """Ranked (item_id, title, score) lists for a batch of users (programmatic use)."""
    return Recommender(run_dir, fusion_weight, ranker_only, eval_permutations).rank(users, split)


def main(run: RunArguments, args: RecommendArguments):
    if not args.user:
        raise UlmrecError("recommend: give --user USER_ID (one or more)")
    recommender = Recommender(run.run_dir, args.fusion_weight, args.ranker_only, args.eval_permutations)
    results = recommender.rank(args.user, args.split)
    how = f"fused with the retriever, w={recommender.fusion_weight:g}" if recommender.fusion_weight is not None else "ranker alone"
    for user, ranked in zip(args.user, results):
        print(f"\nuser {user} ({how}):")
        for n, (item, title, score) in enumerate(ranked[: args.top_k], 1):
            print(f"{n:3d}. {title}  (item {item}, score {score:.3f})")
    return results
