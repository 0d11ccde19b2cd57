"""The out-of-core engines give the Python reader's datasets and stats.json, row for row."""

import gzip
import json
import shutil
import subprocess

import datasets
import pytest

from ulmrec_hf.common import StageArguments, UlmrecError, read_json
from ulmrec_hf.prepare import PrepareArguments
from ulmrec_hf.prepare import main as prepare


def run(run_dir, **kw):
    out = prepare(StageArguments(run_dir=str(run_dir)), PrepareArguments(**kw))
    return datasets.load_from_disk(str(out)), read_json(out / "stats.json")


def assert_same(a, b):
    (data_a, stats_a), (data_b, stats_b) = a, b
    for split in ("users", "items"):
        assert data_a[split].features == data_b[split].features, split
        assert data_a[split].to_list() == data_b[split].to_list(), split
    for stats in (stats_a, stats_b):
        stats.pop("wall_time_s")
    assert stats_a == stats_b


def spark_or_skip():
    pytest.importorskip("pyspark")
    if shutil.which("java") is None or subprocess.run(["java", "-version"], capture_output=True, check=False).returncode:
        pytest.skip("no Java for pyspark")


def write_gz(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


def odd_lines_folder(folder):
    """Reviews and meta with every kind of line the SQL leaves to the Python rules."""
    rows = [{"reviewerID": f"U{u}", "asin": f"I{i}", "overall": 4.0 + (u % 2), "reviewText": f"U{u} on I{i}",
             "summary": "ok", "unixReviewTime": 1000 + 10 * i + u} for u in range(7) for i in range(7)]
    lines = [json.dumps(r) for r in rows]
    lines[1] = lines[1].replace('"overall": 5.0', '"overall": "5"')  # string rating
    lines[2] = lines[2].replace('"unixReviewTime": 1021', '"unixReviewTime": "1021"')  # string time
    lines[3] = lines[3].replace('"unixReviewTime": 1031', '"unixReviewTime": 1031.7')  # float time
    lines[4] = lines[4].replace('"reviewText": "U0 on I4"', '"reviewText": "\\u3000 "')  # blank in Python's sense
    lines[5] = lines[5].replace('"reviewText": "U0 on I5"', '"reviewText": 7')  # not a string: no text
    lines[6] = lines[6][:-1] + ",}"  # a trailing comma: not JSON for Python, so a Python literal
    lines[8] = lines[8][:-1] + ', "asin": "I0"}'  # a repeated key: Python keeps the last
    lines[9] = "{'reviewerID': 'U1', 'asin': 'I2', 'overall': 3.0, 'unixReviewTime': 5}"  # a Python literal
    lines[10] = lines[10].replace('"unixReviewTime": 1031', '"unixReviewTime": NaN')
    lines += ["", "   ", '{"reviewerID": "U0", "asin": ', '["list"]', '{"reviewerID": "", "asin": "I1"}',
              '{"reviewerID": 12, "asin": "I1", "overall": 1}', '{"reviewerID": "U3", "asin": "I3"} trailing',
              '{"reviewerID": "U9", "asin": "I0", "unixReviewTime": "soon"}', '{"reviewerID": "U9", "asin": "I0", "overall": [1]}']
    write_gz(folder / "Toys_5.json.gz", lines)
    meta = [json.dumps({"asin": f"I{i}", "title": f"  Toy\t{i} &amp; co\u00a0"}) for i in range(4)]
    meta += [json.dumps({"asin": "I4", "title": "Plain  toy\n4"}), json.dumps({"asin": "I5", "title": ["x"]}),
             json.dumps({"asin": "I4", "title": "second title is ignored"}), repr({"asin": "I6", "title": "Six"}),
             json.dumps({"title": "no asin"}), "not json", json.dumps({"asin": "I5", "title": "late"})]
    write_gz(folder / "meta_Toys.json.gz", meta)
    return folder


@pytest.mark.parametrize("titles", ["required", "optional"])
def test_duckdb_matches_python_on_odd_lines(tmp_path, titles):
    folder = odd_lines_folder(tmp_path / "raw")
    ref = run(tmp_path / "py", input=str(folder), engine="python", titles=titles)
    assert sum(ref[1]["skipped"]["counts"].values()) >= 8 and ref[1]["notes"]["python_literal_lines"] == 3
    assert_same(ref, run(tmp_path / "duck", input=str(folder), engine="duckdb", titles=titles))


def test_duckdb_matches_python_on_demo(tmp_path, demo_raw):
    ref = run(tmp_path / "py", input=str(demo_raw), engine="python")
    assert_same(ref, run(tmp_path / "duck", input=str(demo_raw), engine="duckdb"))
    for name in ("dataset_dict.json", "users/state.json", "users/dataset_info.json", "items/data-00000-of-00001.arrow"):
        assert (tmp_path / "py" / "data" / name).read_bytes() == (tmp_path / "duck" / "data" / name).read_bytes(), name


def test_duckdb_matches_python_on_gift_cards(tmp_path, shared_data):
    folder = shared_data("amazon-gift-cards-2018")
    assert_same(run(tmp_path / "py", input=str(folder), engine="python"), run(tmp_path / "duck", input=str(folder)))


def test_duckdb_matches_python_on_musical_instruments(tmp_path, shared_data):
    folder = shared_data("amazon-musical-instruments-2014")
    assert_same(run(tmp_path / "py", input=str(folder), engine="python", titles="optional"),
                run(tmp_path / "duck", input=str(folder), titles="optional"))


def test_llamarec_import_is_the_same_with_every_engine(tmp_path, shared_data):
    path = shared_data("amazon-beauty-ulmrec") / "dataset.json"
    assert_same(run(tmp_path / "py", input=str(path), engine="python"), run(tmp_path / "duck", input=str(path), engine="duckdb"))


def test_duckdb_2023_jsonl_and_shards(tmp_path, monkeypatch):
    from ulmrec_hf import prepare_sql

    folder = tmp_path / "raw"
    rows = [{"user_id": f"U{u}", "parent_asin": f"P{i}", "rating": 5, "text": "great", "title": "wow",
             "timestamp": 1_600_000_000_000 + 1000 * (i * 7 + u)} for u in range(9) for i in range(6)]
    folder.mkdir()
    (folder / "Toys.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "meta_Toys.jsonl").write_text("".join(json.dumps({"parent_asin": f"P{i}", "title": f"T{i}"}) + "\n" for i in range(6)))
    monkeypatch.setattr(prepare_sql, "SHARD_BYTES", 200)
    monkeypatch.setattr(prepare_sql, "BATCH_ROWS", 7)  # users cut across batches
    duck = run(tmp_path / "duck", input=str(folder))
    assert len(list((tmp_path / "duck" / "data" / "users").glob("data-*.arrow"))) > 1
    assert_same(run(tmp_path / "py", input=str(folder), engine="python"), duck)


def test_bad_bytes_and_truncated_gzip_name_the_line(tmp_path):
    folder = odd_lines_folder(tmp_path / "raw")
    lines = gzip.decompress((folder / "Toys_5.json.gz").read_bytes()).split(b"\n")
    lines[20] = lines[20].replace(b"U2 on", b"U2 \xe9 on")
    (folder / "Toys_5.json.gz").write_bytes(gzip.compress(b"\n".join(lines)))
    with pytest.raises(UlmrecError, match=r"Toys_5\.json\.gz:21: not UTF-8 text \(invalid continuation byte at byte \d+ of the line\)"):
        run(tmp_path / "run", input=str(folder))
    blob = gzip.compress(b"\n".join(lines[:19]) * 50)
    (folder / "Toys_5.json.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UlmrecError, match=r"Toys_5\.json\.gz: corrupt or truncated file after line \d+"):
        run(tmp_path / "run", input=str(folder))


def test_malformed_line_is_counted_with_file_and_line(tmp_path):
    folder = odd_lines_folder(tmp_path / "raw")
    _, stats = run(tmp_path / "duck", input=str(folder))
    where = str(folder / "Toys_5.json.gz")
    assert stats["skipped"]["examples"]["malformed_line"] == [f"{where}:52", f"{where}:56", f"{folder / 'meta_Toys.json.gz'}:10"]
    assert stats["skipped"]["counts"]["missing_field:reviewerID"] == 1


@pytest.mark.slow
def test_spark_matches_duckdb_on_demo_and_odd_lines(tmp_path, demo_raw):
    spark_or_skip()
    for name, folder in (("demo", demo_raw), ("odd", odd_lines_folder(tmp_path / "odd"))):
        duck = run(tmp_path / name / "duck", input=str(folder))
        assert_same(duck, run(tmp_path / name / "spark", input=str(folder), engine="spark", memory_limit="1GB"))


@pytest.mark.slow
def test_spark_matches_duckdb_on_gift_cards(tmp_path, shared_data):
    spark_or_skip()
    folder = shared_data("amazon-gift-cards-2018")
    assert_same(run(tmp_path / "duck", input=str(folder)), run(tmp_path / "spark", input=str(folder), engine="spark", memory_limit="1GB"))
