"""Serving: rank a user's candidates with the trained ranker, and explain a user index in words.

`recommend_users` builds exactly the prompt that `ulmrec evaluate` scores for a test user (the same
history, candidates and candidate order), so both give the same order.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .common import UlmrecError, read_json, require

logger = logging.getLogger(__name__)


@dataclass
class RecommendArguments:
    run_dir: str = field(default="runs/demo", metadata={"help": "A finished run directory.", "aliases": ["--run"]})
    user: list[str] = field(default_factory=list, metadata={"help": "User id(s): original id or number."})
    split: str = field(default="test", metadata={"help": "Which candidate list: test (history up to the test item) or validation.", "choices": ["test", "validation"]})
    top_k: int = field(default=10, metadata={"help": "Recommendations printed per user."})


@dataclass
class ExplainArguments:
    run_dir: str = field(default="runs/demo", metadata={"help": "A finished run directory.", "aliases": ["--run"]})
    index: str | None = field(default=None, metadata={"help": "An index string or prefix, e.g. '<a_3><b_7>'."})
    user: str | None = field(default=None, metadata={"help": "A user id whose index to explain."})
    max_new_tokens: int = field(default=48, metadata={"help": "Length of the generated preference."})


class Recommender:
    """Loads a run once and scores any of its users."""

    def __init__(self, run_dir: str):
        import datasets

        from .ranker import load_ranker
        from .tasks import PromptBuilder, TaskArguments

        self.run = Path(run_dir)
        self.model, self.tokenizer, self.config = load_ranker(require(self.run / "ranker", "train"))
        data = datasets.load_from_disk(str(self.run / "data"))
        self.titles = dict(zip(data["items"]["item_id"], data["items"]["title"]))
        self.users = {u["user_id"]: u for u in data["users"].to_list()}
        self.by_name = {u["user"]: uid for uid, u in self.users.items()}
        index = datasets.load_from_disk(str(self.run / "user_index" / "index"))
        self.index = dict(zip(index["user"], index["index"]))
        mixture = read_json(self.run / "tasks" / "mixture.json")
        self.args, self.seed = TaskArguments(**mixture["args"]), mixture["seed"]
        self.builder = PromptBuilder(self.tokenizer, self.titles, self.args)
        self.candidates = {s: datasets.load_from_disk(str(self.run / "retriever" / "candidates" / s)) for s in ("validation", "test")}

    def user_id(self, user: str) -> int:
        if user in self.by_name:
            return self.by_name[user]
        if user.isdigit() and int(user) in self.users:
            return int(user)
        raise UlmrecError(f"unknown user {user!r} in {self.run / 'data'}")

    def rank(self, users: list[str], split: str = "test") -> list[list[tuple[int, str, float]]]:
        from .ranker import score_prompts
        from .tasks import next_item_rows

        table = self.candidates[split]
        position = {uid: i for i, uid in enumerate(table["user_id"])}
        rows = []
        for user in users:
            row = dict(table[position[self.user_id(user)]])
            row["target_rank"] = 1  # serving: the prompt does not depend on whether the target was retrieved
            rows += next_item_rows([row], self.users, self.index, self.builder, self.args, self.seed, split)
        scores = score_prompts(self.model, self.tokenizer, [r["prompt"] for r in rows], self.config["letter_token_ids"])
        out = []
        for r, s in zip(rows, scores):
            order = sorted(range(len(s)), key=lambda i: -s[i])
            out.append([(r["candidates"][i], self.titles[r["candidates"][i]], float(s[i])) for i in order])
        return out


def recommend_users(run_dir: str, users: list[str], split: str = "test"):
    """Ranked (item_id, title, score) lists for a batch of users (programmatic use)."""
    return Recommender(run_dir).rank(users, split)


def main(args: RecommendArguments):
    if not args.user:
        raise UlmrecError("recommend: give --user USER_ID (one or more)")
    results = recommend_users(args.run_dir, args.user, args.split)
    for user, ranked in zip(args.user, results):
        print(f"\nuser {user}:")
        for n, (item, title, score) in enumerate(ranked[: args.top_k], 1):
            print(f"{n:3d}. {title}  (item {item}, score {score:.3f})")
    return results


def explain(args: ExplainArguments) -> str:
    import torch

    from .ranker import load_ranker
    from .tasks import HEADER, INSTRUCTIONS

    run = Path(args.run_dir)
    model, tokenizer, _ = load_ranker(run / "ranker")
    index = args.index
    if index is None:
        import datasets

        table = datasets.load_from_disk(str(run / "user_index" / "index"))
        lookup = dict(zip(table["user"], table["index"])) | {str(u): i for u, i in zip(table["user_id"], table["index"])}
        if args.user not in lookup:
            raise UlmrecError("explain: give --index '<a_..>...' or a known --user")
        index = lookup[args.user]
    prompt = HEADER.format(instruction=INSTRUCTIONS["index_to_preference"], body=f"User: {index}")
    enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"{index}: {text}")
    return text
