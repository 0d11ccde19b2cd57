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
               "chosen": {"paper": {"ULMRec": {**row(None, None), "vs_llamarec_equal_rows": None}}}, "pending": ["chosen/paper/llamarec_x4"],
               "contrasts": {"paper": [{"row": "ULMRec", "baseline": "ULMRec, no alignment", "measures": "the alignment tasks", **p}]},
               "wall_s": {"paper/llamarec/train": 1000.0, "chosen/paper/llamarec_x4/train": 150.0, "chosen/paper/llamarec_x4/evaluate": 30.0},
               "chosen_training": {"llamarec_x4": {"run": "chosen/paper/llamarec_x4", "next_item_rows": 1600, "all_rows": 1600, "steps": 400,
                                                   "options": {"next_item_loss": "lm"}, "options_chosen_on": "llamarec's validation (its part-2 rows; not validated again)"}}}
    table = bq.markdown(summary)
    assert "400 next-item + 120 alignment rows" in table and "total wall time 10 min" in table
    assert "| ulmrec_pid + LRURec fused (w=0.35) | 0.4000 | 0.4100 | 0.4161 | 3 | 0.7000 | 0.3000 | 0.4000 | +0.0750 [" in table
    assert "| LRURec order | 0.4000 | — | — | 3 |" in table and "ties: stable by shown order" in table
    assert "rank N@10 0.4445, overall N@10 0.0585" in table
    assert "| ulmrec_pid | loss | b | 0.3500 | +0.0500 (0.0100) | **yes** |" in table and "| ulmrec_pid | loss | a | 0.3000 |" in table
    assert "| ULMRec | 0.4000 | 3 | 0.7000 | 0.3000 | 0.4000 | — | — | +0.0750 [" in table
    assert "| llamarec_x4 | chosen/paper/llamarec_x4 | 1600 | 1600 | 400 | next_item_loss=lm | llamarec's validation (its part-2 rows; not validated again) |" in table
    assert "| ULMRec − ULMRec, no alignment | the alignment tasks | +0.0750 [-0.0188, +0.1688] |\n" in table
    # part 3's own stage seconds only: part 1's training is not counted again
    assert "| chosen/paper/llamarec_x4/train | 150 |\n| chosen/paper/llamarec_x4/evaluate | 30 |" in table and "paper/llamarec/train" not in table
    assert "Part 3 in all: 3 min" in table
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
    assert bq.eval_flags("llamarec", "llamarec", chosen, "shuffled") == ["--eval_permutations", "3", "--uid_only", "false"]


def fake_selection(k_shuffled_llamarec: int = 1) -> dict:
    """A part-2 record: LlamaRec-style and zero-shot keep the paper's options, ULMRec takes letters + sample."""
    steps = lambda k: [{"step": "eval_permutations (paper)", "chosen": "1"}, {"step": "eval_permutations (shuffled)", "chosen": str(k)}]  # noqa: E731
    ulmrec = {"next_item_loss": "letters", "loss_normalization": "sample", "index_token_init": "mean"}
    return {"llamarec": {"options": {"next_item_loss": "lm", "loss_normalization": "token", "index_token_init": "mean"}, "run": "paper/llamarec",
                         "steps": steps(k_shuffled_llamarec)},
            "ulmrec_pid": {"options": ulmrec, "run": "select/ulmrec_pid/x", "steps": steps(1)},
            "zero_shot": {"options": {"next_item_loss": "lm", "loss_normalization": "token", "index_token_init": "mean"}, "run": "paper/zero_shot",
                          "steps": steps(1)}}


def test_beauty_quality_gives_the_gpu_bench_what_validation_chose():
    bq, gb = load_script("beauty_quality"), load_script("gpu_beauty")
    options = bq.gpu_options(fake_selection())
    assert options["ulmrec_pid"] == {"evaluate": {"eval_permutations": 1},
                                     "train": {"next_item_loss": "letters", "loss_normalization": "sample", "index_token_init": "mean"}}
    assert options["zero_shot"] == {"evaluate": {"eval_permutations": 1}}
    merged = gb.merged(gb.OPTIONS, options)  # as gpu_beauty.py --options reads them
    assert gb.option_flags(merged, "ulmrec_pid", "train") == ["--next_item_loss", "letters", "--loss_normalization", "sample", "--index_token_init", "mean"]
    assert gb.option_flags(merged, "llamarec", "train") == ["--next_item_loss", "lm", "--loss_normalization", "token", "--index_token_init", "mean"]


