"""`prepare` of raw review files as a relational plan, on DuckDB (embedded, out of core) or Spark (local or a cluster).

The plan is the Python reader's, step for step: lines -> parsed rows -> the first title of each item -> the title
filter -> a user's earliest review of an item -> the k-core to a fixed point -> ids from sorted original ids -> each
user's rows by (time, item) -> the users dataset, written batch by batch. The SQL reads the common row shape (string
ids, numeric rating and time, string texts); any other line (malformed JSON, a missing or odd field, a title with an
HTML entity) goes through the Python reader's own functions, so skips, notes and values are the same, with file:line.
"""

import gzip
import json
import logging
import shutil
import tempfile
import zlib
from collections import Counter
from pathlib import Path

from .common import UlmrecError, text_lines
from .records import (
    FIELDS,
    META_ITEM,
    SIGNALS,
    clean_title,
    count_stats,
    meta_record,
    no_reviews,
    review_from_line,
)

logger = logging.getLogger(__name__)

# Python's whitespace (str.isspace, re's \s), as a character class that RE2 and Java regexes both read.
WS = r"[\x{9}-\x{d}\x{1c}-\x{20}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]"
BLANK = rf"\A{WS}*\z"
CHUNK_BYTES = 64 << 20
BATCH_ROWS = 50_000
SHARD_BYTES = 500 << 20  # datasets' save_to_disk default
REVIEW_COLUMNS = (("n", "BIGINT"), ("usr", "STRING"), ("item", "STRING"), ("rating", "DOUBLE"), ("ts", "BIGINT"),
                  ("review", "STRING"), ("summary", "STRING"))
META_COLUMNS = (("n", "BIGINT"), ("asin", "STRING"), ("title", "STRING"))


def prepare_raw(fmt: str, reviews: Path, meta: Path | None, args, skips, notes: Counter, out: Path, fingerprint: str):
    """Run the plan on `args.engine` and write `out`; returns (the stats counts, signals)."""
    tmp = Path(tempfile.mkdtemp(prefix="ulmrec-prepare-", dir=args.temp_directory))
    engine = (DuckDBEngine if args.engine == "duckdb" else SparkEngine)(args, tmp)
    try:
        read_reviews(engine, fmt, reviews, skips, notes)
        if meta is None and args.titles == "required":
            raise UlmrecError(f"{reviews}: no meta_*.json(l)(.gz) file next to it, and titles are required "
                              "(pass --meta_file, or --titles optional for review-only work)")
        read_titles(engine, fmt, meta, skips, notes)
        core(engine, reviews, args, notes)
        signals = dict(zip(SIGNALS, engine.value(SIGNALS_SQL)))
        stats = count_stats(*engine.value("SELECT (SELECT count(*) FROM user_ids), (SELECT count(*) FROM item_ids), "
                                          "(SELECT count(*) FROM kept)"))
        items = engine.arrow(ITEMS_SQL)
        write_dataset(out, engine.batches(flat_sql(signals)), items, signals, fingerprint)
        return stats, signals
    finally:
        engine.close()
        shutil.rmtree(tmp, ignore_errors=True)


def read_reviews(engine, fmt: str, path: Path, skips, notes: Counter) -> None:
    """`reviews(n, usr, item, rating, ts, review, summary)`: n is the line number, the Python reader's order."""
    engine.lines("review_lines", path)
    engine.table("parsed", engine.parse_reviews_sql("review_lines", fmt))
    engine.check_utf8("parsed", path)
    odd = engine.iterate("SELECT n, line FROM parsed WHERE NOT ok ORDER BY n")
    engine.load("fixed", REVIEW_COLUMNS, odd_reviews(odd, fmt, path, skips, notes))
    engine.view("reviews", "SELECT n, usr, item, rating, ts, review, summary FROM parsed WHERE ok "
                            "UNION ALL SELECT n, usr, item, rating, ts, review, summary FROM fixed")
    empty = engine.value("SELECT sum(CASE WHEN empty_text THEN 1 ELSE 0 END) FROM parsed")[0]
    if empty:
        notes["empty_review_text"] += empty
    if not engine.value("SELECT count(*) FROM reviews")[0]:
        raise no_reviews(path, skips)


