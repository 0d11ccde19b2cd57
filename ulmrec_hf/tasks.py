"""Alignment-task stage (paper §4.2): prompt/completion datasets per task and their mixture.

Tasks: next-item prediction, index -> preference, preference -> index, history -> index, rating prediction and
intent-based item prediction. Item ids are replaced by titles (cut to `title_max_tokens`). Prompts fit `max_length`
by dropping the oldest history; candidates and the answer are never cut.

The protocol decides three things, recorded in the mixture, every metrics file and the model card:
- `train_targets`: `last` (each user's last training item) or `all_prefixes` (every position t >= 1 of the training
  sequence, with up to `history_len` items before it as history: LlamaRec's and the ULMRec authors' code).
- `train_candidates`: `random` (the target plus 19 seeded random items other than the target and the items before it,
  shuffled: the authors' code, LlamaRec's sampler) or `retriever` (the retriever's top-20 for the training target; a missed target takes a seeded
  random slot, never a fixed one).
- `eval_order`: `retriever` (the retriever's order: the authors' evaluation, where letter A is the retriever's top-1)
  or `shuffled` (a seeded shuffle per user, which measures what the LLM itself understands).
`protocol: paper` is (all_prefixes, random, retriever) and `protocol: shuffled` the same with shuffled evaluation;
`protocol: custom` takes each option as given (default: last, retriever, shuffled, as ulmrec-hf 0.1 did).

The mixture holds `max_train_samples` next-item rows (all of them when unset) and, on top, each alignment task in
proportion `p_task / p_next_item` of that (one row per sampled user at most). Validation/test sets hold the users whose
ground truth is among the candidates ("rank" users); `eval_meta.json` says how many users each split has in all.
"""

import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import StageArguments, UlmrecError, settings_of, write_json
from .layout import RunDir, eval_set_name
from .prompts import INSTRUCTIONS, PromptBuilder, build_builder, eval_row, letter_ids, next_item_row, permutation, tokenizer_fingerprint
from .split import training_part

logger = logging.getLogger(__name__)

TASKS = ("next_item", "index_to_preference", "preference_to_index", "history_to_index", "rating", "intent")
NEEDS_INDEX = {"index_to_preference", "preference_to_index", "history_to_index"}
NEEDS_PREFERENCE = {"index_to_preference", "preference_to_index", "rating", "intent"}
MIX_STRATEGY = "all_exhausted_without_replacement"  # every task row exactly once
PROTOCOLS = {
    "paper": {"train_targets": "all_prefixes", "train_candidates": "random", "eval_order": "retriever"},
    "shuffled": {"train_targets": "all_prefixes", "train_candidates": "random", "eval_order": "shuffled"},
    "custom": {"train_targets": "last", "train_candidates": "retriever", "eval_order": "shuffled"},
}


