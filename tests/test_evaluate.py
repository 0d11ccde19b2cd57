import math

import datasets
import numpy as np
import pytest

from ulmrec_hf.ablate import VARIANTS, stages_for, variant_overrides
from ulmrec_hf.common import UlmrecError, read_json
from ulmrec_hf.evaluate import rank_and_overall
from ulmrec_hf.ranker import load_ranker, naive_scores, ranks_from_scores, score_prompts


def test_ranks_from_hand_made_scores():
    scores = np.array([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    assert ranks_from_scores(scores, np.array([2, 3, 2])).tolist() == [2, 4, 1]


def test_overall_is_per_user_over_all_users():
    result = rank_and_overall([1, 2, 7], total_users=10)
    rank, overall = result["rank"], result["overall"]
    assert rank["recall@5"] == pytest.approx(2 / 3) and overall["recall@5"] == pytest.approx(2 / 10)
    assert overall["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(8)) / 10)
    assert overall["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 7) / 10)


def test_ablation_variants():
    configs = variant_overrides(["full", "wo_all_align", "nid", "oid_wo_align", "wo_intent"])
    assert configs["full"] == [] and stages_for(configs["full"]) == ["tasks", "train", "evaluate"]
    assert set(configs["wo_all_align"]) == {"--use_index_to_preference=false", "--use_preference_to_index=false",
                                            "--use_history_to_index=false", "--use_rating=false", "--use_intent=false"}
    assert stages_for(configs["nid"]) == ["index", "tasks", "train", "evaluate"] and "--index_scheme=nid" in configs["nid"]
    assert "--index_scheme=oid" in configs["oid_wo_align"] and "--use_rating=false" in configs["oid_wo_align"]
    assert configs["wo_intent"] == ["--use_intent=false"]
    assert {"nid", "oid", "pid_wo_align", "nid_wo_align"} <= set(VARIANTS)
    with pytest.raises(UlmrecError, match="unknown variants"):
        variant_overrides(["w/o everything"])


def test_evaluate_writes_both_metric_kinds(tiny_pipeline):
    summary = read_json(tiny_pipeline / "eval" / "metrics.json")
    assert summary["candidate_order"] == "shuffled"
    assert set(summary["metrics"]) == {"ulmrec", "ulmrec_uid_only", "retriever"}
    for m in summary["metrics"].values():
        assert m["overall"]["ndcg@10"] == pytest.approx(m["rank"]["ndcg@10"] * summary["users_in_candidates"] / summary["users"])
    table = (tiny_pipeline / "eval" / "table.md").read_text()
    assert "| ulmrec |" in table and "| retriever |" in table and "overall ndcg@10" in table


def test_zero_shot_evaluation_scores_the_base_model(tmp_path, tiny_pipeline, tiny_llm):
    """No adapter: LlamaRec-style prompts (no user field) scored by the base LLM's letter logits, on the trained run's users."""
    import shutil

    from transformers import AutoModelForCausalLM

    from ulmrec_hf.cli import run_stage
    from ulmrec_hf.llm import load_tokenizer

    for name in ("data", "retriever", "preferences"):
        shutil.copytree(tiny_pipeline / name, tmp_path / name)
    r = ["--run_dir", str(tmp_path)]
    run_stage("index", r + ["--index_scheme", "none"])
    run_stage("tasks", r + ["--model_name_or_path", tiny_llm, "--max_length", "768", "--history_len", "5", "--max_eval_users", "60"])
    run_stage("evaluate", r + ["--zero_shot", "true"])
    summary, trained = read_json(tmp_path / "eval" / "metrics.json"), read_json(tiny_pipeline / "eval" / "metrics.json")
    assert summary["ranker"].startswith("zero-shot") and not (tmp_path / "ranker").exists()
    assert set(summary["metrics"]) == {"ulmrec", "retriever"}  # no uid-only prompts without a user field
    assert summary["metrics"]["retriever"] == trained["metrics"]["retriever"]
    per_user = datasets.load_from_disk(str(tmp_path / "eval" / "per_user"))
    prompts = datasets.load_from_disk(str(tmp_path / "tasks" / "next_item_test"))
    assert not any("User:" in p for p in prompts["prompt"]) and not (tmp_path / "tasks" / "next_item_test_uid_only").exists()
    letters = read_json(tmp_path / "tasks" / "mixture.json")["letter_token_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_llm)
    user = per_user["user_id"][0]
    expected = naive_scores(base, load_tokenizer(tiny_llm), [prompts[prompts["user_id"].index(user)]["prompt"]], letters)[0]
    np.testing.assert_allclose(per_user["scores"][0], expected, rtol=1e-4, atol=1e-4)


def test_recommend_matches_evaluate_order(tiny_pipeline):
    from ulmrec_hf.recommend import recommend_users

    per_user = datasets.load_from_disk(str(tiny_pipeline / "eval" / "per_user"))
    tests = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_test"))
    users = per_user["user_id"][:3]
    ranked = recommend_users(str(tiny_pipeline), [str(u) for u in users])
    for u, result in zip(users, ranked):
        row = per_user[per_user["user_id"].index(u)]
        cands = tests[tests["user_id"].index(u)]["candidates"]
        expected = [cands[i] for i in np.argsort(-np.array(row["scores"]), kind="stable")]
        assert [item for item, _, _ in result] == expected


def test_recommend_serves_users_the_retriever_missed(tiny_pipeline, capsys):
    from ulmrec_hf.recommend import RecommendArguments
    from ulmrec_hf.recommend import main as recommend

    test = datasets.load_from_disk(str(tiny_pipeline / "retriever" / "candidates" / "test"))
    missed = next(r for r in test if r["target_rank"] is None)
    users = datasets.load_from_disk(str(tiny_pipeline / "data"))["users"]
    name = users[users["user_id"].index(missed["user_id"])]["user"]
    (ranked,) = recommend(RecommendArguments(run_dir=str(tiny_pipeline), user=[name], top_k=3))
    assert sorted(item for item, _, _ in ranked) == sorted(missed["candidates"])
    assert capsys.readouterr().out.count("score") == 3
    with pytest.raises(UlmrecError, match="unknown user"):
        recommend(RecommendArguments(run_dir=str(tiny_pipeline), user=["nobody"]))


def test_push_dry_run_folders_reload(tiny_pipeline):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ulmrec_hf.push import PushArguments
    from ulmrec_hf.push import main as push

    out = push(PushArguments(run_dir=str(tiny_pipeline), dry_run=True))
    model_dir, data_dir = out / "model", out / "dataset"
    config = read_json(model_dir / "ranker_config.json")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(config["base_model"])
    base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, model_dir).eval()
    prompts = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_test"))["prompt"][:4]
    reference, ref_tok, _ = load_ranker(tiny_pipeline / "ranker")
    np.testing.assert_allclose(score_prompts(model, tokenizer, prompts, config["letter_token_ids"]),
                               score_prompts(reference, ref_tok, prompts, config["letter_token_ids"]), atol=1e-5)
    assert (model_dir / "README.md").read_text().startswith("---\nbase_model:")
    users = datasets.load_dataset(str(data_dir), "users", split="train")
    assert len(users) == 200 and datasets.load_from_disk(str(data_dir / "data"))["users"].num_rows == 200
    assert len(datasets.load_dataset(str(data_dir), "user_index", split="train")) == 200
    assert len(datasets.load_dataset(str(data_dir), "preferences", split="train")) == 200


def test_push_without_token_is_one_clear_error(tiny_pipeline, monkeypatch, tmp_path):
    from ulmrec_hf.push import PushArguments
    from ulmrec_hf.push import main as push

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UlmrecError, match="no Hugging Face token"):
        push(PushArguments(run_dir=str(tiny_pipeline), model_repo="someone/ulmrec-test"))


def test_explain_generates_from_an_index(tiny_pipeline, capsys):
    from ulmrec_hf.recommend import ExplainArguments, explain

    index = datasets.load_from_disk(str(tiny_pipeline / "user_index" / "index"))["index"][0]
    text = explain(ExplainArguments(run_dir=str(tiny_pipeline), index=index[: index.index(">") + 1], max_new_tokens=5))
    assert isinstance(text, str) and capsys.readouterr().out.startswith(index[: index.index(">") + 1])


def test_gpu_speed_script_runs_on_a_tiny_config(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_speed.py"
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--tokens", "64", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["shape"] == "tiny" and result["ranking_users_per_s"] > 0 and result["lora_training_tokens_per_s"] > 0
