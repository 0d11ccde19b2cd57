import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from ulmrec_hf.common import RunArguments, UlmrecError, read_json
from ulmrec_hf.index import IndexArguments, encode_cached
from ulmrec_hf.index import main as index_main
from ulmrec_hf.models.user_index import IdAttention, resolve_collisions, segment_softmax


def small(encoder: str, **kw) -> IndexArguments:
    base = dict(encoder=encoder, rq_levels=3, rq_codebook_size=16, rq_code_dim=8, rq_hidden=[32], rq_epochs=25,
                rq_batch_size=64, attention_steps=15, attention_batch_users=32, encoder_max_length=64)
    return IndexArguments(**{**base, **kw})


def build_index(run: Path, args: IndexArguments, seed: int = 0):
    out = index_main(RunArguments(run_dir=str(run), seed=seed), args)
    return datasets.load_from_disk(str(out / "index")), read_json(out / "stats.json")


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "data", dst / "data")
    return dst


def test_attention_weights_sum_to_one_and_depend_on_the_id():
    torch.manual_seed(0)
    attention = IdAttention(16, init_std=0.5)
    texts = torch.randn(3, 16).repeat(2, 1)  # two users with the same three reviews
    segments = torch.tensor([0, 0, 0, 1, 1, 1])
    queries = torch.randn(2, 16)
    alpha = attention.weights(texts, segments, queries)
    assert torch.allclose(alpha.view(2, 3).sum(1), torch.ones(2))
    pooled = attention(texts, segments, queries)
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-4)


def test_segment_softmax_matches_dense():
    scores = torch.randn(7)
    segments = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    out = segment_softmax(scores, segments, 3)
    for s, idx in ((0, [0, 1]), (1, [2, 3, 4]), (2, [5, 6])):
        assert torch.allclose(out[idx], torch.softmax(scores[idx], 0))


def test_identical_reviews_different_ids_through_the_encoder(tmp_path, tiny_encoder):
    from ulmrec_hf.index import TextEncoder, pool_users

    enc = TextEncoder(tiny_encoder, 8, 32)
    texts = [["great lipstick colour", "shampoo smells nice", "too oily"]] * 2
    ids = ["A1B2C3", "ZZ9Y8X"]
    uniq = sorted({t for ts in texts for t in ts} | set(ids))
    emb = enc.encode(uniq)
    row_of = {t: i for i, t in enumerate(uniq)}
    torch.manual_seed(0)
    x, _ = pool_users(IdAttention(emb.size(1), init_std=1.0), emb, texts, row_of, emb[[row_of[i] for i in ids]], torch)
    assert not torch.allclose(x[0], x[1], atol=1e-5)


def test_resolve_collisions_overflow_is_deterministic():
    k, n = 4, 14
    codes = np.zeros((n, 3), dtype=np.int64)  # 14 users on (0, 0, 0): the (0, 0) bucket holds only 4, level 1 = 0 holds 16
    rng = np.random.default_rng(0)
    dists = [rng.random((n, k)) for _ in range(3)]
    fixed, moved = resolve_collisions(codes, dists)
    again, _ = resolve_collisions(codes, dists)
    assert (fixed == again).all() and moved == n - 1
    assert len({tuple(c) for c in fixed.tolist()}) == n
    keeper = int(np.argmin(dists[2][:, 0]))
    assert tuple(fixed[keeper]) == (0, 0, 0)
    assert sum(tuple(c[:2]) == (0, 0) for c in fixed.tolist()) == k  # the bucket is full, the rest moved level 2
    assert all(c[0] == 0 for c in fixed.tolist())  # level 1 untouched while level-2 buckets are free


def test_resolve_collisions_respects_taken_codes():
    codes = np.array([[1, 1], [1, 1], [2, 0]])
    dists = [np.zeros((3, 4)), np.tile(np.arange(4.0), (3, 1))]
    fixed, _ = resolve_collisions(codes, dists, taken={(1, 1), (1, 0)})
    assert {tuple(c) for c in fixed.tolist()}.isdisjoint({(1, 1), (1, 0)}) and tuple(fixed[2]) == (2, 0)


def test_forced_collisions_end_unique(tmp_path, demo_run, tiny_encoder):
    run = copy_run(demo_run, tmp_path)
    data = datasets.load_from_disk(str(run / "data"))
    clone = data["users"].to_list()
    for u in clone[:80]:  # 80 users with the same reviews
        u["reviews"] = list(clone[0]["reviews"][:3]) * 3 + ["x", "y"]
    datasets.DatasetDict({"users": datasets.Dataset.from_list(clone), "items": data["items"]}).save_to_disk(str(tmp_path / "data2"))
    shutil.rmtree(run / "data")
    (tmp_path / "data2").rename(run / "data")
    (run / "data" / "_COMPLETE").write_text("{}")
    index, stats = build_index(run, small(tiny_encoder, rq_codebook_size=8))
    assert stats["collision_rate_before"] > 0.2 and stats["collision_rate_after"] == 0
    assert len(set(index["index"])) == len(index) == 200
    assert all(s.startswith("<a_") and s.count("<") == 3 for s in index["index"])


