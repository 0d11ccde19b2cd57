"""Data stage: Amazon review files (2014, 2018, 2023 or LlamaRec `dataset.json`), or any review table (CSV, JSON Lines,
Parquet or a Hub dataset, see `tables.py`) -> `runs/<name>/data/`.

Pipeline (paper §5.1): drop items without a usable title, iterative k-core on users and items,
chronological sequences, leave-one-out split. Ids are assigned from sorted original ids, so the
same input always gives the same ids and byte-identical datasets.
"""

import hashlib
import json
import logging
import re
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .common import StageArguments, UlmrecError, content_digest, read_text, settings_of, write_json
from .layout import RunDir
from . import tables
from .records import SIGNALS, SkipLog, clean_title, count_stats, read_reviews, read_titles

logger = logging.getLogger(__name__)

FORMATS = ("auto", "amazon2014", "amazon2018", "amazon2023", "llamarec", "table")
ENGINES = ("duckdb", "spark", "python")


@dataclass
class PrepareArguments:
    _argument_group_name = "prepare"
    _operational = ('input', 'meta_file', 'engine', 'memory_limit', 'temp_directory', 'spark_master', 'table_revision',
                    'meta_table_revision')  # fields that do not change the output (left out of the recorded settings; the input's content is)
    input: str = field(default=None, metadata={"help": "A review file, a LlamaRec dataset.json, or a folder holding them; with --input_format table, a CSV/TSV, JSON Lines or Parquet file, a folder of them, or a Hub dataset id (its content, not its path, is a setting)."})
    input_format: str = field(default="auto", metadata={"help": "Format of the input: an Amazon release, LlamaRec's dataset.json, or 'table' (any review table, columns named by the --*_column flags).", "choices": list(FORMATS)})
    meta_file: str | None = field(default=None, metadata={"help": "Item metadata file (found next to the reviews if unset); with --input_format table, an optional second table of item ids and titles (file, folder or Hub id)."})
    user_column: str = field(default="user_id", metadata={"help": "Table input: the column of user ids."})
    item_column: str = field(default="item_id", metadata={"help": "Table input: the column of item ids."})
    timestamp_column: str | None = field(default="timestamp", metadata={"help": "Table input: the column of interaction times, integers (see --timestamp_unit) or ISO-8601 dates/times (UTC unless a zone is given); '' if the table has none (then each user's rows keep the table's order)."})
    timestamp_unit: str = field(default="s", metadata={"help": "Table input: the unit of integer times.", "choices": ["s", "ms"]})
    rating_column: str | None = field(default="rating", metadata={"help": "Table input: the column of star ratings; '' if the table has none."})
    text_column: str | None = field(default="text", metadata={"help": "Table input: the column of review texts; '' if the table has none."})
    summary_column: str | None = field(default=None, metadata={"help": "Table input: the column of review headlines, if any."})
    title_column: str | None = field(default="title", metadata={"help": "Table input: the column of item titles, in the titles table when --meta_file names one, else in the review table; '' if there are no titles (with --titles optional)."})
    meta_item_column: str | None = field(default=None, metadata={"help": "Table input: the item id column of the titles table (default: --item_column)."})
    table_config: str | None = field(default=None, metadata={"help": "Table input from the Hub: the dataset's configuration (subset) name."})
    table_data_files: list[str] | None = field(default=None, metadata={"help": "Table input from the Hub: the repository's files to read (paths or globs), e.g. for a dataset whose loading script datasets no longer runs."})
    table_split: str = field(default="train", metadata={"help": "Table input from the Hub: the split to read (a local file or folder is read whole, every file)."})
    table_revision: str | None = field(default=None, metadata={"help": "Table input from the Hub: branch, tag or commit (default main); it is resolved to a commit, which is recorded. A full commit id reads from the local cache without asking the Hub."})
    meta_table_config: str | None = field(default=None, metadata={"help": "Titles table from the Hub: its configuration name (default: --table_config)."})
    meta_table_data_files: list[str] | None = field(default=None, metadata={"help": "Titles table from the Hub: the repository's files to read."})
    meta_table_revision: str | None = field(default=None, metadata={"help": "Titles table from the Hub: branch, tag or commit (default: --table_revision)."})
    titles: str = field(default="required", metadata={"help": "'required' drops items without a title; 'optional' keeps them (review-only work).", "choices": ["required", "optional"]})
    min_interactions: int = field(default=5, metadata={"help": "k of the iterative k-core filter on users and items."})
    dataset_name: str | None = field(default=None, metadata={"help": "Name used in the dataset card (default: from the file name)."})
    engine: str = field(default="duckdb", metadata={"help": "Engine for raw review files: 'duckdb' (embedded, out of core), 'spark' (pyspark, local or a cluster) or 'python' (the reference reader, all rows in memory). All give the same datasets; a LlamaRec dataset.json is always read in Python.", "choices": list(ENGINES)})
    memory_limit: str = field(default="2GB", metadata={"help": "DuckDB's memory limit (it spills to temp_directory beyond it); the driver memory of a local Spark."})
    temp_directory: str | None = field(default=None, metadata={"help": "Folder for spilled and intermediate data (default: the system's temp folder); for a Spark cluster, a path the driver and executors share."})
    spark_master: str = field(default="local[*]", metadata={"help": "Spark master URL for --engine spark, e.g. spark://host:7077 or yarn."})