def test_beauty_quality_part_three_scores_each_test_row_once(monkeypatch, tmp_path):
    bq = load_script("beauty_quality")
    calls = []
    monkeypatch.setattr(bq, "RUNS", tmp_path)
    monkeypatch.setattr(bq, "link_shared", lambda *a: None)
    monkeypatch.setattr(bq, "stage", lambda name, run, flags: calls.append((str(run.relative_to(tmp_path)), name, flags)))
    pairs = []
    monkeypatch.setattr(bq, "protocol_pair", lambda base, root, name, model, tasks, train, evaluate: pairs.append((name, model, train, evaluate)))
    bq.chosen_runs(tmp_path / "base", fake_selection(k_shuffled_llamarec=3), [], [])
    # LlamaRec-style and zero-shot with the paper's options and one order are part 1's evaluations: not scored again,
    # except LlamaRec-style in the shuffled protocol, where validation chose 3 orders.
    assert [(run, name) for run, name, _ in calls] == [("chosen/shuffled/llamarec", "evaluate"), ("chosen/paper/ulmrec_pid", "evaluate"),
                                                        ("chosen/shuffled/ulmrec_pid", "evaluate")]
    assert calls[0][2][-4:] == ["--eval_permutations", "3", "--uid_only", "false"] and calls[1][2][-2:] == ["--uid_only", "true"]
    assert {name for name, *_ in pairs} == {"ulmrec_no_align", "llamarec_x4", "ulmrec_pid_x4"}
    for name, model, train, evaluate in pairs:  # only ULMRec's main row scores the uid-only prompts
        assert all(flags[-2:] == ["--uid_only", "false"] for flags in evaluate.values())
        assert ("letters" in train) == (model == "ulmrec_pid") and "--save_steps" in train


def fake_evaluation(run: Path, seed: int, uid_only: bool = False, scoring: bool = True) -> dict:
    """A finished evaluate folder with 30 test users' ranks; the per-user ranks it wrote."""
    import datasets
    import numpy as np

    from ulmrec_hf.layout import COMPLETE, RunDir

    r, rng = RunDir(run), np.random.default_rng(seed)
    columns = {"rank": rng.integers(1, 21, 30), "fused_rank": rng.integers(1, 21, 30), "retriever_rank": np.random.default_rng(0).integers(1, 21, 30)}
    if uid_only:
        columns |= {c: rng.integers(1, 21, 30) for c in ("rank_uid_only", "rank_uid_only_swapped_index", "rank_random_order")}
    r.path("evaluate").mkdir(parents=True)
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"user_id": list(range(30)), **{k: v.tolist() for k, v in columns.items()}})}).save_to_disk(str(r.eval_per_user))
    metric = {"rank": {"ndcg@10": 0.3, "recall@10": 0.5, "mrr@10": 0.2}, "overall": {"ndcg@10": 0.04}, "tied_gold_users": 0}
    test = {"ranker": metric, "fused": metric, "retriever": metric}
    if uid_only:
        test |= {"ranker_uid_only": metric, "ranker_uid_only_swapped_index": {**metric, "users_shown_their_own_index": 0}, "random_order": metric}
    fusion = {"weight": 0.0, "best_weight": 0.1, "validation_ndcg@10_by_weight": {"0.0": 0.4, "0.1": 0.41, "0.2": 0.38},
              "paired_se_vs_best": {"0.0": 0.02, "0.1": 0.0, "0.2": 0.01}, "chosen_on": "the smallest w within one paired standard error of the best"}
    metrics = {"test": test, "validation": {"ranker": {"rank": {"ndcg@10": 0.25}}}, "fusion": fusion}
    if scoring:
        metrics["scoring"] = {"eval_permutations": 1, "seconds": {"validation": 5.0, "test": 7.0, "test uid_only": 3.0, "test uid_only_swapped_index": 3.0}}
    r.eval_metrics_file.write_text(json.dumps(metrics))
    (r.path("evaluate") / COMPLETE).write_text("{}")
    return {k: v.tolist() for k, v in columns.items()}