def test_seeded_index_is_deterministic_and_reported(tmp_path, demo_run, tiny_encoder):
    a, stats = build_index(copy_run(demo_run, tmp_path / "a"), small(tiny_encoder))
    b, _ = build_index(copy_run(demo_run, tmp_path / "b"), small(tiny_encoder))
    assert a["index"] == b["index"]
    assert stats["collision_rate_after"] == 0 and stats["unique"] == 200
    assert set(stats) >= {"collision_rate_before", "codebook", "reconstruction_mse", "wall_time_s", "text_source"}
    assert stats["codebook"][0]["codes_used"] > 1 and stats["text_source"] == "reviews"
    assert len(read_json(tmp_path / "a" / "user_index" / "tokens.json")) == 3 * 16


def test_encoding_cache_resumes(tmp_path, tiny_encoder):
    from ulmrec_hf.index import TextEncoder

    texts = [f"review number {i}" for i in range(50)]
    calls = []

    def factory():
        enc = TextEncoder(tiny_encoder, 8, 32)
        real = enc.encode
        enc.encode = lambda batch: calls.append(len(batch)) or real(batch)
        return enc

    full, rows, encoded = encode_cached(texts, factory, tmp_path, shard_size=16)
    assert encoded == 4 and calls == [16, 16, 16, 2]
    (tmp_path / "shard_00002.safetensors").unlink()  # as if killed while writing shard 2
    calls.clear()
    again, rows2, encoded = encode_cached(texts, factory, tmp_path, shard_size=16)
    assert encoded == 1 and calls == [16] and torch.equal(full, again) and rows == rows2
    calls.clear()
    encode_cached(texts, factory, tmp_path, shard_size=16)
    assert calls == []


def test_add_users_keeps_existing_codes(tmp_path, demo_run, tiny_encoder):
    run = copy_run(demo_run, tmp_path)
    before, _ = build_index(run, small(tiny_encoder))
    data = datasets.load_from_disk(str(run / "data"))["users"]
    new = [{"user": f"NEW{i}", "texts": data[i]["reviews"][:-2]} for i in range(6)]  # same texts as existing users
    (tmp_path / "new.jsonl").write_text("\n".join(json.dumps(r) for r in new))
    after, stats = build_index(run, small(tiny_encoder, add_users=str(tmp_path / "new.jsonl")))
    assert after.select(range(len(before)))["index"] == before["index"]
    assert len(after) == len(before) + 6 and len(set(after["index"])) == len(after)
    assert stats["added_users"][0]["users"] == 6
    with pytest.raises(UlmrecError, match="already indexed"):
        build_index(run, small(tiny_encoder, add_users=str(tmp_path / "new.jsonl")))


@pytest.mark.parametrize("scheme", ["nid", "oid", "none", "import"])
def test_other_schemes(tmp_path, demo_run, scheme):
    run = copy_run(demo_run, tmp_path)
    users = datasets.load_from_disk(str(run / "data"))["users"]
    mapping = {u: f" <a_{i % 7}> <b_{i}>" for i, u in enumerate(users["user"])}
    (tmp_path / "paper.json").write_text(json.dumps(mapping))
    index, stats = build_index(run, IndexArguments(index_scheme=scheme, index_import_file=str(tmp_path / "paper.json")))
    expected = {"nid": [str(i) for i in users["user_id"]], "oid": users["user"], "none": [""] * len(users),
                "import": [f"<a_{i % 7}><b_{i}>" for i in range(len(users))]}[scheme]
    assert index["index"] == expected
    tokens = read_json(tmp_path / "user_index" / "tokens.json")
    assert (len(tokens) == 7 + len(users)) if scheme == "import" else tokens == []


def test_reviews_required_when_source_is_reviews(tmp_path):
    spec = {"train": {"1": [1, 2, 3]}, "val": {"1": [4]}, "test": {"1": [2]}, "meta": {str(i): f"T{i}" for i in range(1, 5)},
            "umap": {"ux": 1}, "smap": {c: i for i, c in enumerate("abcd", 1)}}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    from ulmrec_hf.prepare import PrepareArguments, main as prepare

    prepare(RunArguments(run_dir=str(tmp_path / "run")), PrepareArguments(input=str(tmp_path / "dataset.json")))
    with pytest.raises(UlmrecError, match="no review text; use --text_source preferences or titles"):
        build_index(tmp_path / "run", IndexArguments())
