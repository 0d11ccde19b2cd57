import shutil

import datasets
import numpy as np
import pytest

from ulmrec_hf.common import UlmrecError, read_json
from ulmrec_hf.evaluate import FUSION_WEIGHTS, choose_weight, ranks
from ulmrec_hf.metrics import agreement, fuse, ranking_order
from ulmrec_hf.ranker import naive_scores
from ulmrec_hf.runner import run_stage


def test_fusion_with_weight_zero_is_the_retriever_ranking(tiny_pipeline):
    test = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_test"))
    per_user = datasets.load_from_disk(str(tiny_pipeline / "eval" / "per_user"))["test"]
    fused = ranks(fuse(np.array(test["retriever_scores"]), np.array(per_user["scores"]), 0.0), np.array(test["target_position"]))
    assert fused == test["retriever_rank"]
    order = np.argsort(-fuse(np.array(test["retriever_scores"]), np.array(per_user["scores"]), 0.0), axis=1, kind="stable")
    by_user = {r["user_id"]: r["candidates"] for r in datasets.load_from_disk(str(tiny_pipeline / "retriever" / "candidates" / "test"))}
    for row, o in zip(test, order):
        assert [row["candidates"][i] for i in o] == by_user[row["user_id"]]  # the whole list, not just the target


def test_weight_is_chosen_on_validation():
    rng = np.random.default_rng(0)
    retriever = rng.normal(size=(200, 20))
    gold = rng.integers(0, 20, size=200)
    helpful = rng.normal(size=(200, 20))
    helpful[np.arange(200), gold] += 3.0  # an LLM that knows the answer
    w, choice = choose_weight(FUSION_WEIGHTS, retriever, helpful, gold)
    curve, se = choice["curve"], choice["paired_se_vs_best"]
    assert w > 0 and curve[str(w)] > curve["0.0"] + 0.2
    assert curve[str(w)] >= curve[str(choice["best"])] - se[str(w)]  # within one standard error of the best ...
    smaller = [x for x in FUSION_WEIGHTS if x < w]
    assert all(curve[str(x)] < max(curve[str(choice["best"])] - se[str(x)], curve["0.0"]) for x in smaller)  # ... the smallest such w
    w, choice = choose_weight(FUSION_WEIGHTS, retriever, -helpful, gold)
    assert w == 0.0 and choice["best"] == 0.0
    noise = rng.normal(size=(200, 20))  # an LLM that knows nothing: any gain is noise, so the retriever alone
    assert choose_weight(FUSION_WEIGHTS, retriever, noise, gold)[0] == 0.0
    with pytest.raises(UlmrecError, match="must include 0"):
        choose_weight([0.5, 1.0], retriever, helpful, gold)


def test_evaluate_never_tunes_the_weight_on_test(tmp_path, tiny_pipeline, copy_stages):
    summary = read_json(tiny_pipeline / "eval" / "metrics.json")
    per_user = datasets.load_from_disk(str(tiny_pipeline / "eval" / "per_user"))
    validation = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_validation"))
    w, choice = choose_weight(FUSION_WEIGHTS, np.array(validation["retriever_scores"]), np.array(per_user["validation"]["scores"]),
                              np.array(validation["target_position"]))
    assert (summary["fusion"]["weight"], summary["fusion"]["validation_ndcg@10_by_weight"]) == (w, choice["curve"])
    # the same run with the test rows' retriever scores turned upside down: test metrics change, the weight does not
    run = copy_stages(tiny_pipeline, tmp_path, ("prepare", "retrieve", "preferences", "index", "tasks", "train"))
    test = datasets.load_from_disk(str(run / "tasks" / "next_item_test"))
    test.map(lambda r: {"retriever_scores": [-s for s in r["retriever_scores"]]}).save_to_disk(str(tmp_path / "flipped"))
    shutil.rmtree(run / "tasks" / "next_item_test")
    shutil.move(tmp_path / "flipped", run / "tasks" / "next_item_test")
    run_stage("evaluate", ["--run_dir", str(run), "--uid_only", "false"])
    again = read_json(run / "eval" / "metrics.json")
    assert again["fusion"] == summary["fusion"]
    assert again["test"]["fused"] != summary["test"]["fused"] and again["test"]["retriever"] == summary["test"]["retriever"]