ARGUMENTS = (StageArguments, PrepareArguments)
TABLE_FIELDS = tuple(f for f in PrepareArguments.__dataclass_fields__ if f.endswith(("_column", "_config", "_data_files", "_split", "_unit")))


def prepare_settings(args: PrepareArguments) -> dict:
    """The recorded settings: the table fields only for table input, so they never make an Amazon run look changed."""
    settings = settings_of(args)
    if args.input_format != "table":
        settings = {k: v for k, v in settings.items() if k not in TABLE_FIELDS}
    return settings


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


def detect_input(args: PrepareArguments):
    """(format, reviews, meta): Amazon/LlamaRec files as paths, tables as `tables.TableSource`."""
    if args.input_format != "table":
        return detect(Path(args.input), args.input_format, args.meta_file)
    reviews = tables.resolve(args.input, args.table_config, args.table_split, args.table_revision, args.table_data_files)
    meta = args.meta_file and tables.resolve(args.meta_file, args.meta_table_config or args.table_config, args.table_split,
                                             args.meta_table_revision or args.table_revision, args.meta_table_data_files)
    return "table", reviews, meta or None


def input_digest(fmt: str, reviews, meta) -> str:
    if fmt != "table":
        return content_digest(reviews, meta)
    return hashlib.sha256("\n".join(s.digest() for s in (reviews, meta) if s is not None).encode()).hexdigest()


def from_raw(fmt: str, reviews: Path, meta: Path | None, args: PrepareArguments, skips: SkipLog, notes: Counter):
    rows = read_reviews(reviews, fmt, skips, notes)
    if meta is None:
        no_titles(args, f"{reviews}: no meta_*.json(l)(.gz) file next to it")
        titles = {}
    else:
        titles = read_titles(meta, fmt, {r["item"] for r in rows}, skips, notes)
    return sequences(rows, titles, args, notes, reviews)


def no_titles(args: PrepareArguments, why: str) -> None:
    if args.titles == "required":
        raise UlmrecError(f"{why}, and titles are required (pass --meta_file, or --titles optional for review-only work)")


def from_table(reviews, meta, args: PrepareArguments, skips: SkipLog, notes: Counter, scratch: Path):
    """Any review table, read through `datasets.load_dataset`, under the Amazon readers' rules."""
    mapping = table_columns(args, with_title=meta is None)
    rows, titles = tables.read_reviews(reviews, mapping, args.timestamp_unit, skips, notes, scratch)
    if meta is not None and not args.title_column:
        raise UlmrecError(f"{meta.name}: a titles table needs --title_column")
    if meta is not None:
        titles = tables.read_titles(meta, args.meta_item_column or args.item_column, args.title_column,
                                    {r["item"] for r in rows}, skips, scratch, {"item": "--meta_item_column"})
    elif titles is None:
        no_titles(args, f"{reviews.name}: no title column (--title_column '') and no titles table")
        titles = {}
    return sequences(rows, titles, args, notes, reviews.name, keep_order=not args.timestamp_column)


def table_columns(args: PrepareArguments, with_title: bool) -> dict[str, str | None]:
    """Role -> column of the review table ('' or None: the table has no such column)."""
    roles = {"user": args.user_column, "item": args.item_column, "timestamp": args.timestamp_column, "rating": args.rating_column,
             "text": args.text_column, "summary": args.summary_column, "title": args.title_column if with_title else None}
    return {role: column or None for role, column in roles.items()}


