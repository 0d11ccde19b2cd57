"""Data stage: Amazon review files (2014, 2018, 2023 or LlamaRec `dataset.json`) -> `runs/<name>/data/`.

Pipeline (paper §5.1): drop items without a usable title, iterative k-core on users and items,
chronological sequences, leave-one-out split. Ids are assigned from sorted original ids, so the
same input always gives the same ids and byte-identical datasets.
"""

import hashlib
import json
import logging
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .common import StageArguments, UlmrecError, read_text, settings_of, write_json
from .layout import RunDir
from .records import SIGNALS, SkipLog, clean_title, count_stats, read_reviews, read_titles

logger = logging.getLogger(__name__)

FORMATS = ("auto", "amazon2014", "amazon2018", "amazon2023", "llamarec")
ENGINES = ("duckdb", "spark", "python")
# Field names of the raw review and meta records, per format.


@dataclass
class PrepareArguments:
    _argument_group_name = "prepare"
    _operational = ('input', 'meta_file', 'engine', 'memory_limit', 'temp_directory', 'spark_master')  # fields that do not change the output (left out of the recorded settings)
    input: str = field(default=None, metadata={"help": "A review file, a LlamaRec dataset.json, or a folder holding them (its content, not its path, is a setting)."})
    input_format: str = field(default="auto", metadata={"help": "Format of the input.", "choices": list(FORMATS)})
    meta_file: str | None = field(default=None, metadata={"help": "Item metadata file (found next to the reviews if unset)."})
    titles: str = field(default="required", metadata={"help": "'required' drops items without a title; 'optional' keeps them (review-only work).", "choices": ["required", "optional"]})
    min_interactions: int = field(default=5, metadata={"help": "k of the iterative k-core filter on users and items."})
    dataset_name: str | None = field(default=None, metadata={"help": "Name used in the dataset card (default: from the file name)."})
    engine: str = field(default="duckdb", metadata={"help": "Engine for raw review files: 'duckdb' (embedded, out of core), 'spark' (pyspark, local or a cluster) or 'python' (the reference reader, all rows in memory). All give the same datasets; a LlamaRec dataset.json is always read in Python.", "choices": list(ENGINES)})
    memory_limit: str = field(default="2GB", metadata={"help": "DuckDB's memory limit (it spills to temp_directory beyond it); the driver memory of a local Spark."})
    temp_directory: str | None = field(default=None, metadata={"help": "Folder for spilled and intermediate data (default: the system's temp folder); for a Spark cluster, a path the driver and executors share."})
    spark_master: str = field(default="local[*]", metadata={"help": "Spark master URL for --engine spark, e.g. spark://host:7077 or yarn."})


ARGUMENTS = (StageArguments, PrepareArguments)


def k_core(rows: list[dict], k: int) -> tuple[list[dict], int]:
    """Iteratively drop users and items with fewer than k interactions until nothing changes."""
    rounds = 0
    while True:
        users = Counter(r["user"] for r in rows)
        items = Counter(r["item"] for r in rows)
        kept = [r for r in rows if users[r["user"]] >= k and items[r["item"]] >= k]
        rounds += 1
        if len(kept) == len(rows):
            return kept, rounds
        rows = kept


def detect(path: Path, fmt: str, meta_file: str | None) -> tuple[str, Path, Path | None]:
    """Resolve (format, reviews file, meta file) from a file or a folder."""
    if not path.exists():
        raise UlmrecError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        if (path / "dataset.json").exists() and fmt in ("auto", "llamarec"):
            return "llamarec", path / "dataset.json", None
        reviews = [p for p in files if not p.name.startswith("meta_") and re.search(r"(\.json\.gz|_5\.json|\.jsonl(\.gz)?)$", p.name)]
        if len(reviews) != 1:
            raise UlmrecError(f"{path}: expected one review file (*.json.gz / *.jsonl), found {[p.name for p in reviews]}")
        path = reviews[0]
    if fmt == "auto":
        if path.name == "dataset.json":
            fmt = "llamarec"
        elif path.name.startswith("reviews_"):
            fmt = "amazon2014"
        elif ".jsonl" in path.name:
            fmt = "amazon2023"
        else:
            fmt = "amazon2018"
    if fmt == "llamarec":
        return fmt, path, None
    if meta_file:
        meta = Path(meta_file)
        if not meta.exists():
            raise UlmrecError(f"{meta}: no such meta file")
        return fmt, path, meta
    category = re.sub(r"^reviews_|(_5)?\.jsonl?(\.gz)?$", "", path.name)
    candidates = sorted(path.parent.glob(f"meta_{category}.json*"))
    return fmt, path, candidates[0] if candidates else None