def test_a_tied_gold_score_gets_the_documented_rank_in_evaluate():
    """Ties keep the shown order: a gold tied with an earlier candidate ranks after it, with a later one before it."""
    from ulmrec_hf.evaluate import split_metrics

    scores = np.array([[0.5, 0.9, 0.9, 0.1], [0.9, 0.9, 0.2, 0.1], [0.3, 0.3, 0.3, 0.3]], dtype=np.float32)
    data = {"target_position": [2, 0, 3], "retriever_scores": [[4.0, 3.0, 2.0, 1.0]] * 3, "retriever_rank": [3, 1, 4]}
    assert ranks(scores, np.array(data["target_position"])) == [2, 1, 4]
    m = split_metrics(data, scores, 0.0, total_users=3)
    assert m["ranker"]["tied_gold_users"] == 3 and m["retriever"]["tied_gold_users"] == 0
    assert m["ranker"]["rank"]["mrr@5"] == pytest.approx((1 / 2 + 1 + 1 / 4) / 3)


def test_integer_fusion_weights_are_accepted():
    rng = np.random.default_rng(1)
    retriever, letters, gold = rng.normal(size=(50, 20)), rng.normal(size=(50, 20)), rng.integers(0, 20, size=50)
    w, choice = choose_weight([0, 1, 2], retriever, letters, gold)
    assert isinstance(w, float) and set(choice["curve"]) == {"0.0", "1.0", "2.0"} and str(float(choice["best"])) in choice["curve"]


def test_evaluate_writes_validation_test_and_every_row(tiny_pipeline):
    summary = read_json(tiny_pipeline / "eval" / "metrics.json")
    assert summary["protocol"]["name"] == "paper" and summary["protocol"]["eval_order"] == "retriever"
    assert set(summary["test"]) == {"ranker", "fused", "retriever", "ranker_uid_only", "ranker_uid_only_swapped_index", "random_order"}
    assert set(summary["validation"]) >= {"ranker", "fused", "retriever", "untrained_rank_ndcg@10"}
    users = summary["users"]["test"]
    for m in summary["test"].values():
        assert m["overall"]["ndcg@10"] == pytest.approx(m["rank"]["ndcg@10"] * users["in_candidates"] / users["users"])
    assert summary["validation"]["fused"]["rank"]["ndcg@10"] >= summary["validation"]["retriever"]["rank"]["ndcg@10"]
    table = (tiny_pipeline / "eval" / "table.md").read_text()
    assert "| ranker |" in table and "| retriever |" in table and f"| fused (w={summary['fusion']['weight']:g}) |" in table
    assert "validation rank NDCG@10" in table and "untrained" in table


def test_zero_shot_evaluation_scores_the_base_model(tmp_path, tiny_pipeline, tiny_llm, copy_stages, tasks_flags):
    """No adapter: LlamaRec-style prompts (no user field) scored by the base LLM's letter logits."""
    from transformers import AutoModelForCausalLM

    from ulmrec_hf.llm import load_tokenizer

    run = copy_stages(tiny_pipeline, tmp_path, ("prepare", "retrieve", "preferences"))
    run_stage("index", ["--run_dir", str(run), "--scheme", "none"])
    run_stage("tasks", tasks_flags(run))
    run_stage("evaluate", ["--run_dir", str(run), "--zero_shot", "true"])
    summary, trained = read_json(run / "eval" / "metrics.json"), read_json(tiny_pipeline / "eval" / "metrics.json")
    assert summary["ranker"].startswith("zero-shot") and not (run / "ranker").exists()
    assert set(summary["test"]) == {"ranker", "fused", "retriever"}  # no uid-only prompts without a user field
    assert summary["test"]["retriever"] == trained["test"]["retriever"]
    per_user = datasets.load_from_disk(str(run / "eval" / "per_user"))["test"]
    prompts = datasets.load_from_disk(str(run / "tasks" / "next_item_test"))
    assert not any("User:" in p for p in prompts["prompt"])
    letters = read_json(run / "tasks" / "mixture.json")["letter_token_ids"]
    expected = naive_scores(AutoModelForCausalLM.from_pretrained(tiny_llm), load_tokenizer(tiny_llm), prompts["prompt"][:3], letters)
    np.testing.assert_allclose(per_user["scores"][:3], expected, rtol=1e-4, atol=1e-4)