def sequences(rows: list[dict], titles: dict, args: PrepareArguments, notes: Counter, source, keep_order: bool = False):
    """Untitled items dropped, repeats removed, k-core, ids from sorted original ids, chronological sequences (in the
    input's order when it has no times: `keep_order`)."""
    if args.titles == "required":
        before = len(rows)
        rows = [r for r in rows if titles.get(r["item"])]
        notes["interactions_without_title"] = before - len(rows)
    rows = dedupe(rows, notes)
    rows, rounds = k_core(rows, args.min_interactions)
    notes["k_core_rounds"] = rounds
    if not rows:
        raise UlmrecError(f"{source}: no interactions left after dropping untitled items and {args.min_interactions}-core filtering")
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
        seq = by_user[name] if keep_order else sorted(by_user[name], key=lambda r: (r["timestamp"] or 0, r["item"]))
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


def source_of(fmt: str, reviews, meta, args: PrepareArguments) -> dict:
    if fmt != "table":
        return {"format": fmt, "reviews": str(reviews), "meta": str(meta) if meta else None}
    return {"format": fmt, "reviews": table_source(reviews), "meta": table_source(meta) if meta else None,
            "columns": table_columns(args, with_title=True), "meta_item_column": args.meta_item_column or args.item_column,
            "timestamp_unit": args.timestamp_unit}


def table_source(source) -> dict:
    if source.on_hub:
        return {"hub": source.name, "revision": source.revision, "config": source.config, "split": source.split,
                "data_files": source.data_files}
    return {"path": source.name, "files": [str(p) for p in source.files()]}


def default_name(fmt: str, reviews) -> str:
    return reviews.parent.name if fmt != "table" else Path(reviews.name).stem if reviews.is_file else Path(reviews.name).name


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
        raise UlmrecError("prepare: --input is required (a review file, dataset.json, a folder, or a table with --input_format table)")
    fmt, reviews, meta = detect_input(args)
    digest = input_digest(fmt, reviews, meta)
    if not run.begin("prepare", {**prepare_settings(args), "input_digest": digest}, stage.overwrite):
        return run.path("prepare")
    out, start = run.path("prepare"), time.time()
    logger.info("prepare: reading %s (%s)%s", reviews, fmt, f" with titles from {meta}" if meta else "")
    skips, notes = SkipLog(), Counter()
    fingerprint = hashlib.sha256((digest + json.dumps(prepare_settings(args), sort_keys=True)).encode()).hexdigest()[:16]
    if fmt == "table":
        logger.info("prepare: tables are read through datasets in Python; --engine applies to Amazon files only")
        with tempfile.TemporaryDirectory(dir=args.temp_directory, prefix="ulmrec-tables-") as scratch:
            users, items, signals = from_table(reviews, meta, args, skips, notes, Path(scratch))
        build_datasets(users, items, fingerprint).save_to_disk(str(out))
        stats = table_stats(users, len(items["item_id"]))
    elif fmt != "llamarec" and args.engine != "python":
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
        "source": source_of(fmt, reviews, meta, args),
        "signals": signals,
        "titles": args.titles,
        "min_interactions": None if fmt == "llamarec" else args.min_interactions,
        "split": "leave-one-out: last item = test, second to last = validation",
        "skipped": skips.as_dict(),
        "notes": dict(sorted(notes.items())),
        "fingerprint": fingerprint,
        "wall_time_s": round(time.time() - start, 2),
    })
    write_json(run.prepare_stats_file, stats)
    dataset_card(args.dataset_name or default_name(fmt, reviews), stats).save(run.dataset_card)
    run.finish("prepare")
    logger.info("prepare: %d users, %d items, %d interactions -> %s (%d rows skipped)",
                stats["users"], stats["items"], stats["interactions"], out, sum(skips.counts.values()))
    return out


CARD = """---
{{ card_data }}
---
# {{ name }} (prepared by ulmrec-hf)

Source: `{{ source_text }}` ({{ source.format }}). {{ terms }}

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
    terms = ("A review table; use it under its owner's terms." if stats["source"]["format"] == "table" else
             "Amazon review data collected by McAuley et al.; use it under the terms of its original release (research use).")
    source = stats["source"]["reviews"]
    source_text = source if isinstance(source, str) else f"{source['hub']}@{source['revision']}" if "hub" in source else source["path"]
    return DatasetCard.from_template(
        data, template_str=CARD, name=name, terms=terms, source_text=source_text, source=stats["source"], filtering=filtering, split=stats["split"], users=stats["users"],
        items=stats["items"], interactions=stats["interactions"], avg_length=stats["avg_length"], sparsity=stats["sparsity"],
        skipped=", ".join(f"{k}: {v}" for k, v in skipped.items()),
        user_fields="".join(f", `{s}`" for s, present in stats["signals"].items() if present),
        absent=", ".join(s for s, present in stats["signals"].items() if not present) or "none")
