"""Review tables of any source (CSV/TSV, JSON Lines or Parquet files, a folder of them, or a Hub dataset) read through
`datasets.load_dataset` and turned into the review rows and titles the Amazon readers give, under their rules: a
malformed line or a bad value is counted with its file and line (Parquet: row), a missing column is an error naming it.

Local files are read one by one, so every row keeps its file; a CSV's cells are read as text, so `007` stays `007`
and `NA` is a name, as in the Amazon readers."""

import csv
import datetime
import hashlib
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .common import UlmrecError, content_digest, text_lines
from .records import SkipLog, clean_title, no_reviews

logger = logging.getLogger(__name__)

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
REQUIRED = ("user", "item")
COMMIT = re.compile(r"[0-9a-f]{40}")


def builder_of(path: Path) -> str | None:
    """The `load_dataset` builder of a file name (`.gz` looks at the suffix before it), None for other files."""
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    return BUILDERS.get(suffixes[0].lower()) if suffixes else None


@dataclass
class TableSource:
    """Where a table comes from: a local file, the table files of a local folder, or a Hub dataset pinned to a commit."""
    name: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    data_files: list[str] = field(default_factory=list)

    @property
    def on_hub(self) -> bool:
        return self.revision is not None

    @property
    def is_file(self) -> bool:
        return Path(self.name).is_file()

    def files(self) -> list[Path]:
        path = Path(self.name)
        if path.is_file():
            return [path]
        return sorted(p for p in path.rglob("*") if p.is_file() and builder_of(p)
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))

    def digest(self) -> str:
        """Local: each file's name (its suffix picks the parser) and content; Hub: the commit, config and files read."""
        if self.on_hub:
            return f"hub:{self.name}@{self.revision}:{self.config}:{self.split}:{','.join(self.data_files)}"
        h = hashlib.sha256()
        for p in self.files():
            h.update(json.dumps([p.name if self.is_file else p.relative_to(self.name).as_posix(), content_digest(p)]).encode())
        return h.hexdigest()


def resolve(name: str, config: str | None, split: str, revision: str | None, data_files: list[str] | None = None) -> TableSource:
    """A local file or folder as it is; an `owner/name` that is not a path is a Hub dataset, pinned to the commit its
    `revision` (branch, tag or commit; default main) names."""
    path = Path(name)
    if path.exists():
        source = TableSource(name, config, split)
        if not source.files():
            raise UlmrecError(f"{name}: no table files in this folder (expected {', '.join(sorted(BUILDERS))}, optionally .gz)")
        return source
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or builder_of(path):
        raise UlmrecError(f"{name}: no such file or folder (and not a Hub dataset id of the form owner/name)")
    if revision is None or not COMMIT.fullmatch(revision):
        from huggingface_hub import HfApi

        try:
            revision = HfApi().dataset_info(name, revision=revision).sha
        except Exception as e:  # noqa: BLE001 - offline, gated or missing: say which table could not be reached
            raise UlmrecError(f"{name}: cannot reach this Hub dataset ({type(e).__name__}: {e}); "
                              "pass a full commit id as the revision to read it from the local cache") from None
    return TableSource(name, config, split, revision, list(data_files or []))


def parts(source: TableSource, scratch: Path):
    """(label, datasets.Dataset, line numbers or None, malformed lines) of each part of a source: one per local file,
    one for the Hub."""
    import datasets

    if source.on_hub:
        try:
            table = datasets.load_dataset(source.name, name=source.config, split=source.split, revision=source.revision,
                                          data_files=source.data_files or None)
        except Exception as e:  # noqa: BLE001 - name the dataset; the reader's message says the rest
            raise UlmrecError(f"{source.name}@{source.revision}: cannot be read as a table ({type(e).__name__}: {e})") from None
        yield source.name, table, None, []
        return
    for path in source.files():
        yield (str(path), *load_file(path, scratch))