def odd_reviews(rows, fmt: str, path: Path, skips, notes: Counter):
    for n, line in rows:
        if line.strip():
            row = review_from_line(line, fmt, f"{path}:{n}", skips, notes)
            if row is not None:
                summary = row["summary"] if isinstance(row["summary"], str) else str(row["summary"])  # the Python reader fails on it
                yield (n, row["user"], row["item"], row["rating"], row["timestamp"], row["review"], summary)


def read_titles(engine, fmt: str, path: Path | None, skips, notes: Counter) -> None:
    """Table `titles(asin, title)`: the cleaned title of each item's first meta line."""
    if path is None:
        engine.load("meta_fixed", META_COLUMNS, ())
        engine.table("titles", "SELECT asin, title FROM meta_fixed")
        return
    engine.lines("meta_lines", path)
    engine.table("meta_parsed", engine.parse_meta_sql("meta_lines", fmt))
    engine.check_utf8("meta_parsed", path)
    odd = engine.iterate("SELECT n, line FROM meta_parsed WHERE NOT ok ORDER BY n")
    engine.load("meta_fixed", META_COLUMNS, odd_titles(odd, META_ITEM[fmt], path, skips, notes))
    engine.table("titles", """
        SELECT asin, title FROM (
            SELECT asin, title, row_number() OVER (PARTITION BY asin ORDER BY n) AS r
            FROM (SELECT n, asin, title FROM meta_parsed WHERE ok UNION ALL SELECT n, asin, title FROM meta_fixed) m) t
        WHERE r = 1""")


def odd_titles(rows, key: str, path: Path, skips, notes: Counter):
    for n, line in rows:
        if line.strip():
            rec = meta_record(line, key, f"{path}:{n}", skips, notes)
            if rec is not None and isinstance(rec[key], str):
                yield (n, rec[key], clean_title(rec.get("title")))


def core(engine, path: Path, args, notes: Counter) -> None:
    """Tables `kept(n, usr, item)`, `user_ids` and `item_ids`: the title filter, one review per user and item, the
    iterative k-core, and ids numbered from 1 in sorted order of the original ids."""
    before = engine.value("SELECT count(*) FROM reviews")[0]
    source = "reviews"
    if args.titles == "required":
        engine.table("titled", "SELECT r.n, r.usr, r.item, r.ts FROM reviews r JOIN titles t ON r.item = t.asin "
                               "WHERE t.title IS NOT NULL")
        source = "titled"
        notes["interactions_without_title"] = before - engine.value("SELECT count(*) FROM titled")[0]
    engine.table("kept", f"""
        SELECT n, usr, item FROM (
            SELECT n, usr, item, row_number() OVER (PARTITION BY usr, item ORDER BY COALESCE(ts, 0), n) AS r
            FROM {source}) d
        WHERE r = 1""")
    rows = engine.value("SELECT count(*) FROM kept")[0]
    duplicates = engine.value(f"SELECT count(*) FROM {source}")[0] - rows
    if duplicates:
        notes["duplicate_interactions"] += duplicates
    rounds, k = 0, int(args.min_interactions)
    while True:
        engine.table("kept_next", f"""
            SELECT c.n, c.usr, c.item FROM kept c
            JOIN (SELECT usr FROM kept GROUP BY usr HAVING count(*) >= {k}) u ON c.usr = u.usr
            JOIN (SELECT item FROM kept GROUP BY item HAVING count(*) >= {k}) i ON c.item = i.item""")
        engine.rename("kept_next", "kept")
        rounds += 1
        now = engine.value("SELECT count(*) FROM kept")[0]
        if now == rows:
            break
        rows = now
    notes["k_core_rounds"] = rounds
    if not rows:
        raise UlmrecError(f"{path}: no interactions left after dropping untitled items and {args.min_interactions}-core filtering")
    engine.table("user_ids", "SELECT usr, row_number() OVER (ORDER BY usr) AS user_id FROM (SELECT DISTINCT usr FROM kept) u")
    engine.table("item_ids", "SELECT item, row_number() OVER (ORDER BY item) AS item_id FROM (SELECT DISTINCT item FROM kept) i")


