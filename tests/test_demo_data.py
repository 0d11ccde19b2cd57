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


def test_default_demo_is_the_one_made_before_demo_data_became_linear(demo_raw):
    """Sha256 of the files as the quadratic generator wrote them (its numbers must not move)."""
    import hashlib

    digests = {"Demo_5.json.gz": "59a215078bf9bc6b28c09954b0679b2652fdfe9be33e734673e172e8d08cb466",
               "meta_Demo.json.gz": "09923434661e460f51e26e70ab026003a39148fe00d053e95a048634f68f90c9"}
    for name, digest in digests.items():
        assert hashlib.sha256(gzip.decompress((demo_raw / name).read_bytes())).hexdigest() == digest, name
    assert hashlib.sha256((demo_raw / "planted_structure.json").read_bytes()).hexdigest() == \
        "8cd6c567aeb53f786d62191fb18e7c4d454cc792c9e35f586a558222204726fe"


def test_draw_is_numpy_choice_with_p():
    import numpy as np

    from ulmrec_hf.demo_data import draw

    weights = np.random.default_rng(0).random(257) ** 3
    probs = [w / weights.sum() for w in weights]
    cdf = np.asarray(probs).cumsum()
    cdf /= cdf[-1]
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert [int(a.choice(len(probs), p=probs)) for _ in range(2000)] == [draw(b, cdf) for _ in range(2000)]
    assert a.random() == b.random()


def test_demo_data_is_linear_in_users_and_items(tmp_path):
    """5,000 users over 5,000 items: the sampling weights used to cost items² per user (about 10 min here)."""
    import time

    start = time.time()
    main(DemoDataArguments(output=str(tmp_path), users=5000, items=5000))
    assert time.time() - start < 60
    assert len({json.loads(line)["reviewerID"] for line in gzip.open(tmp_path / "Demo_5.json.gz", "rt")}) == 5000