def test_a_qlora_ranker_is_evaluated_on_its_4bit_base(qlora_run):
    from ulmrec_hf.ranker import load_ranker, score_prompts

    config = read_json(qlora_run / "ranker" / "ranker_config.json")
    assert config["quantization"] == "4bit-nf4" and config["double_quantization"] is True and config["dtype"] == "bfloat16"
    run_stage("evaluate", ["--run_dir", str(qlora_run), "--uid_only", "false"])
    summary = read_json(qlora_run / "eval" / "metrics.json")
    assert summary["loaded_as"] == "as trained (4bit-nf4, bfloat16)" and summary["validation_scores"].startswith("from training")
    trained = np.array(read_json(qlora_run / "ranker" / "validation_scores.json")["scores"], dtype=np.float32)  # the trainer's own
    model, tokenizer, config = load_ranker(qlora_run / "ranker")  # what evaluate loads
    prompts = datasets.load_from_disk(str(qlora_run / "tasks" / "next_item_validation"))["prompt"]
    # bf16 activations of the 4-bit base move by up to ~2e-3 with a batch's padding (the trainer batches in dataset order,
    # scoring by length); the float32 letter product no longer rounds that away
    again = score_prompts(model, tokenizer, prompts, config["letter_token_ids"])
    np.testing.assert_allclose(again, trained, atol=5e-3, rtol=0)
    assert (ranking_order(again) == ranking_order(trained)).all(1).mean() >= 0.95  # the same order for (nearly) every user
    check = read_json(qlora_run / "ranker" / "train_metrics.json")["reload_check"]
    np.testing.assert_array_equal(score_prompts(model, tokenizer, check["prompts"], config["letter_token_ids"]),
                                  np.array(check["scores"], dtype=np.float32))


def test_merging_records_its_agreement_with_the_trained_model(tmp_path, qlora_run, copy_stages):
    run = copy_stages(qlora_run, tmp_path, ("prepare", "retrieve", "preferences", "index", "tasks", "train"))
    run_stage("evaluate", ["--run_dir", str(run), "--uid_only", "false", "--merge_adapter", "true"])
    summary = read_json(run / "eval" / "metrics.json")
    a = summary["merge_agreement"]
    assert summary["loaded_as"] == "merged-bfloat16" and a["compared_with"] == "as trained (4bit-nf4, bfloat16)"
    assert summary["validation_scores"] == "scored here"  # the merged model is another model: nothing reused
    assert a["users"] == summary["users"]["validation"]["in_candidates"]
    assert 0.0 <= a["top10_identical"] <= a["top10_same_set"] <= 1.0 and 0.0 <= a["top1_identical"] <= 1.0
    assert "merged bf16 vs as trained" in (run / "eval" / "table.md").read_text()
    with pytest.raises(UlmrecError, match="no adapter to merge"):
        run_stage("evaluate", ["--run_dir", str(run), "--zero_shot", "true", "--merge_adapter", "true", "--overwrite"])


def test_agreement_counts_identical_orders():
    a = np.array([[3.0, 2.0, 1.0] + [0.0] * 9, [1.0, 2.0, 3.0] + [0.0] * 9])
    b = np.array([[3.0, 2.0, 1.0] + [0.0] * 9, [1.0, 3.0, 2.0] + [0.0] * 9])
    assert agreement(a, b) == {"users": 2, "top1_identical": 0.5, "top10_identical": 0.5, "top10_same_set": 1.0}


def test_a_ranker_trained_on_other_tasks_is_refused_unless_given_explicitly(tmp_path, tiny_pipeline, copy_stages, tasks_flags):
    run = copy_stages(tiny_pipeline, tmp_path, ("prepare", "retrieve", "preferences", "index", "tasks", "train"))
    run_stage("tasks", tasks_flags(run, "--history_len", "3", "--overwrite"))
    with pytest.raises(UlmrecError, match="was trained on other tasks"):
        run_stage("evaluate", ["--run_dir", str(run), "--uid_only", "false"])
    run_stage("evaluate", ["--run_dir", str(run), "--uid_only", "false", "--ranker", str(tiny_pipeline / "ranker")])
    summary = read_json(run / "eval" / "metrics.json")
    assert summary["ranker"] == str(tiny_pipeline / "ranker")
    assert read_json(run / "eval" / "_COMPLETE")["settings"]["ranker_fingerprint"]