@dataclass
class TaskArguments:
    _argument_group_name = "tasks"
    model_name_or_path: str = field(default="smollm2", metadata={"help": "Base LLM whose tokenizer fits the prompts: Hub id, path or 'smollm2'."})
    seed: int = field(default=42, metadata={"help": "Seed of the training sample, negatives and mixture."})
    protocol: str = field(default="paper", metadata={"help": "paper: all prefixes, random negatives, retriever order at evaluation (the authors' code); shuffled: the same, evaluation shuffled; custom: the three options below as given.", "choices": list(PROTOCOLS)})
    train_targets: str | None = field(default=None, metadata={"help": "Next-item training targets (default: the protocol's).", "choices": ["last", "all_prefixes"]})
    train_candidates: str | None = field(default=None, metadata={"help": "Training candidates (default: the protocol's).", "choices": ["random", "retriever"]})
    eval_order: str | None = field(default=None, metadata={"help": "Candidate order at validation and test (default: the protocol's).", "choices": ["retriever", "shuffled"]})
    max_length: int = field(default=1024, metadata={"help": "Tokens per sample (prompt + answer)."})
    history_len: int = field(default=20, metadata={"help": "Most recent history items shown."})
    title_max_tokens: int = field(default=32, metadata={"help": "Tokens kept of each title."})
    use_index_to_preference: bool = field(default=True, metadata={"help": "Include index -> preference."})
    use_preference_to_index: bool = field(default=True, metadata={"help": "Include preference -> index."})
    use_history_to_index: bool = field(default=True, metadata={"help": "Include history -> index."})
    use_rating: bool = field(default=True, metadata={"help": "Include rating prediction (skipped when the data has no ratings)."})
    use_intent: bool = field(default=True, metadata={"help": "Include intent-based item prediction."})
    p_next_item: float = field(default=0.5, metadata={"help": "Mixture proportion of next-item prediction."})
    p_index_to_preference: float = field(default=0.1, metadata={"help": "Mixture proportion."})
    p_preference_to_index: float = field(default=0.1, metadata={"help": "Mixture proportion."})
    p_history_to_index: float = field(default=0.1, metadata={"help": "Mixture proportion."})
    p_rating: float = field(default=0.1, metadata={"help": "Mixture proportion."})
    p_intent: float = field(default=0.1, metadata={"help": "Mixture proportion."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Next-item training rows: a seeded sample of this many (default: all); alignment rows come on top in proportion."})
    max_eval_users: int | None = field(default=None, metadata={"help": "Test users: a seeded sample of this many of all users, so overall metrics stay per user."})
    max_validation_users: int | None = field(default=None, metadata={"help": "Validation users, sampled the same way (default: max_eval_users)."})
    eval_seed: int | None = field(default=None, metadata={"help": "Seed of the evaluation samples and their shuffle (default: seed); fix it to compare training seeds on the same users."})
    candidate_permutations: int = field(default=1, metadata={"help": "Write each next-item training row under this many seeded candidate orders (the first its own); alignment rows stay counted from the distinct next-item rows."})
    instruction_next_item: str = field(default=INSTRUCTIONS["next_item"], metadata={"help": "Template text."})
    instruction_index_to_preference: str = field(default=INSTRUCTIONS["index_to_preference"], metadata={"help": "Template text."})
    instruction_preference_to_index: str = field(default=INSTRUCTIONS["preference_to_index"], metadata={"help": "Template text."})
    instruction_history_to_index: str = field(default=INSTRUCTIONS["history_to_index"], metadata={"help": "Template text."})
    instruction_rating: str = field(default=INSTRUCTIONS["rating"], metadata={"help": "Template text."})
    instruction_intent: str = field(default=INSTRUCTIONS["intent"], metadata={"help": "Template text."})


ARGUMENTS = (StageArguments, TaskArguments)


def resolve_protocol(args: TaskArguments) -> dict:
    """The three protocol choices; an option that contradicts a named protocol is an error, never silently replaced."""
    chosen = dict(PROTOCOLS[args.protocol])
    for key in chosen:
        value = getattr(args, key)
        if value is not None and args.protocol != "custom" and value != chosen[key]:
            raise UlmrecError(f"tasks: protocol {args.protocol!r} means {key}={chosen[key]}, but {key}={value} was given; "
                              f"use protocol: custom to combine options freely")
        chosen[key] = value or chosen[key]
    if chosen["train_targets"] == "all_prefixes" and chosen["train_candidates"] == "retriever":
        raise UlmrecError("tasks: train_targets=all_prefixes needs train_candidates=random (the retriever ranks only the last training target)")
    return chosen


class Negatives:
    """Seeded random negatives, as LlamaRec's training candidates: any item but the target and the items before it in
    the user's sequence (so a later item of the user can be a negative; the draw never looks at it)."""

    def __init__(self, items: list[int], n_candidates: int, seed: int):
        self.items, self.n, self.seed = items, n_candidates, seed

    def candidates(self, target: int, exclude: set[int], key: str) -> list[int]:
        if len(self.items) - len(exclude | {target}) < self.n - 1:
            raise UlmrecError(f"tasks: {len(self.items)} items leave fewer than {self.n - 1} negatives besides a target and the "
                              f"{len(exclude)} items before it; use train_candidates: retriever")
        rng = random.Random(f"{self.seed}-{key}")
        chosen = []
        while len(chosen) < self.n - 1:
            item = self.items[rng.randrange(len(self.items))]
            if item != target and item not in exclude and item not in chosen:
                chosen.append(item)
        cands = chosen + [target]
        rng.shuffle(cands)
        return cands


def with_target(candidates: list[int], target: int, shuffle: bool, key: str) -> list[int]:
    """Retriever candidates holding the target: a missed target replaces a seeded random slot; then an optional seeded shuffle."""
    cands, rng = list(candidates), random.Random(key)
    if target not in cands:
        cands[rng.randrange(len(cands))] = target
    if shuffle:
        rng.shuffle(cands)
    return cands


def training_targets(users: list[dict], mode: str) -> list[tuple[int, int]]:
    """(user row, position in the full sequence) of every next-item training target."""
    if mode == "last":
        return [(u, len(training_part(row["items"])) - 1) for u, row in enumerate(users)]
    return [(u, t) for u, row in enumerate(users) for t in range(1, len(training_part(row["items"])))]


def sample(rows: list, n: int | None, key: str) -> list:
    if n is None or len(rows) <= n:
        return rows
    return [rows[i] for i in sorted(random.Random(key).sample(range(len(rows)), n))]


class TaskBuilder:
    """Rows of every task from the training part of each sequence (`split.training_part`); validation/test rows from the retriever."""

    def __init__(self, args: TaskArguments, protocol: dict, users: list[dict], builder: PromptBuilder, index: dict, prefs: dict,
                 train_cands, n_candidates: int):
        self.args, self.protocol, self.users, self.builder, self.index, self.prefs = args, protocol, users, builder, index, prefs
        self.row_of = {u["user_id"]: n for n, u in enumerate(users)}
        self.train_cands = {r["user_id"]: r["candidates"] for r in train_cands} if train_cands is not None else {}
        self.negatives = Negatives(sorted(builder.titles), n_candidates, args.seed)

    def candidates(self, user: dict, t: int, key: str) -> list[int]:
        target = user["items"][t]
        if self.protocol["train_candidates"] == "random":
            return self.negatives.candidates(target, set(user["items"][:t]), f"{key}-{user['user_id']}-{t}")
        shuffle = self.protocol["eval_order"] == "shuffled"
        return with_target(self.train_cands[user["user_id"]], target, shuffle, f"{self.args.seed}-{key}-{user['user_id']}")

    def next_item(self, targets: list[tuple[int, int]]):
        from tqdm.auto import tqdm

        for u, t in tqdm(targets, desc="next-item rows", leave=False, mininterval=2):
            user = self.users[u]
            cands = self.candidates(user, t, "next")
            for j in range(self.args.candidate_permutations):
                order = permutation(len(cands), f"{self.args.seed}-perm{j}-{user['user_id']}-{t}") if j else range(len(cands))
                yield next_item_row(self.builder, self.index.get(user["user"]), user["items"][:t], [cands[i] for i in order], user["items"][t],
                                    user_id=user["user_id"])

    def alignment(self, task: str, users: list[dict]):
        b = self.builder
        for user in users:
            idx, pref, last = self.index.get(user["user"]), self.prefs.get(user["user"]), len(training_part(user["items"])) - 1
            meta = {"task": task, "user_id": user["user_id"], "candidates": [], "target": -1, "target_position": -1}
            if task == "index_to_preference":
                yield {"prompt": b.prompt(task, {"user": idx}), "completion": pref, **meta}
            elif task == "preference_to_index":
                yield {"prompt": b.prompt(task, {"preference": pref}), "completion": idx, **meta}
            elif task == "history_to_index":
                yield {"prompt": b.prompt(task, {}, b.history_lines(training_part(user["items"]))), "completion": idx, **meta}
            elif task == "rating":
                parts = {"user": idx, "preference": pref, "target": f"Next item: {b.titles[user['items'][last]]}"}
                prompt = b.prompt(task, parts, b.history_lines(user["items"][:last], user["ratings"][:last]))
                yield {"prompt": prompt, "completion": f"{user['ratings'][last]:g}", **meta}
            elif task == "intent":
                cands = self.candidates(user, last, "intent")
                yield next_item_row(b, None, [], cands, user["items"][last], task="intent", preference=pref, user_id=user["user_id"])


def enabled_tasks(args: TaskArguments, has_ratings: bool, has_index: bool, has_prefs: bool) -> tuple[list[str], dict]:
    """Next-item prediction (the ranking task, always on), then each alignment task the recipe and the data allow."""
    tasks, skipped = ["next_item"], {}
    for t in TASKS[1:]:
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
    return tasks, skipped


def mixture_counts(tasks: list[str], n_next: int, n_users: int, args: TaskArguments) -> dict[str, int]:
    """Rows per task: next-item rows, then each alignment task in proportion p_task / p_next_item (at most one per user)."""
    counts = {"next_item": n_next}
    for t in tasks[1:]:
        want = round(n_next * getattr(args, f"p_{t}") / args.p_next_item)
        if want > n_users:
            logger.info("tasks: %s wants %d rows for its proportion but has %d users; using %d", t, want, n_users, n_users)
        counts[t] = min(want, n_users)
    return counts


def is_rank_user(r: dict) -> bool:
    """A "rank" user: the ground truth is among the stored candidates (and the retriever's recorded rank says so too)."""
    found = r["target"] in r["candidates"]
    if found != (r["target_rank"] is not None):
        raise UlmrecError(f"tasks: user {r['user_id']}: the retriever recorded rank {r['target_rank']} but the target is "
                          f"{'' if found else 'not '}among its candidates (made before ulmrec-hf 0.3's tie rule); run `ulmrec retrieve --overwrite`")
    return found


def eval_rows(split_rows, tb: TaskBuilder, eval_seed: int, split: str, with_history: bool):
    """Validation/test rows of the users whose ground truth the retriever found (the "rank" users)."""
    for r in split_rows:
        if is_rank_user(r):
            yield eval_row(tb.builder, tb.protocol["eval_order"], r, tb.index.get(tb.users[tb.row_of[r["user_id"]]]["user"]), eval_seed, split, with_history)


def save_rows(rows, path: Path, scratch: Path, key: str):
    """Write rows from an iterator through an on-disk dataset (memory does not grow with their number); the dataset
    as saved at `path`, or None when there were no rows. A fresh scratch cache per call, so nothing is ever reused, and a
    fingerprint from `key` (the stage's settings and inputs) and the name."""
    import itertools
    import shutil

    import datasets

    first = next(rows, None)
    if first is None:
        return None
    chained = itertools.chain([first], rows)
    cache = scratch / path.name
    datasets.Dataset.from_generator(lambda: chained, cache_dir=str(cache), fingerprint=f"{key}-{path.name}").save_to_disk(str(path))
    shutil.rmtree(cache, ignore_errors=True)
    return datasets.load_from_disk(str(path))


def mix(parts: dict, seed: int):
    """The training mixture: each task's rows in a seeded shuffle, then `interleave_datasets` draws each next row's task
    with probability rows(task) / all rows, every row exactly once (each task already holds its proportion of rows, so
    the same next-item settings give the same next-item rows). No task may be empty (`save_rows` leaves empty ones out)."""
    import datasets

    columns = ["prompt", "completion", "task", "user_id", "target_position"]
    total = sum(len(ds) for ds in parts.values())
    probabilities = [len(ds) / total for ds in parts.values()]
    shuffled = [ds.select_columns(columns).shuffle(seed=seed) for ds in parts.values()]
    mixed = datasets.interleave_datasets(shuffled, probabilities=probabilities, seed=seed, stopping_strategy=MIX_STRATEGY)
    return mixed, {"method": "datasets.interleave_datasets", "probabilities": dict(zip(parts, [round(p, 6) for p in probabilities])),
                   "seed": seed, "stopping_strategy": MIX_STRATEGY, "within_task": f"Dataset.shuffle(seed={seed})"}


def write_eval_sets(cands, tb: TaskBuilder, args: TaskArguments, run: RunDir, key: str) -> dict:
    eval_seed = args.seed if args.eval_seed is None else args.eval_seed
    meta = {"eval_order": tb.protocol["eval_order"], "eval_seed": eval_seed}
    for split in ("validation", "test"):
        rows = cands[split]
        cap = args.max_eval_users if split == "test" or args.max_validation_users is None else args.max_validation_users
        picked = sample(list(range(len(rows))), cap, f"{eval_seed}-{split}")  # a sample of *all* users keeps overall metrics per user
        chosen = rows.select(picked)
        meta[split] = {"users": len(picked), "in_candidates": sum(map(is_rank_user, chosen)), "all_users": len(rows)}
        kinds = [False, True] if any(tb.index.values()) else [False]  # uid-only (no history) needs a user field
        for uid_only in kinds:
            prompts = eval_rows(chosen, tb, eval_seed, split, with_history=not uid_only)
            save_rows(prompts, run.task_path(eval_set_name(split, uid_only)), run.tasks_scratch, key)
    return meta


def main(stage: StageArguments, args: TaskArguments) -> Path:
    from .llm import load_tokenizer

    run = RunDir(stage.run_dir)
    protocol = resolve_protocol(args)
    if args.candidate_permutations < 1:
        raise UlmrecError(f"tasks: --candidate_permutations must be at least 1 (1: each row once, in its own order), got {args.candidate_permutations}")
    tokenizer = load_tokenizer(args.model_name_or_path)
    settings = {"tasks": settings_of(args), "tokenizer": tokenizer_fingerprint(tokenizer)}
    if not run.begin("tasks", settings, stage.overwrite, inputs=("prepare", "retrieve", "index", "preferences?")):
        return run.path("tasks")
    data, cands, index, prefs = run.prepared(), run.candidates(), run.index(), run.preferences(required=False)
    if any(t is None for t in data["items"]["title"]):
        raise UlmrecError(f"{run.path('prepare')}: some items have no title; title-based stages need data prepared with titles: required")
    users = data["users"].to_list()
    tasks, skipped = enabled_tasks(args, "ratings" in data["users"].column_names, any(index.values()), bool(prefs))
    tb = TaskBuilder(args, protocol, users, build_builder(tokenizer, run.titles(), asdict(args)), index, prefs, cands["train"],
                     len(cands["test"][0]["candidates"]))
    key = run.stage_key("tasks")
    parts, mixed, mixing = write_training_sets(run, tb, tasks, args, key)
    eval_meta = write_eval_sets(cands, tb, args, run, key)
    ids = letter_ids(tokenizer, parts["next_item"][0]["prompt"], len(cands["test"][0]["candidates"]))
    total_p = sum(getattr(args, f"p_{t}") for t in parts)
    mixture = {"protocol": {"name": args.protocol, **protocol}, "model_name_or_path": args.model_name_or_path, "tokenizer": settings["tokenizer"],
               "tasks": {t: {"proportion": round(getattr(args, f"p_{t}") / total_p, 4), "rows": len(ds)} for t, ds in parts.items()},
               "skipped": skipped, "mixing": mixing, "train_samples": len(mixed), "next_item_samples": len(parts["next_item"]),
               "candidate_permutations": args.candidate_permutations,
               "num_candidates": len(ids), "letter_token_ids": ids, "seed": args.seed}
    write_json(run.mixture_file, mixture)
    write_json(run.eval_meta_file, eval_meta)
    run.finish("tasks")
    logger.info("tasks: %d training rows (%s), protocol %s; evaluation users %s", len(mixed),
                ", ".join(f"{t} {len(ds)}" for t, ds in parts.items()), protocol, eval_meta)
    return run.path("tasks")


def write_training_sets(run: RunDir, tb: TaskBuilder, tasks: list[str], args: TaskArguments, key: str):
    """Each task's rows (the next-item sample, then each alignment task's share of users) and their mixture `train`;
    (the non-empty task datasets, the mixture, how it was mixed)."""
    users, prefs, index = tb.users, tb.prefs, tb.index
    targets = sample(training_targets(users, tb.protocol["train_targets"]), args.max_train_samples, f"{args.seed}-train")
    counts = mixture_counts(tasks, len(targets), len(users), args)
    parts = {"next_item": save_rows(tb.next_item(targets), run.task_path("next_item"), run.tasks_scratch, key)}
    for t in tasks[1:]:
        eligible = [u for u in users if (t not in NEEDS_PREFERENCE or prefs.get(u["user"])) and (t not in NEEDS_INDEX or index.get(u["user"]))]
        parts[t] = save_rows(tb.alignment(t, sample(eligible, counts[t], f"{args.seed}-{t}")), run.task_path(t), run.tasks_scratch, key)
    parts = {t: ds for t, ds in parts.items() if ds is not None}
    mixed, mixing = mix(parts, args.seed)
    mixed.save_to_disk(str(run.task_path("train")))
    return parts, mixed, mixing
