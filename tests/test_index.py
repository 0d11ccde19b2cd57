import json
import shutil

import datasets
import pytest
import torch

from ulmrec_hf.common import StageArguments, UlmrecError, read_json
from ulmrec_hf.index import IndexArguments, TextEncoder, encode_cached, pool_users
from ulmrec_hf.index import main as index_main
from ulmrec_hf.layout import RunDir
from ulmrec_hf.models.user_index import IdAttention


def small(encoder: str, **kw) -> IndexArguments:
    base = dict(encoder=encoder, rq_levels=3, rq_codebook_size=16, rq_code_dim=8, rq_hidden=[32], rq_epochs=25,
                rq_batch_size=64, attention_steps=15, attention_batch_users=32, encoder_max_length=64, seed=0)
    return IndexArguments(**{**base, **kw})


def build_index(run, args: IndexArguments, overwrite: bool = False):
    out = index_main(StageArguments(run_dir=str(run), overwrite=overwrite), args)
    return datasets.load_from_disk(str(out / "index")), read_json(out / "stats.json")


def test_sentence_transformers_gives_the_hand_written_mean_pooling(tiny_encoder):
    """The encoder moved to sentence-transformers; its vectors are those of mean pooling + L2 norm by hand."""
    from transformers import AutoModel, AutoTokenizer

    texts = ["great lipstick colour", "shampoo smells nice but leaves my hair too oily for the office", "ok"]
    ours = TextEncoder(tiny_encoder, 2, 32).encode(texts)
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_encoder), AutoModel.from_pretrained(tiny_encoder).eval()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    manual = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(ours, manual, atol=1e-5, rtol=1e-5)


def test_identical_reviews_different_ids_through_the_encoder(tiny_encoder):
    enc = TextEncoder(tiny_encoder, 8, 32)
    texts = [["great lipstick colour", "shampoo smells nice", "too oily"]] * 2
    ids = ["A1B2C3", "ZZ9Y8X"]
    uniq = sorted({t for ts in texts for t in ts} | set(ids))
    emb = enc.encode(uniq)
    row_of = {t: i for i, t in enumerate(uniq)}
    torch.manual_seed(0)
    x, _ = pool_users(IdAttention(emb.size(1), init_std=1.0), emb, texts, row_of, emb[[row_of[i] for i in ids]], torch)
    assert not torch.allclose(x[0], x[1], atol=1e-5)


def test_forced_collisions_end_unique(tmp_path, demo_run, copy_stages, tiny_encoder):
    run = copy_stages(demo_run, tmp_path, ("prepare",))
    data = datasets.load_from_disk(str(run / "data"))
    clone = data["users"].to_list()
    for u in clone[:80]:  # 80 users with the same reviews
        u["reviews"] = list(clone[0]["reviews"][:3]) * 3 + ["x", "y"]
    datasets.DatasetDict({"users": datasets.Dataset.from_list(clone), "items": data["items"]}).save_to_disk(str(tmp_path / "data2"))
    complete = (run / "data" / "_COMPLETE").read_text()
    shutil.rmtree(run / "data")
    (tmp_path / "data2").rename(run / "data")
    (run / "data" / "_COMPLETE").write_text(complete)
    index, stats = build_index(run, small(tiny_encoder, rq_codebook_size=8))
    assert stats["collision_rate_before"] > 0.2 and stats["collision_rate_after"] == 0
    assert len(set(index["index"])) == len(index) == 200
    assert all(s.startswith("<a_") and s.count("<") == 3 for s in index["index"])


