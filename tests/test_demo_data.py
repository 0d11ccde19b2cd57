import gzip
import json

from ulmrec_hf.demo_data import DemoDataArguments, main


def test_demo_data_is_deterministic(tmp_path, demo_raw):
    main(DemoDataArguments(output=str(tmp_path)))
    for name in ("Demo_5.json.gz", "meta_Demo.json.gz"):
        assert (tmp_path / name).read_bytes() == (demo_raw / name).read_bytes()


def test_planted_structure_is_in_the_files(demo_raw):
    planted = json.loads((demo_raw / "planted_structure.json").read_text())
    reviews = [json.loads(line) for line in gzip.open(demo_raw / "Demo_5.json.gz", "rt")]
    titles = {m["asin"]: m["title"] for m in map(json.loads, gzip.open(demo_raw / "meta_Demo.json.gz", "rt"))}
    assert len({r["reviewerID"] for r in reviews}) == 200 and len(planted["items"]) == 96
    assert titles["B0DEMO0005"] is None and "&amp;" in titles["B0DEMO0007"]  # defects that prepare must handle
    liked = [r for r in reviews if r["overall"] == 5.0]
    assert liked and all(r["reviewText"].startswith("Love this") for r in liked)