SIGNALS_SQL = """
    SELECT count(r.rating) > 0, count(r.ts) > 0, sum(CASE WHEN r.review <> '' THEN 1 ELSE 0 END) > 0,
           sum(CASE WHEN r.summary <> '' THEN 1 ELSE 0 END) > 0
    FROM kept k JOIN reviews r ON k.n = r.n"""
ITEMS_SQL = """
    SELECT i.item_id, i.item AS asin, t.title FROM item_ids i LEFT JOIN titles t ON i.item = t.asin ORDER BY i.item_id"""


def flat_sql(signals: dict) -> str:
    """One row per kept interaction, by user id, then (time, item) as the Python reader sorts a user's sequence."""
    extra = "".join(f", r.{col}" for signal, col in (("ratings", "rating"), ("timestamps", "ts"), ("reviews", "review"),
                                                    ("summaries", "summary")) if signals[signal])
    return f"""
        SELECT u.user_id, k.usr, i.item_id{extra}
        FROM kept k JOIN reviews r ON k.n = r.n JOIN user_ids u ON k.usr = u.usr JOIN item_ids i ON k.item = i.item
        ORDER BY u.user_id, COALESCE(r.ts, 0), i.item_id"""


# ---- the users dataset, written as its rows arrive


def user_rows(batches, signals: dict):
    """Tables of users rows (as the Python reader builds them) from flat rows sorted by user id; a user whose rows
    continue into the next batch waits for them."""
    import pyarrow as pa

    carry = None
    for batch in batches:
        table = pa.Table.from_batches([batch])
        if carry is not None:
            table = pa.concat_tables([carry, table])
        table = table.combine_chunks()
        if not table.num_rows:
            continue
        ids = table.column("user_id").to_numpy()
        last = int(ids.searchsorted(ids[-1]))  # the first row of the batch's last user
        if last:
            yield group_users(table.slice(0, last), signals)
        carry = table.slice(last)
    if carry is not None and carry.num_rows:
        yield group_users(carry, signals)


def group_users(flat, signals: dict):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    flat = flat.combine_chunks()
    ids = flat.column("user_id").to_numpy()
    starts = np.concatenate(([0], np.flatnonzero(ids[1:] != ids[:-1]) + 1))
    offsets = pa.array(np.concatenate((starts, [len(ids)])).astype(np.int32))
    take = pa.array(starts)

    def lists(name, default=None):
        values = flat.column(name).combine_chunks()
        if default is not None:
            values = pc.fill_null(values, default)
        return pa.ListArray.from_arrays(offsets, values)

    columns = {"user_id": flat.column("user_id").take(take), "user": flat.column("usr").take(take), "items": lists("item_id")}
    for signal, col, default in (("ratings", "rating", pa.scalar(0.0)), ("timestamps", "ts", pa.scalar(0, pa.int64())),
                                 ("reviews", "review", None), ("summaries", "summary", None)):
        if signals[signal]:
            columns[signal] = lists(col, default)
    return pa.table(columns)


def users_schema(signals: dict):
    import pyarrow as pa

    fields = [("user_id", pa.int64()), ("user", pa.string()), ("items", pa.list_(pa.int64()))]
    fields += [(s, pa.list_(t)) for s, t in (("ratings", pa.float64()), ("timestamps", pa.int64()),
                                             ("reviews", pa.string()), ("summaries", pa.string())) if signals[s]]
    return pa.schema(fields)