def load_file(path: Path, scratch: Path):
    """One local file as a Dataset, the line each row starts on (None for Parquet and JSON documents) and its malformed
    lines as (reason, `file:line`); those are left out of a clean copy, which is read instead."""
    import datasets

    builder = builder_of(path)
    options, lines, bad, clean = {}, None, [], path
    if builder == "csv":
        options, lines, bad = csv_options(path)
    elif builder == "json" and not is_json_document(path):
        lines, bad = json_lines(path)
    if bad:
        clean = scratch / f"clean-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}{'.csv' if builder == 'csv' else '.jsonl'}"
        write_clean(path, clean, set(bad), options.get("sep"))
    malformed = [("malformed_row" if builder == "csv" else "malformed_line", f"{path}:{n}") for n in bad]
    try:
        table = datasets.load_dataset(builder, data_files=str(clean), split="train", cache_dir=str(scratch), **options)
    except Exception as e:  # noqa: BLE001 - the reader's own message names the line; say which file it was
        cause = e.__cause__ or e
        raise UlmrecError(f"{path}: cannot be read as a table ({type(cause).__name__}: {str(cause).strip()})") from None
    return table, lines, malformed


def csv_options(path: Path) -> tuple[dict, list[int], list[int]]:
    """Every column as text, empty cells as empty strings, a tab for .tsv, a byte-order mark dropped. A record whose
    field count differs from the header's is malformed. Returns the options and the start lines of good and bad records."""
    import datasets

    sep = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
    reader = csv.reader((line for _, line in text_lines(path)), delimiter=sep)
    header = next(reader, None)
    if not header:
        raise UlmrecError(f"{path}:1: empty file, expected a header row")
    header[0] = header[0].lstrip("\ufeff")
    lines, bad, start = [], [], reader.line_num + 1
    for record in reader:
        if record:
            (lines if len(record) == len(header) else bad).append(start)
        start = reader.line_num + 1
    features = datasets.Features({name: datasets.Value("string") for name in header})
    options = {"sep": sep, "features": features, "keep_default_na": False, "encoding": "utf-8-sig"}
    return options, lines, bad


def write_clean(path: Path, clean: Path, bad: set[int], sep: str | None) -> None:
    """A copy of a CSV or JSON Lines file without the records that start on the `bad` lines."""
    with open(clean, "w", newline="", encoding="utf-8") as f:
        if sep is None:
            f.writelines(line if line.endswith("\n") else line + "\n" for n, line in text_lines(path) if n not in bad and line.strip())
            return
        reader, writer = csv.reader((line for _, line in text_lines(path)), delimiter=sep), csv.writer(f, delimiter=sep)
        start = 1
        for record in reader:
            if record and start not in bad:
                writer.writerow(record)
            start = reader.line_num + 1


def is_json_document(path: Path) -> bool:
    first = next((line for _, line in text_lines(path) if line.strip()), "")
    return first.lstrip("\ufeff").lstrip().startswith("[")


def json_lines(path: Path) -> tuple[list[int], list[int]]:
    """The numbers of the lines holding a JSON object, and of the other non-blank lines (malformed)."""
    lines, bad = [], []
    for n, line in text_lines(path):
        if not line.strip():
            continue
        try:
            ok = isinstance(json.loads(line), dict)
        except json.JSONDecodeError:
            ok = False
        (lines if ok else bad).append(n)
    return lines, bad


def check_columns(table, mapping: dict[str, str | None], where: str, flags: dict[str, str] | None = None) -> None:
    """Every mapped column exists; the error names the missing one, the columns there are, and the flag to set."""
    for role, column in mapping.items():
        flag = (flags or {}).get(role, f"--{role}_column")
        if role in REQUIRED and not column:
            raise UlmrecError(f"{where}: {flag} is required")
        if column and column not in table.column_names:
            raise UlmrecError(f"{where}: no column {column!r} for the {role} (columns: {', '.join(table.column_names)}); "
                              f"name it with {flag}" + ("" if role in REQUIRED else f", or pass {flag} '' if the table has none"))


