"""`prepare --input_format table`: CSV, JSON Lines, Parquet and folders (the Hub-id path of `load_dataset`) give the
same datasets as the equivalent Amazon 2018 files, under the same bad-input rules."""

import gzip
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import datasets
import pandas as pd
import pytest

from ulmrec_hf.common import UlmrecError, read_json
from ulmrec_hf.layout import RunDir
from ulmrec_hf.tables import as_seconds

from test_prepare import grid_reviews, review, run_prepare, write_2018, write_lines

ROOT = Path(__file__).resolve().parents[1]
AMAZON_COLUMNS = dict(user_column="reviewerID", item_column="asin", timestamp_column="unixReviewTime", rating_column="overall",
                      text_column="reviewText", summary_column="summary")


def amazon_frames(raw: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The reviews and the meta of an Amazon 2018 folder as two tables."""
    def lines(pattern):
        path = next(raw.glob(pattern))
        return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines() if line.strip()]

    reviews = pd.DataFrame(lines("*_5.json.gz"))[["reviewerID", "asin", "unixReviewTime", "overall", "reviewText", "summary"]]
    meta = pd.DataFrame(lines("meta_*.json.gz"))[["asin", "title"]]
    return reviews, meta


def same_datasets(a: datasets.DatasetDict, b: datasets.DatasetDict) -> None:
    for split in ("users", "items"):
        assert a[split].features == b[split].features, split
        assert a[split].to_list() == b[split].to_list(), split


@pytest.fixture(scope="module")
def amazon(tmp_path_factory, demo_raw):
    return run_prepare(tmp_path_factory.mktemp("amazon"), input=str(demo_raw))


def test_csv_with_a_titles_table_and_parquet_with_a_title_column_match_amazon_2018(tmp_path, demo_raw, amazon):
    reviews, meta = amazon_frames(demo_raw)
    reviews.to_csv(tmp_path / "reviews.csv", index=False)
    meta.to_csv(tmp_path / "titles.csv", index=False)
    reviews.merge(meta, on="asin", how="left").to_parquet(tmp_path / "reviews.parquet")
    reviews.to_parquet(tmp_path / "reviews_only.parquet")
    meta.to_parquet(tmp_path / "titles.parquet")
    csv_data, csv_stats = run_prepare(tmp_path / "csv", input=str(tmp_path / "reviews.csv"), input_format="table",
                                      meta_file=str(tmp_path / "titles.csv"), **AMAZON_COLUMNS)
    parquet_data, parquet_stats = run_prepare(tmp_path / "parquet", input=str(tmp_path / "reviews.parquet"), input_format="table",
                                              **AMAZON_COLUMNS)
    two_parquet, two_stats = run_prepare(tmp_path / "two", input=str(tmp_path / "reviews_only.parquet"), input_format="table",
                                         meta_file=str(tmp_path / "titles.parquet"), **AMAZON_COLUMNS)
    for data in (csv_data, parquet_data, two_parquet):
        same_datasets(data, amazon[0])
    for stats in (csv_stats, parquet_stats, two_stats):
        assert {k: stats[k] for k in ("users", "items", "interactions", "signals")} == {k: amazon[1][k] for k in ("users", "items", "interactions", "signals")}
        assert stats["notes"].get("duplicate_interactions", 0) == amazon[1]["notes"].get("duplicate_interactions", 0)
    assert csv_stats["source"]["columns"]["user"] == "reviewerID" and csv_stats["source"]["meta"]["path"] == str(tmp_path / "titles.csv")


def test_json_lines_and_a_folder_read_like_the_file(tmp_path, demo_raw, amazon):
    """A folder's files are read one by one, each like a file of its own."""
    reviews, meta = amazon_frames(demo_raw)
    folder = tmp_path / "table"
    folder.mkdir()
    reviews.merge(meta, on="asin", how="left").to_json(folder / "reviews.jsonl", orient="records", lines=True)
    jsonl, _ = run_prepare(tmp_path / "jsonl", input=str(folder / "reviews.jsonl"), input_format="table", **AMAZON_COLUMNS)
    in_folder, stats = run_prepare(tmp_path / "folder", input=str(folder), input_format="table", **AMAZON_COLUMNS)
    same_datasets(jsonl, amazon[0])
    same_datasets(in_folder, amazon[0])
    assert stats["source"]["reviews"]["files"] == [str(folder / "reviews.jsonl")]


def grid_table(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def grid_rows():
    return [{"user_id": r["reviewerID"], "item_id": r["asin"], "timestamp": r["unixReviewTime"], "rating": r["overall"],
             "text": r["reviewText"], "title": f"Item {r['asin'][1:]}"} for r in grid_reviews()]


def test_a_missing_column_is_named_with_the_columns_there_and_the_flag(tmp_path):
    table = grid_table(tmp_path / "t.csv", grid_rows())
    with pytest.raises(UlmrecError, match=r"t\.csv: no column 'stars' for the rating \(columns: user_id, item_id, timestamp, rating, text, title\); "
                                          r"name it with --rating_column, or pass --rating_column '' if the table has none"):
        run_prepare(tmp_path / "run", input=str(table), input_format="table", rating_column="stars")
    with pytest.raises(UlmrecError, match=r"t\.csv: no column 'uid' for the user .* name it with --user_column$"):
        run_prepare(tmp_path / "run2", input=str(table), input_format="table", user_column="uid")


def test_bad_values_are_counted_with_file_and_line(tmp_path):
    rows = grid_rows()
    rows.insert(2, {**rows[0], "item_id": "I9", "timestamp": "yesterday"})
    rows.insert(5, {**rows[0], "item_id": "I9", "user_id": ""})
    rows.insert(8, {**rows[0], "item_id": "I9", "rating": "five"})
    rows.insert(9, {**rows[0], "item_id": "I9", "rating": "nan"})
    table = grid_table(tmp_path / "t.csv", rows)
    data, stats = run_prepare(tmp_path / "run", input=str(table), input_format="table")
    assert stats["skipped"]["counts"] == {"bad_field:rating": 2, "bad_field:timestamp": 1, "missing_field:user": 1}
    assert stats["skipped"]["examples"] == {"bad_field:timestamp": [f"{table}:4"], "missing_field:user": [f"{table}:7"],
                                            "bad_field:rating": [f"{table}:10", f"{table}:11"]}
    assert stats["interactions"] == 36 and len(data["items"]) == 6
    parquet = tmp_path / "t.parquet"
    pd.DataFrame(rows).astype(str).to_parquet(parquet)
    _, stats = run_prepare(tmp_path / "run2", input=str(parquet), input_format="table")
    assert stats["skipped"]["examples"]["bad_field:timestamp"] == [f"{parquet} row 3"]


def test_malformed_lines_are_counted_and_left_out_like_the_amazon_reader(tmp_path):
    """An Amazon 2018 file with a broken line and a repeat, and the same rows as a CSV (a short and a long record)
    and as JSON Lines (a broken line): the same datasets, one malformed record each, the repeat counted."""
    reviews = grid_reviews() + [review("U0", "I0", 9999)]
    lines = [json.dumps(r) for r in reviews]
    lines.insert(3, '{"reviewerID": "U0", "asin": ')
    folder = write_2018(tmp_path / "raw", [])
    write_lines(folder / "Toys_5.json.gz", lines)
    amazon_data, amazon_stats = run_prepare(tmp_path / "amazon", input=str(folder))
    assert amazon_stats["skipped"]["counts"] == {"malformed_line": 1}
    frame = pd.DataFrame(reviews)[["reviewerID", "asin", "unixReviewTime", "overall", "reviewText", "summary"]]
    frame["title"] = frame["asin"].map(lambda a: f"Item {a[1:]}")
    csv_lines = frame.to_csv(index=False).splitlines()
    csv_lines.insert(3, "U0,I1")
    csv_lines.insert(6, csv_lines[6] + ",extra")
    (tmp_path / "t.csv").write_text("\n".join(csv_lines) + "\n")
    csv_data, csv_stats = run_prepare(tmp_path / "csv", input=str(tmp_path / "t.csv"), input_format="table", **AMAZON_COLUMNS)
    assert csv_stats["skipped"]["examples"] == {"malformed_row": [f"{tmp_path / 't.csv'}:4", f"{tmp_path / 't.csv'}:7"]}
    json_lines = frame.to_json(orient="records", lines=True).splitlines()
    json_lines.insert(3, '{"reviewerID": "U0", "asin": ')
    (tmp_path / "t.jsonl").write_text("\n".join(json_lines) + "\n")
    json_data, json_stats = run_prepare(tmp_path / "json", input=str(tmp_path / "t.jsonl"), input_format="table", **AMAZON_COLUMNS)
    assert json_stats["skipped"]["examples"] == {"malformed_line": [f"{tmp_path / 't.jsonl'}:4"]}
    assert csv_stats["notes"]["duplicate_interactions"] == json_stats["notes"]["duplicate_interactions"] == amazon_stats["notes"]["duplicate_interactions"] == 1
    same_datasets(csv_data, amazon_data)
    same_datasets(json_data, amazon_data)


def test_ids_stay_text_and_a_byte_order_mark_is_dropped(tmp_path):
    rows = [{**r, "user_id": {"U0": "NA", "U1": "007"}.get(r["user_id"], r["user_id"]), "item_id": "00" + r["item_id"][1:]} for r in grid_rows()]
    table = tmp_path / "t.csv"
    table.write_text("\ufeff" + pd.DataFrame(rows).to_csv(index=False), encoding="utf-8")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "t.csv").write_bytes(table.read_bytes())
    for run, source in (("run-file", table), ("run-folder", folder)):
        data, stats = run_prepare(tmp_path / run, input=str(source), input_format="table")
        assert "NA" in data["users"]["user"] and "007" in data["users"]["user"] and data["items"]["asin"][0] == "000"
        assert stats["skipped"]["counts"] == {}


def test_whole_float_ids_lose_their_fraction(tmp_path):
    rows = [{**r, "item_id": float(r["item_id"][1:])} for r in grid_rows()]
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    data, _ = run_prepare(tmp_path / "run", input=str(tmp_path / "t.parquet"), input_format="table")
    assert data["items"]["asin"] == ["0", "1", "2", "3", "4", "5"]


def test_iso_times_no_times_and_duplicates_follow_the_stated_rules(tmp_path):
    rows = grid_rows()
    _, ints = run_prepare(tmp_path / "ints", input=str(grid_table(tmp_path / "ints.csv", rows)), input_format="table")
    iso = [{**r, "timestamp": pd.Timestamp(r["timestamp"], unit="s").isoformat() + "Z"} for r in rows]
    iso_data, _ = run_prepare(tmp_path / "iso", input=str(grid_table(tmp_path / "iso.csv", iso)), input_format="table")
    int_data = datasets.load_from_disk(str(tmp_path / "ints" / "data"))
    same_datasets(iso_data, int_data)
    # a repeated user-item pair keeps the earliest and counts the repeat
    repeat = rows + [{**rows[0], "timestamp": 5000}]
    data, stats = run_prepare(tmp_path / "repeat", input=str(grid_table(tmp_path / "repeat.csv", repeat)), input_format="table")
    assert stats["notes"]["duplicate_interactions"] == 1 and data["users"].to_list() == int_data["users"].to_list()
    assert ints["notes"].get("rows_without_timestamp", 0) == 0
    # a row with an empty time is kept, counted, and sorts before the user's timed rows (time 0)
    untimed = [{**r, "timestamp": ""} if i == 7 else r for i, r in enumerate(rows)]
    data, stats = run_prepare(tmp_path / "untimed", input=str(grid_table(tmp_path / "untimed.csv", untimed)), input_format="table")
    user = data["users"][1]
    assert stats["notes"]["rows_without_timestamp"] == 1 and user["user"] == rows[7]["user_id"]
    assert user["timestamps"][0] == 0 and data["items"]["asin"][user["items"][0] - 1] == rows[7]["item_id"]


def test_untitled_items_are_dropped_and_no_titles_needs_titles_optional(tmp_path):
    rows = [{**r, "title": "" if r["item_id"] == "I0" else r["title"]} for r in grid_rows()]
    data, stats = run_prepare(tmp_path / "run", input=str(grid_table(tmp_path / "t.csv", rows)), input_format="table", min_interactions=3)
    assert "I0" not in data["items"]["asin"] and stats["notes"]["interactions_without_title"] == 6
    with pytest.raises(UlmrecError, match=r"no title column .* titles are required"):
        run_prepare(tmp_path / "run2", input=str(tmp_path / "t.csv"), input_format="table", title_column="")
    data, _ = run_prepare(tmp_path / "run3", input=str(tmp_path / "t.csv"), input_format="table", title_column="", titles="optional")
    assert data["items"]["title"] == [None] * 6


def test_a_name_that_is_neither_a_path_nor_a_hub_id_is_named(tmp_path):
    with pytest.raises(UlmrecError, match=r"no/such/file\.csv: no such file or folder \(and not a Hub dataset id"):
        run_prepare(tmp_path / "run", input="no/such/file.csv", input_format="table")


def test_timestamps():
    assert as_seconds("1406807280", "s") == as_seconds(1406807280000, "ms") == as_seconds("2014-07-31T11:48:00Z", "s") == 1406807280
    assert as_seconds("2014-07-31T13:48:00+02:00", "s") == 1406807280 and as_seconds("2014-07-31", "s") == 1406764800
    with pytest.raises(ValueError):
        as_seconds("nan", "s")


def test_the_readme_csv_example_runs(tmp_path):
    """README "Your own data": its CSV and its prepare command, as written."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Your own data")
    section = text[start:text.index("\n## ", start + 1)]
    csv_text = re.search(r"```csv\n(.*?)```", section, re.S).group(1)
    command = re.search(r"```bash\n(ulmrec prepare .*?)```", section, re.S).group(1).replace("\\\n", " ")
    assert len(csv_text.splitlines()) == 10
    (tmp_path / "reviews.csv").write_text(csv_text)
    args = shlex.split(command)[2:]
    proc = subprocess.run([sys.executable, "-m", "ulmrec_hf.cli", "prepare", *args], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = Path(tmp_path, args[args.index("--run_dir") + 1])
    stats = read_json(run_dir / "data" / "stats.json")
    assert stats["users"] == 3 and stats["items"] == 3 and stats["interactions"] == 9
    assert datasets.load_from_disk(str(run_dir / "data"))["items"]["title"][0]


def test_a_table_without_times_keeps_each_users_rows_in_table_order(tmp_path):
    rows = [r for r in grid_rows()]
    rows = sorted(rows, key=lambda r: (r["user_id"], -int(r["item_id"][1:])))  # each user's items in descending id order
    table = grid_table(tmp_path / "t.csv", rows)
    data, stats = run_prepare(tmp_path / "run", input=str(table), input_format="table", timestamp_column="")
    assert data["users"][0]["items"] == [6, 5, 4, 3, 2, 1] and not stats["signals"]["timestamps"]
    assert "rows_without_timestamp" not in stats["notes"]


def test_the_titles_tables_item_column_is_checked(tmp_path):
    table = grid_table(tmp_path / "t.csv", grid_rows())
    pd.DataFrame({"sku": [f"I{i}" for i in range(6)], "title": [f"T{i}" for i in range(6)]}).to_csv(tmp_path / "titles.csv", index=False)
    with pytest.raises(UlmrecError, match=r"titles\.csv: no column 'item_id' for the item .* name it with --meta_item_column$"):
        run_prepare(tmp_path / "run", input=str(table), input_format="table", meta_file=str(tmp_path / "titles.csv"))
    data, _ = run_prepare(tmp_path / "run", input=str(table), input_format="table", meta_file=str(tmp_path / "titles.csv"),
                          meta_item_column="sku")
    assert data["items"]["title"] == [f"T{i}" for i in range(6)]


def test_recorded_settings_content_and_mapping(tmp_path, demo_raw):
    """Column mappings are settings of table runs only; a table's identity is its content (a moved folder is the
    same input, an edited byte is not)."""
    from ulmrec_hf.prepare import PrepareArguments, prepare_settings

    assert not any(k.endswith("_column") for k in prepare_settings(PrepareArguments(input=str(demo_raw))))
    folder = tmp_path / "a"
    folder.mkdir()
    grid_table(folder / "t.csv", grid_rows())
    run = tmp_path / "run"
    run_prepare(run, input=str(folder), input_format="table")
    folder.rename(tmp_path / "b")
    run_prepare(run, input=str(tmp_path / "b"), input_format="table")  # finished: skipped, no error
    with pytest.raises(UlmrecError, match=r"other settings:\n(.|\n)*rating_column: \"rating\" -> \"\""):
        run_prepare(run, input=str(tmp_path / "b"), input_format="table", rating_column="")
    (tmp_path / "b" / "t.csv").write_text((tmp_path / "b" / "t.csv").read_text().replace("U5 on I5", "U5 on I5!"))
    with pytest.raises(UlmrecError, match=r"input_digest"):
        run_prepare(run, input=str(tmp_path / "b"), input_format="table")


def test_a_hub_id_is_pinned_to_a_commit_and_read_there(tmp_path, monkeypatch):
    """No network here: the Hub's answers are stood in for, and the calls ulmrec makes are checked."""
    import huggingface_hub

    sha = "0123456789abcdef0123456789abcdef01234567"
    asked, loaded = [], []
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, name, revision=None: asked.append((name, revision)) or
                        type("Info", (), {"sha": sha})())
    table = datasets.Dataset.from_pandas(pd.DataFrame(grid_rows()))
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kw: loaded.append((path, kw)) or table)
    data, stats = run_prepare(tmp_path / "run", input="owner/reviews", input_format="table", table_split="full",
                              table_data_files=["raw/a.jsonl"], table_revision="v1")
    assert asked == [("owner/reviews", "v1")]
    assert loaded == [("owner/reviews", {"name": None, "split": "full", "revision": sha, "data_files": ["raw/a.jsonl"]})]
    assert stats["source"]["reviews"] == {"hub": "owner/reviews", "revision": sha, "config": None, "split": "full", "data_files": ["raw/a.jsonl"]}
    assert stats["interactions"] == 36
    asked.clear()
    run_prepare(tmp_path / "run2", input="owner/reviews", input_format="table", table_revision=sha)
    assert asked == []  # a full commit id needs no Hub call
    assert RunDir(tmp_path / "run").settings("prepare")["input_digest"] != RunDir(tmp_path / "run2").settings("prepare")["input_digest"]
