"""Alignment-task stage (paper §4.2): prompt/completion datasets per task and their mixture.

Tasks: next-item prediction, index -> preference, preference -> index, history -> index, rating
prediction, intent-based item prediction. Item ids are replaced by titles (cut to `title_max_tokens`).
Prompts are fitted to `max_length` by dropping the oldest history items; candidates and the answer are
never cut (a prompt that cannot fit without them is an error).

Training samples predict each user's last *training* item (items[-3]) from the retriever's `train`
candidates; when the retriever missed it, it replaces the last candidate so the answer exists.
Validation/test sets hold the users whose ground truth is among the candidates ("rank" users);
`eval_meta.json` records how many users each split has in all, for the overall metrics.
"""

import json
import logging
import random
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import RunArguments, UlmrecError, mark_complete, require, should_skip, stage_dir, write_json

logger = logging.getLogger(__name__)

TASKS = ("next_item", "index_to_preference", "preference_to_index", "history_to_index", "rating", "intent")
NEEDS_INDEX = {"index_to_preference", "preference_to_index", "history_to_index"}
NEEDS_PREFERENCE = {"index_to_preference", "preference_to_index", "rating", "intent"}
HEADER = "### Instruction:\n{instruction}\n### Input:\n{body}\n### Response:\n"
INSTRUCTIONS = {
    "next_item": "Given the user and their purchase history in chronological order, choose the item the user will buy next. Answer with the candidate's letter.",
    "index_to_preference": "Describe the preferences of this user in one sentence.",
    "preference_to_index": "Which user has this preference? Answer with the user's index.",
    "history_to_index": "Which user has this purchase history? Answer with the user's index.",
    "rating": "Predict the star rating (1-5) the user gives to the next item. Answer with the number.",
    "intent": "Choose the candidate that best matches the user's intention. Answer with the candidate's letter.",
}


