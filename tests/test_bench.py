"""The GPU benchmark scripts, run at tiny sizes on the CPU so that they are ready when a GPU is lent."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_gpu_speed_runs_every_row_on_a_tiny_config(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_speed.py"), "--tiny", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["shape"] == "tiny" and r["device"] == "CPU"
    for key in ("prefix_reuse_off", "prefix_reuse_on"):
        assert r["rank_bf16"][key]["users_per_s"] > 0 and 0 < r["rank_bf16"][key]["fraction_of_floor"]
    assert r["rank_bf16"]["memory_accounting"]["batch_kv_cache_gib_with_prefix_reuse"] > 0
    assert r["rank_4bit"]["users_per_s"] > 0 and r["train_bf16"]["tokens_per_s"] > 0 and r["train_qlora"]["tokens_per_s"] > 0
    assert set(r["smollm2_trainer"]) == {"batch16_padded", "batch64_padded", "batch64_padding_free"}
    assert all(v["samples_per_s"] > 0 for v in r["smollm2_trainer"].values())
    assert all(v["s_per_epoch"] > 0 for v in r["lrurec"].values())
    assert "| ranking bf16, prefix_reuse_off |" in proc.stdout


def test_gpu_beauty_dry_run(tmp_path):
    out = tmp_path / "gpu_beauty.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_beauty.py"), "--dry_run", "--runs", str(tmp_path / "runs"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    r = json.loads(out.read_text())
    assert r["dry_run"] and not r["stopped_at_deadline"] and set(r["results"]) == {"llamarec", "zero_shot", "ulmrec_pid"}
    for name, v in r["results"].items():
        assert v["finished"][-1] == "evaluate" and v["metrics"]["protocol"]["name"] == "paper"
        assert set(v["metrics"]["test"]) >= {"ranker", "fused", "retriever"} and v["wall_s"]["evaluate"] >= 0
        assert (tmp_path / "runs" / f"{name}.log").exists()
    llamarec, pid = r["results"]["llamarec"], r["results"]["ulmrec_pid"]
    assert llamarec["rows"]["next_item_samples"] == 2 * pid["rows"]["next_item_samples"] == r["steps"] * r["batch"]
    assert pid["rows"]["train_samples"] > pid["rows"]["next_item_samples"] and llamarec["train"]["steps"] > 0
    assert r["options"]["llamarec"]["train"]["next_item_loss"] == "lm"
    table = r["table"]
    assert {"LRURec (retriever order)", "zero_shot", "llamarec + LRURec fused", "ulmrec_pid uid-only"} <= set(table)
    assert table["llamarec"]["vs_llamarec"]["diff"] == 0 and len(table["ulmrec_pid"]["vs_lrurec"]["ci95"]) == 2
    assert "| llamarec + LRURec fused" in out.with_suffix(".md").read_text()


def load_script(name: str):
    """A bench script as a module; its folder goes on the path, as running it does (for bench_common)."""
    import importlib.util

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_beauty_quality_paired_interval_and_table():
    bq = load_script("beauty_quality")
    base = {"u1": 0.5, "u2": 0.0, "u3": 1.0, "u4": 0.25}
    better = {"u1": 0.6, "u2": 0.2, "u3": 1.0, "u4": 0.25}  # differences 0.1, 0.2, 0, 0: mean 0.075, sd 0.0957
    p = bq.paired(better, base)
    assert p["mean"] == 0.5125 and p["diff"] == 0.075
    assert p["ci95"] == [round(0.075 - 1.96 * 0.095743 / 2, 4), round(0.075 + 1.96 * 0.095743 / 2, 4)]
    assert bq.paired(base, base) == {"mean": 0.4375, "diff": 0.0, "ci95": [0.0, 0.0]}
    metric = {"ndcg@10": 0.4, "recall@10": 0.7, "mrr@10": 0.3}
    row = lambda w, old: {"rank": metric, "overall": metric, "fusion_weight": w, "vs_lrurec": p, "vs_llamarec": p,  # noqa: E731
                          "tied_gold_users": 3, "v0.2.0_rank_ndcg@10": old, "old_rule_rank_ndcg@10": old and 0.41}
    summary = {"test_users": {"users": 100, "all_users": 200, "in_candidates": 13}, "validation_users": {"users": 50, "in_candidates": 7},
               "eval_seed": 42, "training": {"llamarec": {"all_rows": 400, "next_item_rows": 400}, "ulmrec_pid": {"all_rows": 520, "next_item_rows": 400}},
               "prompt": {"history_len": 5, "title_max_tokens": 16}, "wall_s_total": 600, "tie_rule": "stable by shown order",
               "user_text": {"preferences": "training interactions only", "index": "training interactions only"},
               "paper_metrics": {"rank_subset": {"test_NDCG@10": 0.4445}, "overall": {"test_NDCG@10": 0.0585}},
               "results": {"paper": {"LRURec order": row(None, None), "ulmrec_pid + LRURec fused": row(0.35, 0.4161)}},
               "selection": {"ulmrec_pid": {"steps": [{"step": "loss", "chosen": "b", "candidates": {
                   "a": {"ndcg@10": 0.3, "diff_vs_incumbent": 0.0, "paired_se": 0.0}, "b": {"ndcg@10": 0.35, "diff_vs_incumbent": 0.05, "paired_se": 0.01}}}]}},
               "chosen": {"paper": {"ULMRec": {**row(None, None), "vs_llamarec_equal_rows": None}}}, "pending": ["chosen/paper/llamarec_x4"]}
    table = bq.markdown(summary)
    assert "400 next-item + 120 alignment rows" in table and "total wall time 10 min" in table
    assert "| ulmrec_pid + LRURec fused (w=0.35) | 0.4000 | 0.4100 | 0.4161 | 3 | 0.7000 | 0.3000 | 0.4000 | +0.0750 [" in table
    assert "| LRURec order | 0.4000 | — | — | 3 |" in table and "ties: stable by shown order" in table
    assert "rank N@10 0.4445, overall N@10 0.0585" in table
    assert "| ulmrec_pid | loss | b | 0.3500 | +0.0500 (0.0100) | **yes** |" in table and "| ulmrec_pid | loss | a | 0.3000 |" in table
    assert "| ULMRec | 0.4000 | 3 | 0.7000 | 0.3000 | 0.4000 | — | +0.0750 [" in table and table.rstrip().endswith("| — |")
    assert "Not finished yet: chosen/paper/llamarec_x4." in table


def test_beauty_quality_options_change_only_past_one_paired_standard_error():
    import numpy as np

    bq = load_script("beauty_quality")
    rng = np.random.default_rng(0)
    base = rng.random(400)
    noise = base + rng.normal(0, 0.1, 400)
    noise -= noise.mean() - base.mean() - 0.002  # +0.002 on average: inside one paired standard error (about 0.005) of this noise
    clear = base + 0.05 + rng.normal(0, 0.01, 400)
    chosen, record = bq.challenge("paper", {"paper": base, "noisy": noise})
    assert chosen == "paper" and abs(record["noisy"]["diff_vs_incumbent"]) <= record["noisy"]["paired_se"]
    chosen, record = bq.challenge("paper", {"paper": base, "noisy": noise, "clear": clear, "worse": base - 0.05})
    assert chosen == "clear" and record["clear"]["diff_vs_incumbent"] == round(0.05 + float((clear - base - 0.05).mean()), 4)
    assert record["paper"] == {"ndcg@10": round(float(base.mean()), 4), "diff_vs_incumbent": 0.0, "paired_se": 0.0}


def test_beauty_quality_reads_each_protocols_candidate_orders():
    bq = load_script("beauty_quality")
    chosen = {"llamarec": {"steps": [{"step": "loss", "chosen": "x"}, {"step": "eval_permutations (paper)", "chosen": "1"},
                                     {"step": "eval_permutations (shuffled)", "chosen": "3"}]}}
    assert [bq.orders(chosen, "llamarec", p) for p in ("paper", "shuffled")] == [1, 3]
    assert bq.eval_flags("llamarec", chosen, "shuffled") == ["--eval_permutations", "3", "--uid_only", "false"]