def test_beauty_quality_chosen_table_from_finished_runs(monkeypatch, tmp_path):
    import numpy as np

    bq = load_script("beauty_quality")
    monkeypatch.setattr(bq, "RUNS", tmp_path)
    monkeypatch.setattr(bq, "SELECTION", tmp_path / "selection.json")
    monkeypatch.setattr(bq, "WALL", tmp_path / "wall_s.json")
    partial = fake_selection()
    del partial["zero_shot"]  # part 2 still running: the report waits for it instead of failing
    bq.SELECTION.write_text(json.dumps(partial))
    assert bq.chosen_table(bq.read_selection()) == ({}, {}, ["the selection (part 2)"])
    bq.SELECTION.write_text(json.dumps(fake_selection()))
    bq.WALL.write_text(json.dumps({"paper/zero_shot/evaluate": 527.0}))
    ranks = {}
    for i, (protocol, name) in enumerate((p, n) for p in bq.PROTOCOLS for n in bq.CHOSEN.values()):
        if (protocol, name) == ("shuffled", "llamarec_x4"):
            continue  # not finished yet
        root = tmp_path if name in ("zero_shot", "llamarec") else tmp_path / "chosen"  # part 1's runs serve the rows it scored
        ranks[protocol, name] = fake_evaluation(root / protocol / name, i, uid_only=name == "ulmrec_pid", scoring=root != tmp_path)
    ndcg = lambda column: {u: (1 / np.log2(r + 1) if r <= 10 else 0.0) for u, r in enumerate(column)}  # noqa: E731
    rows, contrasts, pending = bq.chosen_table(bq.read_selection())
    assert pending == ["chosen/shuffled/llamarec_x4"]
    paper = rows["paper"]
    assert set(paper) == {"LRURec order", *(f"{label}{fused}" for label in bq.CHOSEN for fused in ("", " + LRURec fused")), *bq.UID_ROWS.values()}
    x4 = paper["ULMRec, 4x rows"]
    assert x4["llamarec_row"] == "LlamaRec-style, 4x rows" and rows["shuffled"]["ULMRec, 4x rows"]["vs_llamarec_equal_rows"] is None
    assert x4["vs_llamarec_equal_rows"] == bq.paired(ndcg(ranks["paper", "ulmrec_pid_x4"]["rank"]), ndcg(ranks["paper", "llamarec_x4"]["rank"]))
    uid = ranks["paper", "ulmrec_pid"]
    own = next(c for c in contrasts["paper"] if c["measures"].startswith("the user's own index"))
    assert own == {**bq.paired(ndcg(uid["rank_uid_only"]), ndcg(uid["rank_uid_only_swapped_index"])), "row": bq.UID_ROWS["uid_only"],
                   "baseline": bq.UID_ROWS["uid_only_swapped_index"], "measures": own["measures"]}
    assert len(contrasts["paper"]) == len(bq.CONTRASTS) and len(contrasts["shuffled"]) == len(bq.CONTRASTS) - 1  # no 4x LlamaRec-style there
    assert paper["zero-shot"]["scoring_s"] == {"evaluate stage": 527.0} and paper["ULMRec"]["scoring_s"]["test"] == 7.0
    assert paper[bq.UID_ROWS["uid_only_swapped_index"]]["users_shown_their_own_index"] == 0
    text = "\n".join(bq.chosen_markdown(rows, contrasts, pending, {}))
    assert "| zero-shot | 0.3000 | 0 | 0.5000 | 0.2000 | 0.0400 | 0.2500 | 1 (evaluate stage 527) |" in text
    assert "| zero-shot + LRURec fused (w=0) | 0.3000 | 0 | 0.5000 | 0.2000 | 0.0400 | 0.4000 | 1 (evaluate stage 527) |" in text
    # why each fused row has w = 0: the validation grid's figures at w = 0 and at the best w
    assert "| zero-shot + LRURec fused | 0 | 0.4000 | 0.1 | 0.4100 | +0.0100 (0.0200) |" in text
    assert paper["ULMRec + LRURec fused"]["fusion_validation"]["ndcg@10_chosen"] == 0.4
    assert f"| {bq.UID_ROWS['uid_only']} − {bq.UID_ROWS['uid_only_swapped_index']} | the user's own index (vs another user's) | " in text
    assert "(0 users shown their own)" in text


def test_wall_clock_keeps_the_seconds_of_a_killed_attempt(tmp_path):
    import signal
    import time

    bc = load_script("bench_common")
    wall, running = tmp_path / "wall_s.json", tmp_path / "wall_s.json.running"
    code = (f"import sys, time; sys.path.insert(0, {str(BENCH)!r}); from bench_common import wall_clock\n"
            f"with wall_clock({str(wall)!r}, 'train', beat=0.05):\n    time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and json.loads(running.read_text() if running.exists() else "{}").get("train", 0) < 0.3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # as a session's end stops a bench: no finally block runs
    proc.wait()
    left = json.loads(running.read_text())["train"]
    assert left >= 0.3 and not wall.exists()
    with bc.wall_clock(wall, "train", beat=0.05):
        time.sleep(0.1)
    assert json.loads(running.read_text()) == {} and left + 0.05 <= json.loads(wall.read_text())["train"] < left + 5
    try:
        with bc.wall_clock(wall, "evaluate", beat=0.05):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert set(json.loads(wall.read_text())) == {"train", "evaluate"}