def file_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        if p is not None:
            h.update(p.read_bytes())
    return h.hexdigest()


def from_raw(fmt: str, reviews: Path, meta: Path | None, args: PrepareArguments, skips: SkipLog, notes: Counter):
    rows = read_reviews(reviews, fmt, skips, notes)
    wanted = {r["item"] for r in rows}
    if meta is None:
        if args.titles == "required":
            raise UlmrecError(f"{reviews}: no meta_*.json(l)(.gz) file next to it, and titles are required "
                              "(pass --meta_file, or --titles optional for review-only work)")
        titles = {}
    else:
        titles = read_titles(meta, fmt, wanted, skips, notes)
    if args.titles == "required":
        before = len(rows)
        rows = [r for r in rows if titles.get(r["item"])]
        notes["interactions_without_title"] = before - len(rows)
    rows = dedupe(rows, notes)
    rows, rounds = k_core(rows, args.min_interactions)
    notes["k_core_rounds"] = rounds
    if not rows:
        raise UlmrecError(f"{reviews}: no interactions left after dropping untitled items and {args.min_interactions}-core filtering")
    signals = {
        "ratings": any(r["rating"] is not None for r in rows),
        "timestamps": any(r["timestamp"] is not None for r in rows),
        "reviews": any(r["review"] for r in rows),
        "summaries": any(r["summary"] for r in rows),
    }
    item_names = sorted({r["item"] for r in rows})
    item_id = {a: i for i, a in enumerate(item_names, 1)}
    by_user = defaultdict(list)
    for r in rows:
        by_user[r["user"]].append(r)
    users = []
    for uid, name in enumerate(sorted(by_user), 1):
        seq = sorted(by_user[name], key=lambda r: (r["timestamp"] or 0, r["item"]))
        users.append(user_row(uid, name, seq, item_id, signals))
    items = {"item_id": list(item_id.values()), "asin": item_names, "title": [titles.get(a) for a in item_names]}
    return users, items, signals


def dedupe(rows: list[dict], notes: Counter) -> list[dict]:
    """Keep a user's earliest review of an item; later repeats are counted, not kept."""
    seen, kept = set(), []
    for r in sorted(rows, key=lambda r: (r["timestamp"] or 0, r["order"])):
        key = (r["user"], r["item"])
        if key in seen:
            notes["duplicate_interactions"] += 1
            continue
        seen.add(key)
        kept.append(r)
    return sorted(kept, key=lambda r: r["order"])


def user_row(uid: int, name: str, seq: list[dict], item_id: dict, signals: dict) -> dict:
    row = {"user_id": uid, "user": name, "items": [item_id[r["item"]] for r in seq]}
    for signal, key, default in (("ratings", "rating", 0.0), ("timestamps", "timestamp", 0),
                                 ("reviews", "review", ""), ("summaries", "summary", "")):
        if signals[signal]:
            row[signal] = [r[key] if r[key] is not None else default for r in seq]
    return row


