import datasets
import numpy as np
import pytest

from ulmrec_hf.common import RunArguments, UlmrecError, read_json
from ulmrec_hf.metrics import fuse
from ulmrec_hf.recommend import RecommendArguments, main, recommend_users


def test_recommend_matches_evaluate_order(tiny_pipeline):
    per_user = datasets.load_from_disk(str(tiny_pipeline / "eval" / "per_user"))["test"]
    users = per_user["user_id"][:3]
    ranked = recommend_users(str(tiny_pipeline), [str(u) for u in users], ranker_only=True)
    fused = recommend_users(str(tiny_pipeline), [str(u) for u in users])  # default: the w evaluate chose on validation
    test = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_test"))
    w = read_json(tiny_pipeline / "eval" / "metrics.json")["fusion"]["weight"]
    for n, u in enumerate(users):
        row = per_user[n]
        scores = np.array(row["scores"])
        assert [item for item, _, _ in ranked[n]] == [row["candidates"][i] for i in np.argsort(-scores, kind="stable")]
        retriever = np.array([test[test["user_id"].index(u)]["retriever_scores"]])
        order = np.argsort(-fuse(retriever, scores[None], w)[0], kind="stable")
        assert [item for item, _, _ in fused[n]] == [row["candidates"][i] for i in order]


def test_recommend_serves_users_the_retriever_missed(tiny_pipeline, capsys):
    test = datasets.load_from_disk(str(tiny_pipeline / "retriever" / "candidates" / "test"))
    missed = next(r for r in test if r["target_rank"] is None)
    users = datasets.load_from_disk(str(tiny_pipeline / "data"))["users"]
    name = users[users["user_id"].index(missed["user_id"])]["user"]
    (ranked,) = main(RunArguments(run_dir=str(tiny_pipeline)), RecommendArguments(user=[name], top_k=3))
    assert sorted(item for item, _, _ in ranked) == sorted(missed["candidates"])
    out = capsys.readouterr().out
    assert out.count("score") == 3 and "fused with the retriever, w=" in out
    with pytest.raises(UlmrecError, match="unknown user"):
        main(RunArguments(run_dir=str(tiny_pipeline)), RecommendArguments(user=["nobody"]))


def test_recommend_ranks_a_tied_gold_where_evaluate_does(tiny_pipeline, monkeypatch):
    """With every letter scored the same, serving keeps the shown order and the gold lands where evaluate ranks it."""
    from ulmrec_hf import ranker
    from ulmrec_hf.evaluate import ranks

    test = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_test"))
    monkeypatch.setattr(ranker, "score_prompts", lambda model, tok, prompts, ids, **kw: np.zeros((len(prompts), len(ids)), dtype=np.float32))
    users = test["user_id"][:4]
    served = recommend_users(str(tiny_pipeline), [str(u) for u in users], ranker_only=True)
    tied = np.zeros((len(users), len(test[0]["candidates"])), dtype=np.float32)
    expected = ranks(tied, np.array(test["target_position"][:4]))
    for n, row in enumerate(test.select(range(4))):
        items = [item for item, _, _ in served[n]]
        assert items == row["candidates"] and items.index(row["target"]) + 1 == expected[n]