@dataclass
class TaskArguments:
    model_name_or_path: str | None = field(default="smollm2", metadata={"help": "Base LLM (its tokenizer fits the prompts): Hub id, path or 'smollm2'."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per sample (prompt + answer)."})
    history_len: int = field(default=20, metadata={"help": "Most recent history items shown."})
    title_max_tokens: int = field(default=32, metadata={"help": "Tokens kept of each title."})
    candidate_order: str = field(default="shuffled", metadata={"help": "Candidate order in training and evaluation (recorded in every metrics file).", "choices": ["shuffled", "retriever"]})
    use_next_item: bool = field(default=True, metadata={"help": "Include next-item prediction."})
    use_index_to_preference: bool = field(default=True, metadata={"help": "Include index -> preference."})
    use_preference_to_index: bool = field(default=True, metadata={"help": "Include preference -> index."})
    use_history_to_index: bool = field(default=True, metadata={"help": "Include history -> index."})
    use_rating: bool = field(default=True, metadata={"help": "Include rating prediction (skipped when the data has no ratings)."})
    use_intent: bool = field(default=True, metadata={"help": "Include intent-based item prediction."})
    p_next_item: float = field(default=0.5, metadata={"help": "Mixture probability of next-item prediction."})
    p_index_to_preference: float = field(default=0.1, metadata={"help": "Mixture probability."})
    p_preference_to_index: float = field(default=0.1, metadata={"help": "Mixture probability."})
    p_history_to_index: float = field(default=0.1, metadata={"help": "Mixture probability."})
    p_rating: float = field(default=0.1, metadata={"help": "Mixture probability."})
    p_intent: float = field(default=0.1, metadata={"help": "Mixture probability."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on the mixed training set; rows are built for a seeded sample of this many training users."})
    max_eval_users: int | None = field(default=None, metadata={"help": "Evaluate a seeded sample of this many users (of all users, so overall metrics stay per user)."})
    max_validation_users: int | None = field(default=None, metadata={"help": "Sample size for the validation split (default: max_eval_users)."})
    eval_seed: int | None = field(default=None, metadata={"help": "Seed of the evaluation samples and candidate order (default: --seed); fix it to compare training seeds on the same users."})
    instruction_next_item: str = field(default=INSTRUCTIONS["next_item"], metadata={"help": "Template text."})
    instruction_index_to_preference: str = field(default=INSTRUCTIONS["index_to_preference"], metadata={"help": "Template text."})
    instruction_preference_to_index: str = field(default=INSTRUCTIONS["preference_to_index"], metadata={"help": "Template text."})
    instruction_history_to_index: str = field(default=INSTRUCTIONS["history_to_index"], metadata={"help": "Template text."})
    instruction_rating: str = field(default=INSTRUCTIONS["rating"], metadata={"help": "Template text."})
    instruction_intent: str = field(default=INSTRUCTIONS["intent"], metadata={"help": "Template text."})


class PromptBuilder:
    """Builds prompts that fit `max_length`, with titles cut to `title_max_tokens` tokens."""

    def __init__(self, tokenizer, titles: dict[int, str], args: TaskArguments):
        self.tok, self.args, self.titles = tokenizer, args, {}
        for item, title in titles.items():
            ids = tokenizer(title or f"item {item}", add_special_tokens=False).input_ids[: args.title_max_tokens]
            self.titles[item] = tokenizer.decode(ids).strip()
        self.letters = list(string.ascii_uppercase)

    def n_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False).input_ids)

    def prompt(self, task: str, parts: dict, history: list[str] | None = None, answer_tokens: int = 8) -> str:
        """Fill the template; drop the oldest history lines until the prompt + answer fits."""
        history = list(history or [])[-self.args.history_len:]
        instruction = getattr(self.args, f"instruction_{task}")
        while True:
            body = "\n".join(v for k, v in self.sections(parts, history))
            text = HEADER.format(instruction=instruction, body=body)
            if self.n_tokens(text) + answer_tokens <= self.args.max_length:
                return text
            if not history:
                raise UlmrecError(f"tasks: a {task} prompt needs {self.n_tokens(text)} tokens without any history, more than "
                                  f"max_length={self.args.max_length} allows; raise max_length or lower title_max_tokens")
            history.pop(0)

    @staticmethod
    def sections(parts: dict, history: list[str]):
        for key in ("user", "preference"):
            if parts.get(key):
                yield key, f"{key.capitalize()}: {parts[key]}"
        if history:
            yield "history", "History:\n" + "\n".join(history)
        for key in ("target", "candidates"):
            if parts.get(key):
                yield key, parts[key]

    def history_lines(self, items: list[int], ratings: list[float] | None = None) -> list[str]:
        lines = []
        for n, item in enumerate(items):
            rating = f" ({ratings[n]:g} stars)" if ratings else ""
            lines.append(f"- {self.titles[item]}{rating}")
        return lines

    def candidate_block(self, candidates: list[int]) -> str:
        return "Candidates:\n" + "\n".join(f"({self.letters[i]}) {self.titles[c]}" for i, c in enumerate(candidates))


def order_candidates(candidates: list[int], target: int | None, order: str, seed: int, key: str) -> list[int]:
    """Insert a missed target in the last slot, then shuffle (seeded per user and split) or keep retriever order."""
    cands = list(candidates)
    if target is not None and target not in cands:
        cands[-1] = target
    if order == "shuffled":
        random.Random(f"{seed}-{key}").shuffle(cands)
    return cands


def letter_ids(tokenizer, prompt: str, n: int) -> list[int]:
    """Token id of each answer letter exactly as it tokenizes after `prompt` (pitfall 1: never "▁A")."""
    base = tokenizer(prompt, add_special_tokens=False).input_ids
    ids = []
    for letter in string.ascii_uppercase[:n]:
        full = tokenizer(prompt + letter, add_special_tokens=False).input_ids
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise UlmrecError(f"tasks: the answer letter {letter!r} is not a single token after the prompt for this tokenizer")
        ids.append(full[-1])
    return ids


def next_item_rows(split_rows, users, index, builder: PromptBuilder, args, seed, split, with_history=True, train=False):
    rows = []
    for r in split_rows:
        if not train and r["target_rank"] is None:
            continue
        cands = order_candidates(r["candidates"], r["target"] if train else None, args.candidate_order, seed, f"{split}-{r['user_id']}")
        u = users[r["user_id"]]
        history = builder.history_lines(r["history"]) if with_history else []
        prompt = builder.prompt("next_item", {"user": index.get(u["user"]), "candidates": builder.candidate_block(cands)}, history)
        pos = cands.index(r["target"]) if r["target"] in cands else -1  # -1 only when serving a user the retriever missed
        rows.append({"prompt": prompt, "completion": builder.letters[pos] if pos >= 0 else "", "task": "next_item", "user_id": r["user_id"],
                     "candidates": cands, "target": r["target"], "target_position": pos})
    return rows


def build_train_tasks(tasks, cand_train, users, index, prefs, builder, args, seed, has_ratings):
    """One list of rows per enabled task (all from training interactions only)."""
    out = {t: [] for t in tasks}
    for r in cand_train:
        u = users[r["user_id"]]
        idx, pref = index.get(u["user"]), prefs.get(u["user"])
        train_items = u["items"][:-2]
        if "next_item" in tasks:
            out["next_item"] += next_item_rows([r], users, index, builder, args, seed, "train", train=True)
        meta = {"user_id": r["user_id"], "candidates": [], "target": -1, "target_position": -1}
        if "index_to_preference" in tasks:
            out["index_to_preference"].append({"prompt": builder.prompt("index_to_preference", {"user": idx}), "completion": pref, "task": "index_to_preference", **meta})
        if "preference_to_index" in tasks:
            out["preference_to_index"].append({"prompt": builder.prompt("preference_to_index", {"preference": pref}), "completion": idx, "task": "preference_to_index", **meta})
        if "history_to_index" in tasks:
            prompt = builder.prompt("history_to_index", {}, builder.history_lines(train_items))
            out["history_to_index"].append({"prompt": prompt, "completion": idx, "task": "history_to_index", **meta})
        if "rating" in tasks and has_ratings:
            hist, ratings = u["items"][:-3], u["ratings"][:-3]
            prompt = builder.prompt("rating", {"user": idx, "preference": pref, "target": f"Next item: {builder.titles[u['items'][-3]]}"},
                                    builder.history_lines(hist, ratings))
            out["rating"].append({"prompt": prompt, "completion": f"{u['ratings'][-3]:g}", "task": "rating", **meta})
        if "intent" in tasks:
            cands = order_candidates(r["candidates"], r["target"], args.candidate_order, seed + 1, f"intent-{r['user_id']}")
            prompt = builder.prompt("intent", {"preference": pref, "candidates": builder.candidate_block(cands)})
            out["intent"].append({"prompt": prompt, "completion": builder.letters[cands.index(r["target"])], "task": "intent",
                                  "user_id": r["user_id"], "candidates": cands, "target": r["target"], "target_position": cands.index(r["target"])})
    return out


def enabled_tasks(args: TaskArguments, has_ratings: bool, has_index: bool, has_prefs: bool) -> tuple[list[str], dict]:
    tasks, skipped = [], {}
    for t in TASKS:
        if not getattr(args, f"use_{t}"):
            skipped[t] = "disabled by the recipe"
        elif t == "rating" and not has_ratings:
            skipped[t] = "the data set has no ratings"
        elif t in NEEDS_INDEX and not has_index:
            skipped[t] = "the user-index scheme is 'none'"
        elif t in NEEDS_PREFERENCE and not has_prefs:
            skipped[t] = "no preferences (run `ulmrec preferences`)"
        else:
            tasks.append(t)
    for t, why in skipped.items():
        logger.info("tasks: skipping %s: %s", t, why)
    if "next_item" not in tasks:
        raise UlmrecError("tasks: next-item prediction is the ranking task and cannot be disabled")
    return tasks, skipped


def load_inputs(run_args: RunArguments):
    import datasets

    paths = {name: require(stage_dir(run_args, name), command) for name, command in (("data", "prepare"), ("retriever", "retrieve"), ("user_index", "index"))}
    data = datasets.load_from_disk(str(paths["data"]))
    if any(t is None for t in data["items"]["title"]):
        raise UlmrecError(f"{paths['data']}: some items have no title; title-based stages need data prepared with --titles required")
    cands = datasets.load_from_disk(str(paths["retriever"] / "candidates"))
    index = datasets.load_from_disk(str(paths["user_index"] / "index"))
    pref_file = stage_dir(run_args, "preferences") / "preferences.jsonl"
    prefs = {r["user"]: r["preference"] for r in map(json.loads, pref_file.read_text().splitlines())} if pref_file.exists() else {}
    return data, cands, dict(zip(index["user"], index["index"])), prefs


def main(run_args: RunArguments, args: TaskArguments) -> Path:
    import datasets

    from .llm import load_tokenizer

    out = stage_dir(run_args, "tasks")
    if should_skip(run_args, out, "tasks"):
        return out
    data, cands, index, prefs = load_inputs(run_args)
    users = {u["user_id"]: u for u in data["users"].to_list()}
    has_ratings = "ratings" in data["users"].column_names
    tasks, skipped = enabled_tasks(args, has_ratings, any(index.values()), bool(prefs))
    tokenizer = load_tokenizer(args.model_name_or_path)
    builder = PromptBuilder(tokenizer, dict(zip(data["items"]["item_id"], data["items"]["title"])), args)
    per_task = build_train_tasks(tasks, train_users(cands["train"], args.max_train_samples, run_args.seed), users, index, prefs, builder,
                                 args, run_args.seed, has_ratings)
    out.mkdir(parents=True, exist_ok=True)
    parts = {t: datasets.Dataset.from_list(rows) for t, rows in per_task.items() if rows}
    for t, ds in parts.items():
        ds.save_to_disk(str(out / t))
    probs = [getattr(args, f"p_{t}") for t in parts]
    mixed = datasets.interleave_datasets(list(parts.values()), probabilities=[p / sum(probs) for p in probs], seed=run_args.seed,
                                         stopping_strategy="first_exhausted")
    if args.max_train_samples:
        mixed = mixed.select(range(min(args.max_train_samples, len(mixed))))
    mixed.save_to_disk(str(out / "train"))
    eval_seed = run_args.seed if args.eval_seed is None else args.eval_seed
    eval_meta = write_eval_sets(cands, users, index, builder, args, eval_seed, out)
    ids = letter_ids(tokenizer, per_task["next_item"][0]["prompt"], len(cands["test"][0]["candidates"]))
    mixture = {"tasks": {t: {"probability": round(p / sum(probs), 4), "rows": len(parts[t]), "in_mixture": mixed["task"].count(t)}
                         for t, p in zip(parts, probs)},
               "skipped": skipped, "train_samples": len(mixed), "candidate_order": args.candidate_order, "seed": run_args.seed, "letter_token_ids": ids,
               "args": asdict(args)}
    write_json(out / "mixture.json", mixture)
    write_json(out / "eval_meta.json", eval_meta)
    mark_complete(out)
    logger.info("tasks: %d mixed training samples from %s; eval users %s", len(mixed), list(parts), eval_meta)
    return out


def train_users(rows, max_samples: int | None, seed: int):
    """A seeded sample of training users, enough for `max_samples` mixed rows (each user gives one row per task)."""
    if not max_samples or len(rows) <= max_samples:
        return rows
    return rows.select(sorted(random.Random(f"{seed}-train").sample(range(len(rows)), max_samples)))


def write_eval_sets(cands, users, index, builder, args, seed, out: Path) -> dict:
    import datasets

    meta = {"candidate_order": args.candidate_order, "eval_seed": seed}
    for split in ("validation", "test"):
        rows = cands[split]
        sample = list(range(len(rows)))
        cap = args.max_eval_users if split == "test" or args.max_validation_users is None else args.max_validation_users
        if cap and len(rows) > cap:  # a seeded sample of *all* users keeps overall metrics per user
            sample = sorted(random.Random(f"{seed}-{split}").sample(sample, cap))
        ranks = [rows[i]["target_rank"] for i in sample]
        chosen = rows.select([i for i, r in zip(sample, ranks) if r is not None])
        meta[split] = {"users": len(sample), "in_candidates": len(chosen), "all_users": len(rows)}
        kinds = [("", True), ("_uid_only", False)] if any(index.values()) else [("", True)]  # uid-only needs a user index
        for suffix, with_history in kinds:
            data = next_item_rows(chosen, users, index, builder, args, seed, split, with_history=with_history)
            datasets.Dataset.from_list(data).save_to_disk(str(out / f"next_item_{split}{suffix}"))
    return meta