def from_llamarec(path: Path, notes: Counter):
    """LlamaRec's `dataset.json`: keep its user and item numbers so val/test match the file exactly."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UlmrecError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    missing = [k for k in ("train", "val", "test", "meta", "umap", "smap") if k not in data]
    if missing:
        raise UlmrecError(f"{path}: not a LlamaRec dataset.json, missing keys {missing}")
    user_name = {int(v): k for k, v in data["umap"].items()}
    asin = {int(v): k for k, v in data["smap"].items()}
    users = []
    for uid in sorted(int(u) for u in data["train"]):
        key = str(uid)
        if key not in data["val"] or key not in data["test"]:
            raise UlmrecError(f"{path}: user {uid} has a train sequence but no val/test item")
        seq = list(data["train"][key]) + list(data["val"][key]) + list(data["test"][key])
        users.append({"user_id": uid, "user": user_name.get(uid, str(uid)), "items": seq})
    ids = sorted(asin)
    titles = [clean_title(data["meta"].get(str(i))) for i in ids]
    notes["items_without_title"] = sum(t is None for t in titles)
    items = {"item_id": ids, "asin": [asin[i] for i in ids], "title": titles}
    return users, items, dict.fromkeys(SIGNALS, False)


def leave_one_out(items: list[int]) -> tuple[list[int], int, int]:
    """(train prefix, validation target, test target) of one chronological sequence."""
    return items[:-2], items[-2], items[-1]


def table_stats(users: list[dict], n_items: int) -> dict:
    return count_stats(len(users), n_items, sum(len(u["items"]) for u in users))


def build_datasets(users: list[dict], items: dict, fingerprint: str):
    import datasets
    import pyarrow as pa

    user_table = pa.Table.from_pylist(users)
    item_table = pa.Table.from_pydict(items, schema=pa.schema([("item_id", pa.int64()), ("asin", pa.string()), ("title", pa.string())]))
    return datasets.DatasetDict({
        "users": datasets.Dataset(user_table, fingerprint=f"{fingerprint}-users"),
        "items": datasets.Dataset(item_table, fingerprint=f"{fingerprint}-items"),
    })


def main(stage: StageArguments, args: PrepareArguments) -> Path:
    run = RunDir(stage.run_dir)
    if not args.input:
        raise UlmrecError("prepare: --input is required (a review file, dataset.json, or a folder)")
    fmt, reviews, meta = detect(Path(args.input), args.input_format, args.meta_file)
    digest = file_digest(reviews, meta)
    if not run.begin("prepare", {**settings_of(args), "input_digest": digest}, stage.overwrite):
        return run.path("prepare")
    out, start = run.path("prepare"), time.time()
    logger.info("prepare: reading %s (%s)%s", reviews, fmt, f" with titles from {meta}" if meta else "")
    skips, notes = SkipLog(), Counter()
    fingerprint = hashlib.sha256((digest + json.dumps(settings_of(args), sort_keys=True)).encode()).hexdigest()[:16]
    if fmt != "llamarec" and args.engine != "python":
        from .prepare_sql import prepare_raw

        logger.info("prepare: engine %s", args.engine)
        stats, signals = prepare_raw(fmt, reviews, meta, args, skips, notes, out, fingerprint)
    else:
        if fmt == "llamarec":
            users, items, signals = from_llamarec(reviews, notes)
        else:
            users, items, signals = from_raw(fmt, reviews, meta, args, skips, notes)
        build_datasets(users, items, fingerprint).save_to_disk(str(out))
        stats = table_stats(users, len(items["item_id"]))
    stats.update({
        "source": {"format": fmt, "reviews": str(reviews), "meta": str(meta) if meta else None},
        "signals": signals,
        "titles": args.titles,
        "min_interactions": None if fmt == "llamarec" else args.min_interactions,
        "split": "leave-one-out: last item = test, second to last = validation",
        "skipped": skips.as_dict(),
        "notes": dict(sorted(notes.items())),
        "fingerprint": fingerprint,
        "wall_time_s": round(time.time() - start, 2),
    })
    write_json(out / "stats.json", stats)
    dataset_card(args.dataset_name or reviews.parent.name, stats).save(out / "README.md")
    run.finish("prepare")
    logger.info("prepare: %d users, %d items, %d interactions -> %s (%d rows skipped)",
                stats["users"], stats["items"], stats["interactions"], out, sum(skips.counts.values()))
    return out


CARD = """---
{{ card_data }}
---
# {{ name }} (prepared by ulmrec-hf)

Source: `{{ source.reviews }}` ({{ source.format }}). Amazon review data collected by McAuley et al.; use it under the
terms of its original release (research use).

## Processing
- Filtering: {{ filtering }}.
- Sequences: each user's interactions in chronological order (ties broken by item id).
- Split: {{ split }}.
- Ids: users and items are numbered from 1 in sorted order of their original ids (LlamaRec imports keep the file's numbers).

## Statistics
| users | items | interactions | avg. length | sparsity |
|---|---|---|---|---|
| {{ users }} | {{ items }} | {{ interactions }} | {{ avg_length }} | {{ sparsity }} |

Skipped rows: {{ skipped }}.

## Fields
- `users`: `user_id`, `user` (original id), `items` (chronological item ids){{ user_fields }}.
- `items`: `item_id`, `asin`, `title`.

Signals absent from this source: {{ absent }}.
"""


def dataset_card(name: str, stats: dict):
    from huggingface_hub import DatasetCard, DatasetCardData

    skipped = stats["skipped"]["counts"] or {"none": 0}
    filtering = ("as provided by the preprocessed file" if stats["min_interactions"] is None
                 else f"items without a title dropped ({stats['titles']}); iterative {stats['min_interactions']}-core on users and items")
    data = DatasetCardData(license="other", task_categories=["text-generation"], tags=["recommendation", "sequential-recommendation", "ulmrec"])
    return DatasetCard.from_template(
        data, template_str=CARD, name=name, source=stats["source"], filtering=filtering, split=stats["split"], users=stats["users"],
        items=stats["items"], interactions=stats["interactions"], avg_length=stats["avg_length"], sparsity=stats["sparsity"],
        skipped=", ".join(f"{k}: {v}" for k, v in skipped.items()),
        user_fields="".join(f", `{s}`" for s, present in stats["signals"].items() if present),
        absent=", ".join(s for s, present in stats["signals"].items() if not present) or "none")
