"""Does the LLM re-ranker earn its place on real Beauty? The paper's Table 2 at CPU scale (SmolLM2-135M, LoRA), issue 12.

Two protocols side by side, every row on the same test users and candidates:
- paper: the retriever's order at evaluation (letter A is LRURec's top-1), as the authors' code evaluates;
- shuffled: a seeded shuffle per user, which measures what the LLM itself understands.
Training is the authors' in both (every prefix of each training sequence, 19 random negatives, shuffled), so each model
is trained once on identical rows (checked), with its final checkpoint only, and scored under both orders.

Rows: LRURec order; zero-shot SmolLM2 (LlamaRec prompts, no tuning); LlamaRec-style (next-item only, no user field);
ULMRec pid (our index + every alignment task; the same next-item rows, alignment rows on top); each LLM row also fused
with LRURec, z(retriever) + w z(letter log-prob), w chosen on validation users only. Paired 95 % CIs of per-user
rank NDCG@10 against LRURec and against LlamaRec-style.

Usage: python bench/beauty_quality.py [--train_samples 400] [--eval_users 8000] [--validation_users 4000]
Environment: ULMREC_BENCH_RUNS=DIR keeps the runs outside the checkout; ULMREC_BENCH_LOCK=FILE makes each stage hold that
lock (flock), so that other jobs sharing a 2-core machine run between stages instead of beside them.
Resumable (bench/runs/beauty-quality/): finished stages are skipped and training resumes. About 3 h (179 min measured) on 2 cores
including LRURec (run it in the background: nohup python bench/beauty_quality.py > bench/runs/beauty-quality.log 2>&1 &).
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

from bench_common import NO_ALIGN_TASKS
from bench_common import stage as run_timed

from ulmrec_hf.layout import RunDir
from ulmrec_hf.runner import link_shared

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "amazon-beauty-ulmrec"
RECIPE = ROOT / "recipes" / "beauty" / "smollm2-135m" / "pipeline.yaml"
BENCH_RUNS = Path(os.environ.get("ULMREC_BENCH_RUNS", ROOT / "bench" / "runs"))  # a folder outside the checkout survives a fresh clone
RUNS = BENCH_RUNS / "beauty-quality"
RETRIEVER_RUN = BENCH_RUNS / "beauty-lrurec"  # made by bench/retriever.py (the paper's LRURec settings)
STAGE_LOCK = os.environ.get("ULMREC_BENCH_LOCK")  # a lock file each stage holds, so that other jobs on a small machine run between stages
EVAL_SEED = 42
# Shorter prompts than the recipe's so that six scorings of ~1,500 users and two trainings fit the budget on 2 cores.
PROMPT = ["--history_len", "5", "--title_max_tokens", "16"]
PROTOCOLS = ("paper", "shuffled")
MODELS = {"llamarec": NO_ALIGN_TASKS, "ulmrec_pid": []}
WALL = RUNS / "wall_s.json"  # seconds per stage, summed over the calls that ran it (a resumed stage adds up)


def stage(name: str, run: Path, flags: list[str]) -> None:
    """One stage with the recipe, holding STAGE_LOCK; its seconds are added to WALL."""
    seconds = run_timed(name, run, flags, recipe=RECIPE, lock=STAGE_LOCK, label=str(run.relative_to(RUNS)))
    wall, key = read_wall(), f"{run.relative_to(RUNS)}/{name}"
    wall[key] = round(wall.get(key, 0) + seconds, 1)
    WALL.write_text(json.dumps(wall, indent=2) + "\n")


def read_wall() -> dict:
    return json.loads(WALL.read_text()) if WALL.exists() else {}


def base_run() -> Path:
    """Data and LRURec candidates from bench/retriever.py's run (which skips a finished run with today's settings and
    refuses one made with others), keyword preferences and the title index of the recipe."""
    import subprocess

    base = RUNS / "base"
    subprocess.run([sys.executable, str(ROOT / "bench" / "retriever.py"), "--only", "lrurec"], check=True)
    link_shared(RETRIEVER_RUN, base, ("prepare", "retrieve"))
    # The keyword backend sends no requests, so max_tokens and stop change nothing in its answers; pinned to the values
    # recorded when this bench's preferences were made (v0.3.0-dev), so a resumed bench reuses them (same file, checked).
    stage("preferences", base, ["--max_tokens", "64", "--stop", "\n"])
    stage("index", base, [])
    return base


def model_runs(base: Path, common: list[str], train_flags: list[str]) -> None:
    """Each model: tasks and training in the paper protocol, evaluated there; then the shuffled protocol's tasks
    (identical training rows, checked) and the same ranker evaluated on them."""
    for model, flags in MODELS.items():
        index = [] if model == "ulmrec_pid" else ["--scheme", "none"]
        for protocol in PROTOCOLS:
            run = RUNS / protocol / model
            link_shared(base, run, ("prepare", "retrieve", "preferences") + (("index",) if model == "ulmrec_pid" else ()))
            if index:
                stage("index", run, index)
            stage("tasks", run, ["--protocol", protocol, *common, *flags])
            if protocol == "paper":
                stage("train", run, train_flags)
                stage("evaluate", run, ["--uid_only", "false"])
            else:
                paper = RUNS / "paper" / model
                same_rows(paper, run)
                stage("evaluate", run, ["--uid_only", "false", "--ranker", str(RunDir(paper).ranker)])
    for protocol in PROTOCOLS:
        zero = RUNS / protocol / "zero_shot"
        link_shared(RUNS / protocol / "llamarec", zero, ("prepare", "retrieve", "preferences", "index", "tasks"))
        stage("evaluate", zero, ["--zero_shot", "true", "--zero_shot_dtype", "bfloat16"])


def same_rows(a: Path, b: Path) -> None:
    rows = [RunDir(r).task("train")["prompt"] for r in (a, b)]
    if rows[0] != rows[1]:
        raise SystemExit(f"{a} and {b} have different training rows; a ranker cannot be shared between them")


def per_user(run: Path) -> dict:
    import datasets

    from ulmrec_hf.metrics import load_metric

    test = datasets.load_from_disk(str(RunDir(run).eval_per_user))["test"]
    ndcg = lambda ranks: load_metric("ranks").compute(predictions=ranks, ks=[10], per_user=True)["per_user"]["ndcg@10"]  # noqa: E731
    return {"ranker": dict(zip(test["user_id"], ndcg(test["rank"]))), "fused": dict(zip(test["user_id"], ndcg(test["fused_rank"]))),
            "retriever": dict(zip(test["user_id"], ndcg(test["retriever_rank"])))}


def old_rule_ndcg(run: Path) -> dict:
    """Rank NDCG@10 of the same test scores under v0.2.0's rule (only strictly higher scores rank above the ground
    truth): what the ties would have been worth here."""
    import datasets
    import numpy as np

    from ulmrec_hf.metrics import fuse

    r = RunDir(run)
    scores = np.array(datasets.load_from_disk(str(r.eval_per_user))["test"]["scores"], dtype=np.float64)
    test = r.eval_set("test")
    gold, w = np.array(test["target_position"]), r.eval_metrics()["fusion"]["weight"]
    out = {}
    for name, s in (("ranker", scores), ("fused", fuse(np.array(test["retriever_scores"]), scores, w))):
        ranks = 1 + (s > s[np.arange(len(gold)), gold][:, None]).sum(1)
        out[name] = round(float(np.mean(np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0.0))), 4)
    return out


def paired(values: dict, base: dict) -> dict:
    users = sorted(base)
    x, d = [values[u] for u in users], [values[u] - base[u] for u in users]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    se = lambda v: math.sqrt(sum((e - mean(v)) ** 2 for e in v) / (len(v) - 1) / len(v))  # noqa: E731
    return {"mean": round(mean(x), 4), "diff": round(mean(d), 4), "ci95": [round(mean(d) - 1.96 * se(d), 4), round(mean(d) + 1.96 * se(d), 4)]}


def rows_of(protocol: str) -> dict:
    """label -> (run, kind, per-user NDCG@10, metrics) for one protocol."""
    out = {}
    for model in ("zero_shot", "llamarec", "ulmrec_pid"):
        run = RUNS / protocol / model
        metrics = RunDir(run).eval_metrics()
        users, old = per_user(run), old_rule_ndcg(run)
        if not out:
            out["LRURec order"] = (users["retriever"], metrics["test"]["retriever"], None)
        out[model] = (users["ranker"], {**metrics["test"]["ranker"], "old_rule_rank_ndcg@10": old["ranker"]}, None)
        out[f"{model} + LRURec fused"] = (users["fused"], {**metrics["test"]["fused"], "old_rule_rank_ndcg@10": old["fused"]}, metrics["fusion"]["weight"])
    return out


def previous_release() -> dict:
    """v0.2.0's rows (ties counted in the gold's favour, bf16 letter products, text from all interactions)."""
    path = ROOT / "bench" / "results" / "beauty_quality_v0.2.0.json"
    return json.loads(path.read_text())["results"] if path.exists() else {}


def report(args) -> dict:
    meta = RunDir(RUNS / "paper" / "llamarec").eval_meta()
    mixtures = {m: RunDir(RUNS / "paper" / m).mixture() for m in MODELS}
    retriever = RunDir(RETRIEVER_RUN).retriever_metrics()
    wall = {"retrieve (bench/retriever.py)": retriever["wall_time_s"], **read_wall()}
    results, old = {}, previous_release()
    for protocol in PROTOCOLS:
        rows = rows_of(protocol)
        lrurec, llamarec = rows["LRURec order"][0], rows["llamarec"][0]
        results[protocol] = {label: {"rank": m["rank"], "overall": m["overall"], "fusion_weight": w, "tied_gold_users": m["tied_gold_users"],
                                     "old_rule_rank_ndcg@10": m.get("old_rule_rank_ndcg@10"),
                                     "v0.2.0_rank_ndcg@10": old.get(protocol, {}).get(label, {}).get("rank", {}).get("ndcg@10"),
                                     "vs_lrurec": paired(v, lrurec), "vs_llamarec": paired(v, llamarec)} for label, (v, m, w) in rows.items()}
    evaluated = RunDir(RUNS / "paper" / "ulmrec_pid").eval_metrics()
    summary = {"data": "amazon-beauty-ulmrec (LlamaRec split)", "model": "SmolLM2-135M-Instruct, LoRA r=8 on q,v, bf16 weights",
               "device": "CPU, 2 cores", "eval_seed": EVAL_SEED, "tie_rule": evaluated["tie_rule"], "user_text": evaluated["user_text"], "settings": vars(args), "test_users": meta["test"],
               "validation_users": meta["validation"], "prompt": {"history_len": 5, "title_max_tokens": 16},
               "training": {m: {"next_item_rows": mix["next_item_samples"], "all_rows": mix["train_samples"], "tasks": mix["tasks"]}
                            for m, mix in mixtures.items()},
               "paper_metrics": json.loads((DATA / "paper_metrics.json").read_text()), "wall_s": wall, "wall_s_total": round(sum(wall.values()), 1),
               "results": results}
    (ROOT / "bench" / "results" / "beauty_quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    (ROOT / "bench" / "results" / "beauty_quality.md").write_text(markdown(summary))
    print(markdown(summary))
    return summary


def markdown(s: dict) -> str:
    t, v = s["test_users"], s["validation_users"]
    lines = ["# Beauty re-ranking quality (SmolLM2-135M-Instruct, CPU)", "",
             f"- test users: {t['users']} sampled of {t['all_users']} (eval seed {s['eval_seed']}); ground truth in LRURec's top 20: "
             f"{t['in_candidates']} (the rank users); overall = per user over the sampled users, 0 when missed",
             f"- validation (fusion weight): {v['in_candidates']} rank users of {v['users']} sampled",
             f"- training, each model once (final checkpoint), the authors' rows: every prefix, 19 random negatives; "
             f"LlamaRec-style {s['training']['llamarec']['all_rows']} rows, ULMRec {s['training']['ulmrec_pid']['next_item_rows']} "
             f"next-item + {s['training']['ulmrec_pid']['all_rows'] - s['training']['ulmrec_pid']['next_item_rows']} alignment rows",
             f"- prompts: {s['prompt']['history_len']} history items, titles cut to {s['prompt']['title_max_tokens']} tokens; "
             f"total wall time {s['wall_s_total'] / 60:.0f} min on 2 cores",
             f"- ties: {s['tie_rule']}; 'tied' = test rank users whose ground truth's score equals another candidate's",
             f"- user text: preferences {s['user_text']['preferences']}; index {s['user_text']['index']}",
             "- 'old rule' = these same test scores ranked as v0.2.0 ranked them (a tied ground truth first): what ties are worth here",
             "- 'v0.2.0' = the v0.2.0 table (bench/results/beauty_quality_v0.2.0.md), which differs in more than the tie rule: bf16 letter "
             "products, LRURec trained with decay on every weight and no clipping, negatives drawn outside the whole training sequence, "
             "and ULMRec's preferences and index built from the authors' GPT-3.5 sentences (which may have read the held-out reviews) "
             "instead of the training titles' keywords", ""]
    for protocol, rows in s["results"].items():
        order = "the retriever's order (A = LRURec's top-1)" if protocol == "paper" else "a seeded shuffle"
        lines += [f"## Protocol `{protocol}`: candidates in {order}", "",
                  "| row | rank N@10 | old rule | v0.2.0 | tied | rank R@10 | rank MRR@10 | overall N@10 | Δ vs LRURec (95 % CI) | Δ vs LlamaRec-style (95 % CI) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, r in rows.items():
            name = f"{label} (w={r['fusion_weight']:g})" if r["fusion_weight"] is not None else label
            ci = lambda p: f"{p['diff']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"  # noqa: E731
            fmt = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"| {name} | {r['rank']['ndcg@10']:.4f} | {fmt(r.get('old_rule_rank_ndcg@10'))} | {fmt(r['v0.2.0_rank_ndcg@10'])} | {r['tied_gold_users']} | {r['rank']['recall@10']:.4f} | {r['rank']['mrr@10']:.4f} | "
                         f"{r['overall']['ndcg@10']:.4f} | {ci(r['vs_lrurec'])} | {ci(r['vs_llamarec'])} |")
        lines.append("")
    paper = s["paper_metrics"]
    lines.append(f"For scale, the authors' released Llama-2-7b checkpoint on all test users with their own LRURec candidates: "
                 f"rank N@10 {paper['rank_subset']['test_NDCG@10']:.4f}, overall N@10 {paper['overall']['test_NDCG@10']:.4f}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    from ulmrec_hf.cli import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_samples", type=int, default=400, help="Next-item training rows of both models.")
    parser.add_argument("--eval_users", type=int, default=8000, help="Test users sampled (about 13%% have the ground truth in the top 20).")
    parser.add_argument("--validation_users", type=int, default=4000)
    args = parser.parse_args()
    if not DATA.exists():
        print(f"skip: {DATA} is absent")
        return 0
    common = ["--max_train_samples", str(args.train_samples), "--max_eval_users", str(args.eval_users), "--eval_seed", str(EVAL_SEED),
              "--max_validation_users", str(args.validation_users), *PROMPT]
    train_flags = ["--eval_before_training", "false", "--eval_steps", "1000000"]  # the final weights, scored once at the end
    model_runs(base_run(), common, train_flags)
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
