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
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dry_run"] and set(r["results"]) == {"llamarec", "zero_shot", "ulmrec_paper_index", "ulmrec_pid"}
    for name, v in r["results"].items():
        assert set(v["metrics"]["test"]) >= {"ranker", "fused", "retriever"} and v["metrics"]["protocol"]["name"] == "paper"
    assert r["results"]["ulmrec_pid"]["train_samples"] > r["results"]["llamarec"]["train_samples"]
    assert r["results"]["ulmrec_pid"]["next_item_samples"] == r["results"]["llamarec"]["next_item_samples"]
    assert "| llamarec + LRURec fused" in out.with_suffix(".md").read_text()
