import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from ulmrec_hf.common import StageArguments, UlmrecError, read_json
from ulmrec_hf.prepare import PrepareArguments, clean_title, k_core
from ulmrec_hf import split
from ulmrec_hf.prepare import main as prepare


def run_prepare(run_dir, **kw):
    out = prepare(StageArguments(run_dir=str(run_dir)), PrepareArguments(**kw))
    return datasets.load_from_disk(str(out)), read_json(out / "stats.json")


def review(user, asin, t, **kw):
    return {"reviewerID": user, "asin": asin, "overall": 4.0, "reviewText": f"{user} on {asin}", "summary": "ok", "unixReviewTime": t, **kw}


def grid_reviews(n_users=6, n_items=6):
    """Every user reviews every item: survives a 5-core filter."""
    return [review(f"U{u}", f"I{i}", 1000 + 10 * i + u) for u in range(n_users) for i in range(n_items)]


def write_lines(path: Path, lines: list[str]):
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_2018(folder: Path, rows, titles=None, meta_lines=None):
    folder.mkdir(parents=True, exist_ok=True)
    write_lines(folder / "Toys_5.json.gz", [json.dumps(r) for r in rows])
    titles = titles or {f"I{i}": f"Item {i}" for i in range(6)}
    write_lines(folder / "meta_Toys.json.gz", meta_lines or [json.dumps({"asin": a, "title": t}) for a, t in titles.items()])
    return folder


def test_demo_prepare_filters_titles_and_k_core(demo_run):
    data = datasets.load_from_disk(str(demo_run / "data"))
    stats = read_json(demo_run / "data" / "stats.json")
    titles = data["items"]["title"]
    assert all(titles) and len(titles) == stats["items"]
    assert "B0DEMO0005" not in data["items"]["asin"] and "B0DEMO0011" not in data["items"]["asin"]
    assert any(" & " in t for t in titles) and not any("&amp;" in t for t in titles)
    assert stats["notes"]["interactions_without_title"] > 0
    lengths = [len(s) for s in data["users"]["items"]]
    assert min(lengths) >= 5
    counts = {}
    for seq in data["users"]["items"]:
        for i in seq:
            counts[i] = counts.get(i, 0) + 1
    assert min(counts.values()) >= 5
    for ts in data["users"]["timestamps"]:
        assert ts == sorted(ts)
    assert stats["signals"] == {"ratings": True, "timestamps": True, "reviews": True, "summaries": True}
    assert (demo_run / "data" / "README.md").read_text().startswith("---")


def test_two_runs_give_byte_identical_datasets(tmp_path, demo_raw):
    for name in ("a", "b"):
        run_prepare(tmp_path / name, input=str(demo_raw))
    files = sorted(p.relative_to(tmp_path / "a" / "data") for p in (tmp_path / "a" / "data").rglob("*") if p.is_file())
    assert any(str(f).endswith(".arrow") for f in files)
    for f in files:
        if f.name not in ("stats.json", "_COMPLETE", "_STAGE.json"):  # wall time and start/finish times
            assert (tmp_path / "a" / "data" / f).read_bytes() == (tmp_path / "b" / "data" / f).read_bytes(), f


def test_ids_follow_sorted_original_ids_not_file_order(tmp_path):
    rows = grid_reviews()
    data_a, _ = run_prepare(tmp_path / "a", input=str(write_2018(tmp_path / "ra", rows)))
    data_b, _ = run_prepare(tmp_path / "b", input=str(write_2018(tmp_path / "rb", rows[::-1])))
    assert data_a["users"].to_list() == data_b["users"].to_list()
    assert data_a["items"]["asin"] == [f"I{i}" for i in range(6)]
    assert data_a["users"]["user"] == [f"U{u}" for u in range(6)]


def test_k_core_is_iterative():
    # U5 has 5 items, but item X is only reviewed by U5; dropping X leaves U5 with 4, so U5 goes too.
    rows = [{"user": f"U{u}", "item": f"I{i}"} for u in range(5) for i in range(5)]
    rows += [{"user": "U5", "item": i} for i in ("I0", "I1", "I2", "I3", "X")]
    kept, rounds = k_core(rows, 5)
    assert {r["user"] for r in kept} == {f"U{u}" for u in range(5)} and rounds == 3


def test_clean_title():
    assert clean_title("  Rose &amp; Oud\n  Perfume ") == "Rose & Oud Perfume"
    assert clean_title("   ") is None and clean_title(None) is None and clean_title(["x"]) is None