def blank(value) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def as_id(value) -> str:
    """An id as text; a whole float (an integer column with a gap, as pandas writes it) loses its `.0`."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def as_seconds(value, unit: str) -> int:
    """An integer time in `unit` (s or ms), or an ISO-8601 date or time (UTC when no zone is given), as Unix seconds."""
    if isinstance(value, (datetime.datetime, datetime.date)):
        moment = value if isinstance(value, datetime.datetime) else datetime.datetime.combine(value, datetime.time())
    else:
        text = str(value).strip()
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = None
        if number is not None:
            if not math.isfinite(number):
                raise ValueError(text)
            return int(number // 1000 if unit == "ms" else number)
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp())


def as_rating(value) -> float:
    rating = float(value)
    if not math.isfinite(rating):
        raise ValueError(value)
    return rating


def place(label: str, lines: list[int] | None, n: int) -> str:
    """Where the n-th row (from 0) of a part sits: `file:line`, or `file row N` where there are no lines."""
    return f"{label}:{lines[n]}" if lines is not None else f"{label} row {n + 1}"


def review_rows(table, label: str, lines: list[int] | None, mapping: dict[str, str | None], unit: str, skips: SkipLog,
                notes: Counter, start: int):
    """Yield review rows (the Amazon readers' shape) of one part; a bad row is counted as `file:line` (or `file row N`)."""
    from tqdm.auto import tqdm

    columns = {role: col for role, col in mapping.items() if col}
    n = 0
    with tqdm(total=len(table), desc=f"reading {Path(label).name}", unit="row") as bar:
        for batch in table.select_columns(sorted(set(columns.values()))).iter(batch_size=10_000):
            size = len(batch[next(iter(columns.values()))])
            for values in zip(*(batch[col] for col in columns.values())):
                row = review_row(dict(zip(columns, values)), place(label, lines, n), unit, skips, notes, start + n)
                n += 1
                if row is not None:
                    yield row
            bar.update(size)


def review_row(rec: dict, where: str, unit: str, skips: SkipLog, notes: Counter, order: int) -> dict | None:
    for role in REQUIRED:
        if blank(rec[role]):
            skips.add(f"missing_field:{role}", where)
            return None
    row = {"user": as_id(rec["user"]), "item": as_id(rec["item"]), "rating": None, "timestamp": None, "order": order}
    for role, parse in (("timestamp", lambda v: as_seconds(v, unit)), ("rating", as_rating)):
        if role in rec and not blank(rec[role]):
            try:
                row[role] = parse(rec[role])
            except (TypeError, ValueError, OverflowError):
                skips.add(f"bad_field:{role}", where)
                return None
        elif role == "timestamp" and role in rec:
            notes["rows_without_timestamp"] += 1
    if "text" in rec and blank(rec["text"]):
        notes["empty_review_text"] += 1
    row["review"] = "" if blank(rec.get("text")) else str(rec["text"])
    row["summary"] = "" if blank(rec.get("summary")) else str(rec["summary"])
    if "title" in rec:
        row["title"] = rec["title"]
    return row


def read_reviews(source: TableSource, mapping: dict, unit: str, skips: SkipLog, notes: Counter, scratch: Path):
    """The review rows of every part, and the titles of a title column (the first kept row of an item gives it;
    None without one)."""
    rows, start = [], 0
    for label, table, lines, malformed in parts(source, scratch):
        for reason, where in malformed:
            skips.add(reason, where)
        check_columns(table, mapping, label)
        rows.extend(review_rows(table, label, lines, mapping, unit, skips, notes, start))
        start += len(table)
    if not rows:
        raise no_reviews(Path(source.name), skips)
    if not mapping.get("title"):
        return rows, None
    titles = {}
    for r in rows:
        title = r.pop("title")
        if r["item"] not in titles:
            titles[r["item"]] = clean_title(title)
    return rows, titles


def read_titles(source: TableSource, item: str, title: str, wanted: set[str], skips: SkipLog, scratch: Path,
                flags: dict[str, str]) -> dict[str, str | None]:
    """The first row's title of each wanted item, cleaned as the Amazon readers clean it; a row without an item id is
    counted."""
    titles = {}
    for label, table, lines, malformed in parts(source, scratch):
        for reason, where in malformed:
            skips.add(reason, where)
        check_columns(table, {"item": item, "title": title}, label, flags)
        n = 0
        for batch in table.select_columns(list(dict.fromkeys([item, title]))).iter(batch_size=10_000):
            for key, value in zip(batch[item], batch[title]):
                if blank(key):
                    skips.add("meta_missing_field:item", place(label, lines, n))
                elif (key := as_id(key)) in wanted and key not in titles:
                    titles[key] = clean_title(value)
                n += 1
    return titles