def write_dataset(out: Path, batches, items, signals: dict, fingerprint: str) -> None:
    """The same DatasetDict folder as `save_to_disk` of the Python reader's tables; the users split is written in
    shards of at most 500 MB as its rows arrive, so memory holds one batch, not the dataset."""
    import datasets
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    schema = users_schema(signals)
    datasets.DatasetDict({
        "users": datasets.Dataset(schema.empty_table(), fingerprint=f"{fingerprint}-users"),
        "items": datasets.Dataset(items.cast(pa.schema([("item_id", pa.int64()), ("asin", pa.string()), ("title", pa.string())])),
                                  fingerprint=f"{fingerprint}-items"),
    }).save_to_disk(str(out))
    users_dir = out / "users"
    for old in users_dir.glob("data-*.arrow"):
        old.unlink()
    features = datasets.Features.from_arrow_schema(schema)
    shards, writer, size = [], None, 0
    for table in user_rows(batches, signals):
        if writer is None or size >= SHARD_BYTES:
            if writer is not None:
                writer.finalize()
            shards.append(users_dir / f"shard-{len(shards)}.tmp")
            writer, size = ArrowWriter(features=features, path=str(shards[-1])), 0
        table = table.cast(schema)
        writer.write_table(table)
        size += table.nbytes
    if writer is None:
        shards.append(users_dir / "shard-0.tmp")
        writer = ArrowWriter(features=features, path=str(shards[-1]))
    writer.finalize()
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for shard, name in zip(shards, names):
        shard.rename(users_dir / name)
    state = json.loads((users_dir / "state.json").read_text())
    state["_data_files"] = [{"filename": name} for name in names]
    (users_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


# ---- reading lines


def line_batches(path: Path, chunk: int = CHUNK_BYTES):
    """Arrow batches of (n, line) of a text file, gzip or not, n from 1. Python only inflates, cuts at newlines and
    checks UTF-8; each chunk's lines share one buffer. A bad byte or a corrupt gzip raises the Python reader's error."""
    n, rest = 0, b""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            while block := f.read(chunk):
                data = rest + block
                cut = data.rfind(b"\n") + 1
                rest = data[cut:]
                if cut:
                    batch = lines_batch(path, data[:cut], n)
                    n += batch.num_rows
                    yield batch
        if rest:
            yield lines_batch(path, rest, n)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError):
        for _ in text_lines(path):  # raises the reference reader's error, with the line it stopped after
            pass
        raise UlmrecError(f"{path}: corrupt or truncated file") from None


def lines_batch(path: Path, data: bytes, first: int):
    import numpy as np
    import pyarrow as pa

    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 10) + 1
    if not data.endswith(b"\n"):
        ends = np.append(ends, len(data))
    offsets = np.concatenate(([0], ends)).astype(np.int32)
    lines = pa.StringArray.from_buffers(len(ends), pa.py_buffer(offsets), pa.py_buffer(data))
    try:
        lines.validate(full=True)
    except pa.ArrowInvalid:
        raise_bad_utf8(path, data, first)
    return pa.RecordBatch.from_arrays([pa.array(np.arange(first + 1, first + 1 + len(ends))), lines], names=["n", "line"])