def test_truncated_gzip_names_the_file(tmp_path):
    folder = write_2018(tmp_path / "raw", grid_reviews())
    blob = (folder / "Toys_5.json.gz").read_bytes()
    (folder / "Toys_5.json.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UlmrecError, match=r"Toys_5\.json\.gz: corrupt or truncated file after line \d+"):
        run_prepare(tmp_path / "run", input=str(folder))


def test_broken_json_and_missing_asin_are_counted_with_file_and_line(tmp_path):
    lines = [json.dumps(r) for r in grid_reviews()]
    lines.insert(3, '{"reviewerID": "U0", "asin": ')
    lines.insert(7, json.dumps({"reviewerID": "U1", "overall": 5}))
    folder = tmp_path / "raw"
    write_2018(folder, [])
    write_lines(folder / "Toys_5.json.gz", lines)
    data, stats = run_prepare(tmp_path / "run", input=str(folder))
    assert stats["skipped"]["counts"] == {"malformed_line": 1, "missing_field:asin": 1}
    assert stats["skipped"]["examples"]["malformed_line"] == [f"{folder / 'Toys_5.json.gz'}:4"]
    assert stats["skipped"]["examples"]["missing_field:asin"] == [f"{folder / 'Toys_5.json.gz'}:8"]
    assert stats["interactions"] == 36


def test_2014_meta_python_literal_lines_are_parsed_safely(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    write_lines(folder / "reviews_Toys_5.json.gz", [json.dumps(r) for r in grid_reviews()])
    meta = [repr({"asin": f"I{i}", "title": f"Toy {i}", "salesRank": {"Toys": i}}) for i in range(6)]
    meta.append("__import__('os').system('echo pwned')")
    write_lines(folder / "meta_Toys.json.gz", meta)
    data, stats = run_prepare(tmp_path / "run", input=str(folder))
    assert stats["source"]["format"] == "amazon2014"
    assert data["items"]["title"] == [f"Toy {i}" for i in range(6)]
    assert stats["notes"]["python_literal_lines"] == 6
    assert stats["skipped"]["counts"] == {"malformed_line": 1}


def test_amazon_2023_jsonl(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    rows = [{"user_id": f"U{u}", "parent_asin": f"P{i}", "asin": f"A{i}", "rating": 5, "text": "great", "title": "wow",
             "timestamp": 1_600_000_000_000 + 1000 * (i * 7 + u)} for u in range(6) for i in range(6)]
    write_lines(folder / "Toys.jsonl", [json.dumps(r) for r in rows])
    write_lines(folder / "meta_Toys.jsonl", [json.dumps({"parent_asin": f"P{i}", "title": f"T{i}"}) for i in range(6)])
    data, stats = run_prepare(tmp_path / "run", input=str(folder))
    assert stats["source"]["format"] == "amazon2023" and stats["interactions"] == 36
    assert data["users"][0]["timestamps"][0] == 1_600_000_000


def test_llamarec_dataset_json(tmp_path):
    spec = {"train": {"1": [1, 2, 3], "2": [3, 2, 1]}, "val": {"1": [4], "2": [4]}, "test": {"1": [2], "2": [3]},
            "meta": {"1": "A", "2": "B &amp; C", "3": "D", "4": "E"}, "umap": {"ux": 1, "uy": 2},
            "smap": {"a": 1, "b": 2, "c": 3, "d": 4}}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    data, stats = run_prepare(tmp_path / "run", input=str(tmp_path / "dataset.json"))
    assert data["users"]["items"] == [[1, 2, 3, 4, 2], [3, 2, 1, 4, 3]]
    assert data["items"]["title"] == ["A", "B & C", "D", "E"]
    assert stats["signals"] == {"ratings": False, "timestamps": False, "reviews": False, "summaries": False}


def test_empty_after_filtering_is_an_error(tmp_path):
    folder = write_2018(tmp_path / "raw", grid_reviews(4, 4))
    with pytest.raises(UlmrecError, match="no interactions left after"):
        run_prepare(tmp_path / "run", input=str(folder))


def test_missing_meta_requires_titles_optional(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    write_lines(folder / "reviews_Toys_5.json.gz", [json.dumps(r) for r in grid_reviews()])
    with pytest.raises(UlmrecError, match="titles are required"):
        run_prepare(tmp_path / "run", input=str(folder))
    data, stats = run_prepare(tmp_path / "run", input=str(folder), titles="optional")
    assert stats["users"] == 6 and data["items"]["title"] == [None] * 6


def test_cli_reports_one_line_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ulmrec_hf.cli", "prepare", "--run", str(tmp_path), "--input", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"ulmrec prepare: error: {tmp_path / 'nope'}: no such file or folder")
    assert "Traceback" not in proc.stderr


def test_the_input_content_not_its_path_is_the_setting(tmp_path, demo_raw):
    run_prepare(tmp_path, input=str(demo_raw))
    marker = tmp_path / "data" / "stats.json"
    before = marker.stat().st_mtime_ns
    moved = tmp_path / "elsewhere"
    shutil.copytree(demo_raw, moved)
    run_prepare(tmp_path, input=str(moved))  # the same files in another folder: still finished
    assert marker.stat().st_mtime_ns == before


def test_bad_bytes_are_reported_with_their_line(tmp_path):
    lines = [json.dumps(r).encode() for r in grid_reviews()]
    lines[20] = lines[20].replace(b"U3 on", b"U3 \xe9 on")
    folder = tmp_path / "raw"
    write_2018(folder, [])
    (folder / "Toys_5.json.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    with pytest.raises(UlmrecError, match=r"Toys_5\.json\.gz:21: not UTF-8 text"):
        run_prepare(tmp_path / "run", input=str(folder))


def test_beauty_import_matches_the_paper(tmp_path, shared_data):
    path = shared_data("amazon-beauty-ulmrec") / "dataset.json"
    data, stats = run_prepare(tmp_path, input=str(path))
    assert (stats["users"], stats["items"], stats["interactions"]) == (22332, 12086, 198215)
    raw = json.loads(path.read_text())
    for row in data["users"]:
        key = str(row["user_id"])
        train, val = split.validation_pair(row["items"])  # the split every stage uses, against the file's own
        assert [val] == raw["val"][key] and [split.test_pair(row["items"])[1]] == raw["test"][key] and train == raw["train"][key]


def test_gift_cards_2018_raw(tmp_path, shared_data):
    data, stats = run_prepare(tmp_path, input=str(shared_data("amazon-gift-cards-2018")))
    assert stats["source"]["format"] == "amazon2018"
    assert stats["users"] > 400 and stats["items"] > 100 and all(data["items"]["title"])
    assert all(stats["signals"].values())
    assert min(len(s) for s in data["users"]["items"]) >= 5