def test_seeded_index_is_deterministic_and_reported(tmp_path, demo_run, copy_stages, tiny_encoder):
    a, stats = build_index(copy_stages(demo_run, tmp_path / "a", ("prepare",)), small(tiny_encoder))
    b, _ = build_index(copy_stages(demo_run, tmp_path / "b", ("prepare",)), small(tiny_encoder))
    assert a["index"] == b["index"]
    assert stats["collision_rate_after"] == 0 and stats["unique"] == 200
    assert set(stats) >= {"collision_rate_before", "codebook", "reconstruction_mse", "wall_time_s", "text_source", "encoder_revision"}
    assert stats["codebook"][0]["codes_used"] > 1 and stats["text_source"] == "reviews"
    assert len(read_json(tmp_path / "a" / "user_index" / "tokens.json")) == 3 * 16
    assert (tmp_path / "a" / "user_index" / "rqvae" / "config.json").exists() and (tmp_path / "a" / "user_index" / "attention" / "model.safetensors").exists()


def test_encoding_cache_resumes(tmp_path, tiny_encoder, caplog):
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
    with caplog.at_level("INFO"):
        again, rows2, encoded = encode_cached(texts, factory, tmp_path, shard_size=16)
    assert encoded == 1 and calls == [16] and torch.equal(full, again) and rows == rows2
    assert "resuming the text encoding at shard 2 of 4" in caplog.text
    calls.clear()
    encode_cached(texts, factory, tmp_path, shard_size=16)
    assert calls == []


def test_add_users_keeps_existing_codes(tmp_path, demo_run, copy_stages, tiny_encoder):
    run = copy_stages(demo_run, tmp_path, ("prepare",))
    before, _ = build_index(run, small(tiny_encoder))
    fingerprint = RunDir(run).stage_fingerprint("index")
    data = datasets.load_from_disk(str(run / "data"))["users"]
    new = [{"user": f"NEW{i}", "texts": data[i]["reviews"][:-2]} for i in range(6)]  # the same texts as existing users
    (tmp_path / "new.jsonl").write_text("\n".join(json.dumps(r) for r in new))
    after, stats = build_index(run, small(tiny_encoder, add_users=str(tmp_path / "new.jsonl")))
    assert after.select(range(len(before)))["index"] == before["index"]
    assert len(after) == len(before) + 6 and len(set(after["index"])) == len(after)
    assert stats["added_users"][0]["users"] == 6
    assert RunDir(run).stage_fingerprint("index") != fingerprint  # later stages see that the index changed
    with pytest.raises(UlmrecError, match="already indexed"):
        build_index(run, small(tiny_encoder, add_users=str(tmp_path / "new.jsonl")))


@pytest.mark.parametrize("scheme", ["nid", "oid", "none", "import"])
def test_other_schemes(tmp_path, demo_run, copy_stages, scheme):
    run = copy_stages(demo_run, tmp_path / "run", ("prepare",))
    users = datasets.load_from_disk(str(run / "data"))["users"]
    mapping = {u: f" <a_{i % 7}> <b_{i}>" for i, u in enumerate(users["user"])}
    (tmp_path / "paper.json").write_text(json.dumps(mapping))
    index, _ = build_index(run, IndexArguments(scheme=scheme, import_file=str(tmp_path / "paper.json")))
    expected = {"nid": [str(i) for i in users["user_id"]], "oid": users["user"], "none": [""] * len(users),
                "import": [f"<a_{i % 7}><b_{i}>" for i in range(len(users))]}[scheme]
    assert index["index"] == expected
    tokens = read_json(run / "user_index" / "tokens.json")
    assert (len(tokens) == 7 + len(users)) if scheme == "import" else tokens == []


def test_reviews_required_when_source_is_reviews(tmp_path):
    from ulmrec_hf.prepare import PrepareArguments
    from ulmrec_hf.prepare import main as prepare

    spec = {"train": {"1": [1, 2, 3]}, "val": {"1": [4]}, "test": {"1": [2]}, "meta": {str(i): f"T{i}" for i in range(1, 5)},
            "umap": {"ux": 1}, "smap": {c: i for i, c in enumerate("abcd", 1)}}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    prepare(StageArguments(run_dir=str(tmp_path / "run")), PrepareArguments(input=str(tmp_path / "dataset.json")))
    with pytest.raises(UlmrecError, match="no review text; use --text_source preferences or titles"):
        build_index(tmp_path / "run", IndexArguments())