def raise_bad_utf8(path: Path, data: bytes, first: int):
    """The Python reader's message for the first line of `data` that is not UTF-8."""
    start = 0
    for number, line in enumerate(data.splitlines(keepends=True), first + 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UlmrecError(f"{path}:{number}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
        start += len(line)
    raise UlmrecError(f"{path}: not UTF-8 text")


# ---- engines: the same plan, each engine's own parsing of a JSON line


def review_fields(fmt: str) -> list[str]:
    f = FIELDS[fmt]
    return [f["user"], f["item"], f["rating"], f["time"], f["text"], f["summary"]]


def sql_quote(sql_value: str) -> str:
    return sql_value.replace("'", "''")


class DuckDBEngine:
    """DuckDB on a database file in the temp folder, with a memory limit it spills beyond."""

    def __init__(self, args, tmp: Path):
        import duckdb

        self.con = duckdb.connect(str(tmp / "prepare.duckdb"))
        self.con.execute(f"SET memory_limit = '{sql_quote(args.memory_limit)}'")
        self.con.execute(f"SET temp_directory = '{sql_quote(str(tmp / 'spill'))}'")
        self.con.execute("SET preserve_insertion_order = false")
        self.error = None

    def lines(self, name: str, path: Path) -> None:
        import pyarrow as pa

        schema = pa.schema([("n", pa.int64()), ("line", pa.string())])
        self.con.register(name, pa.RecordBatchReader.from_batches(schema, self.keep_error(line_batches(path))))

    def keep_error(self, batches):
        """DuckDB reports an error raised inside a stream as its own; keep ours to raise it as it was."""
        try:
            yield from batches
        except UlmrecError as e:
            self.error = e
            raise

    def check_utf8(self, table: str, path: Path) -> None:
        """Done while reading (`line_batches`)."""

    def table(self, name: str, sql: str) -> None:
        import duckdb

        try:
            self.con.execute(f"CREATE OR REPLACE TABLE {name} AS {sql}")
        except duckdb.Error:
            if self.error is not None:
                raise self.error from None
            raise

    def view(self, name: str, sql: str) -> None:
        self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")

    def rename(self, old: str, new: str) -> None:
        self.con.execute(f"DROP TABLE IF EXISTS {new}")
        self.con.execute(f"ALTER TABLE {old} RENAME TO {new}")

    def value(self, sql: str) -> tuple:
        return self.con.execute(sql).fetchall()[0]

    def iterate(self, sql: str):
        cursor = self.con.cursor()
        result = cursor.execute(sql)
        while rows := result.fetchmany(10_000):
            yield from rows
        cursor.close()

    def load(self, name: str, columns, rows) -> None:
        """A table from Python tuples, inserted in Arrow batches."""
        import pyarrow as pa

        self.con.execute(f"CREATE OR REPLACE TABLE {name} ({', '.join(f'{c} {t}' for c, t in columns)})")
        schema = pa.schema([(c, {"BIGINT": pa.int64(), "DOUBLE": pa.float64(), "STRING": pa.string()}[t]) for c, t in columns])
        batch = []
        for row in rows:
            batch.append(row)
            if len(batch) == BATCH_ROWS:
                self.insert(name, batch, schema)
                batch = []
        if batch:
            self.insert(name, batch, schema)

    def insert(self, name: str, rows: list, schema) -> None:
        import pyarrow as pa

        self.con.register("rows_batch", pa.Table.from_pylist([dict(zip(schema.names, r)) for r in rows], schema=schema))
        self.con.execute(f"INSERT INTO {name} SELECT * FROM rows_batch")
        self.con.unregister("rows_batch")

    def arrow(self, sql: str):
        return self.con.sql(sql).to_arrow_table()

    def batches(self, sql: str):
        yield from self.con.sql(sql).to_arrow_reader(BATCH_ROWS)

    def close(self) -> None:
        self.con.close()

    def parse_reviews_sql(self, lines: str, fmt: str) -> str:
        user, item, rating, time, text, summary = review_fields(fmt)
        keys = [user, item, rating, time, text, summary]
        min_time = 0 if fmt == "amazon2023" else -(2 ** 63)
        ts = "CAST(json_extract_string(v[4], '$') AS BIGINT)" + (" // 1000" if fmt == "amazon2023" else "")
        return f"""
        SELECT n, ok,
               CASE WHEN ok THEN json_extract_string(v[1], '$') END AS usr,
               CASE WHEN ok THEN json_extract_string(v[2], '$') END AS item,
               CASE WHEN ok THEN CAST(json_extract_string(v[3], '$') AS DOUBLE) END AS rating,
               CASE WHEN ok THEN {ts} END AS ts,
               CASE WHEN ok AND NOT empty_text THEN text ELSE '' END AS review,
               CASE WHEN ok THEN coalesce(json_extract_string(v[6], '$'), '') END AS summary,
               ok AND empty_text AS empty_text,
               CASE WHEN ok THEN NULL ELSE line END AS line
        FROM (
            SELECT *, json_extract_string(v[5], '$') AS text,
                   coalesce(json_extract_string(v[5], '$') IS NULL OR regexp_matches(json_extract_string(v[5], '$'), '{BLANK}'), true) AS empty_text,
                   coalesce(v IS NOT NULL
                       AND json_type(v[1]) = 'VARCHAR' AND json_extract_string(v[1], '$') <> ''
                       AND json_type(v[2]) = 'VARCHAR' AND json_extract_string(v[2], '$') <> ''
                       AND coalesce(json_type(v[3]), 'NULL') IN ('NULL', 'UBIGINT', 'BIGINT', 'DOUBLE')
                       AND (coalesce(json_type(v[4]), 'NULL') = 'NULL' OR (json_type(v[4]) IN ('UBIGINT', 'BIGINT')
                            AND TRY_CAST(json_extract_string(v[4], '$') AS BIGINT) >= {min_time}))
                       AND coalesce(json_type(v[5]), 'NULL') IN ('NULL', 'VARCHAR')
                       AND coalesce(json_type(v[6]), 'NULL') IN ('NULL', 'VARCHAR'), false) AS ok
            FROM ({self.json_sql(lines, keys)}) j) p"""

    def parse_meta_sql(self, lines: str, fmt: str) -> str:
        key = META_ITEM[fmt]
        return f"""
        SELECT n, ok, CASE WHEN ok THEN json_extract_string(v[1], '$') END AS asin,
               CASE WHEN ok AND json_type(v[2]) = 'VARCHAR' THEN
                   nullif(regexp_replace(regexp_replace(json_extract_string(v[2], '$'), '{WS}+', ' ', 'g'), '\\A | \\z', '', 'g'), '')
               END AS title,
               CASE WHEN ok THEN NULL ELSE line END AS line
        FROM (
            SELECT *, coalesce(v IS NOT NULL AND json_type(v[1]) = 'VARCHAR' AND json_extract_string(v[1], '$') <> ''
                               AND NOT (json_type(v[2]) = 'VARCHAR' AND contains(json_extract_string(v[2], '$'), '&')), false) AS ok
            FROM ({self.json_sql(lines, [key, 'title'])}) j) p"""

    @staticmethod
    def json_sql(lines: str, keys: list[str]) -> str:
        """(n, line, v): v lists the keys' JSON values when the line is JSON that Python's json module reads the same
        way (DuckDB also takes trailing commas, and the first of repeated keys)."""
        paths = ", ".join(f"'$.{k}'" for k in keys)
        names = "|".join(keys)
        return f"""
            SELECT n, line, CASE WHEN json_valid(line) AND NOT regexp_matches(line, ',\\s*[}}\\]]')
                                 AND len(list_distinct(regexp_extract_all(line, '"({names})"\\s*:', 1)))
                                     = len(regexp_extract_all(line, '"({names})"\\s*:', 1))
                            THEN json_extract(line, [{paths}]) END AS v
            FROM {lines}"""


class SparkEngine:
    """pyspark: local mode by default, or the cluster at `spark_master`."""

    def __init__(self, args, tmp: Path):
        from pyspark.sql import SparkSession

        self.tmp, self.frames, self.cached = tmp, {}, []
        builder = SparkSession.builder.master(args.spark_master).appName("ulmrec-prepare")
        builder = builder.config("spark.ui.enabled", "false")
        if args.temp_directory:
            builder = builder.config("spark.local.dir", args.temp_directory)
        if args.spark_master.startswith("local"):
            builder = builder.config("spark.driver.memory", args.memory_limit.lower().replace("gb", "g").replace("mb", "m"))
        self.spark = builder.getOrCreate()
        self.spark.sparkContext.setLogLevel("ERROR")

    def lines(self, name: str, path: Path) -> None:
        """(n, line) with n from 1: Spark reads blocks in parallel, so n = the lines of earlier blocks + the row's
        place in its block (monotonically_increasing_id counts within a partition)."""
        from pyspark import StorageLevel
        from pyspark.sql import functions as F

        try:
            raw = (self.spark.read.option("lineSep", "\n").text(str(path))
                   .select(F.col("value").alias("line"), F.col("_metadata.file_block_start").alias("blk"),
                           F.monotonically_increasing_id().alias("mid"))
                   .persist(StorageLevel.DISK_ONLY))
            self.cached.append(raw)
            blocks = raw.groupBy("blk").agg(F.min("mid").alias("first"), F.count(F.lit(1)).alias("rows")).orderBy("blk").collect()
        except Exception as e:
            reason = next((line.strip() for line in str(e).splitlines() if "Exception:" in line), "")
            if any(k in reason for k in ("EOFException", "ZipException", "end of input", "gzip")):
                raise UlmrecError(f"{path}: corrupt or truncated file ({reason[:300]})") from None
            raise
        before, offsets = 0, []
        for b in blocks:
            offsets.append((b["blk"], b["first"], before))
            before += b["rows"]
        offsets = self.spark.createDataFrame(offsets, "blk long, first long, before long")
        lines = raw.join(F.broadcast(offsets), "blk").select((F.col("mid") - F.col("first") + F.col("before") + 1).alias("n"), "line")
        self.register(name, lines)

    def check_utf8(self, table: str, path: Path) -> None:
        bad = self.value(f"SELECT min(n) FROM {table} WHERE NOT utf8")[0]
        if bad is not None:
            raise UlmrecError(f"{path}:{bad}: not UTF-8 text")

    def register(self, name: str, frame) -> None:
        self.frames[name] = frame
        frame.createOrReplaceTempView(name)

    def table(self, name: str, sql: str) -> None:
        self.register(name, self.spark.sql(sql).localCheckpoint())

    def view(self, name: str, sql: str) -> None:
        self.register(name, self.spark.sql(sql))

    def rename(self, old: str, new: str) -> None:
        self.register(new, self.frames.pop(old))
        self.spark.catalog.dropTempView(old)

    def value(self, sql: str) -> tuple:
        return tuple(self.spark.sql(sql).first())

    def iterate(self, sql: str):
        for row in self.spark.sql(sql).toLocalIterator():
            yield tuple(row)

    def load(self, name: str, columns, rows) -> None:
        schema = ", ".join(f"{c} {t}" for c, t in columns)
        frames, batch = [], []
        for row in rows:
            batch.append(row)
            if len(batch) == BATCH_ROWS:
                frames.append(self.spark.createDataFrame(batch, schema))
                batch = []
        frames.append(self.spark.createDataFrame(batch, schema))
        frame = frames[0]
        for other in frames[1:]:
            frame = frame.unionAll(other)
        self.register(name, frame.localCheckpoint())

    def arrow(self, sql: str):
        return self.spark.sql(sql).toArrow()

    def batches(self, sql: str):
        """The query's rows in its order, through Parquet part files (Spark writes a sorted result as ordered parts)."""
        import pyarrow.parquet as pq

        folder = self.tmp / "flat"
        self.spark.sql(sql).write.parquet(str(folder))
        for part in sorted(folder.glob("part-*.parquet")):
            yield from pq.ParquetFile(part).iter_batches(BATCH_ROWS)

    def close(self) -> None:
        for frame in [*self.frames.values(), *self.cached]:
            frame.unpersist()
        self.frames.clear()

    def parse_reviews_sql(self, lines: str, fmt: str) -> str:
        user, item, rating, time, text, summary = review_fields(fmt)
        ts = f"variant_get(v, '$.{time}', 'bigint')" + (" DIV 1000" if fmt == "amazon2023" else "")
        min_time = 0 if fmt == "amazon2023" else -(2 ** 63)
        return f"""
        SELECT n, ok, utf8,
               CASE WHEN ok THEN variant_get(v, '$.{user}', 'string') END AS usr,
               CASE WHEN ok THEN variant_get(v, '$.{item}', 'string') END AS item,
               CASE WHEN ok THEN variant_get(v, '$.{rating}', 'double') END AS rating,
               CASE WHEN ok THEN {ts} END AS ts,
               CASE WHEN ok AND NOT empty_text THEN text ELSE '' END AS review,
               CASE WHEN ok THEN coalesce(variant_get(v, '$.{summary}', 'string'), '') END AS summary,
               ok AND empty_text AS empty_text,
               CASE WHEN ok THEN NULL ELSE line END AS line
        FROM (
            SELECT *, variant_get(v, '$.{text}', 'string') AS text,
                   coalesce(variant_get(v, '$.{text}', 'string') IS NULL OR variant_get(v, '$.{text}', 'string') RLIKE r'{BLANK}', true) AS empty_text,
                   coalesce(v IS NOT NULL
                       AND {self.kind(user)} = 'STRING' AND variant_get(v, '$.{user}', 'string') <> ''
                       AND {self.kind(item)} = 'STRING' AND variant_get(v, '$.{item}', 'string') <> ''
                       AND (coalesce({self.kind(rating)}, 'VOID') IN ('VOID', 'BIGINT', 'DOUBLE') OR {self.kind(rating)} LIKE 'DECIMAL%')
                       AND (coalesce({self.kind(time)}, 'VOID') = 'VOID'
                            OR ({self.kind(time)} = 'BIGINT' AND variant_get(v, '$.{time}', 'bigint') >= {min_time}))
                       AND coalesce({self.kind(text)}, 'VOID') IN ('VOID', 'STRING')
                       AND coalesce({self.kind(summary)}, 'VOID') IN ('VOID', 'STRING'), false) AS ok
            FROM ({self.json_sql(lines)}) j) p"""

    def parse_meta_sql(self, lines: str, fmt: str) -> str:
        key = META_ITEM[fmt]
        title = "variant_get(v, '$.title', 'string')"
        return f"""
        SELECT n, ok, utf8, CASE WHEN ok THEN variant_get(v, '$.{key}', 'string') END AS asin,
               CASE WHEN ok AND {self.kind('title')} = 'STRING' THEN
                   nullif(regexp_replace(regexp_replace({title}, r'{WS}+', ' '), r'\\A | \\z', ''), '')
               END AS title,
               CASE WHEN ok THEN NULL ELSE line END AS line
        FROM (
            SELECT *, coalesce(v IS NOT NULL AND {self.kind(key)} = 'STRING' AND variant_get(v, '$.{key}', 'string') <> ''
                               AND NOT ({self.kind('title')} = 'STRING' AND contains({title}, '&')), false) AS ok
            FROM ({self.json_sql(lines)}) j) p"""

    @staticmethod
    def kind(key: str) -> str:
        return f"schema_of_variant(variant_get(v, '$.{key}'))"

    @staticmethod
    def json_sql(lines: str) -> str:
        """(n, line, utf8, v): the line is parsed inside brackets, so that text after the first value makes it invalid,
        as it does for Python's json module (Spark's parser stops after the first value); Spark refuses repeated keys."""
        return f"""
            SELECT n, line, utf8, CASE WHEN variant_get(w, '$[1]') IS NULL THEN variant_get(w, '$[0]') END AS v
            FROM (SELECT n, line, is_valid_utf8(line) AS utf8, try_parse_json(concat('[', line, ']')) AS w FROM {lines}) l"""
