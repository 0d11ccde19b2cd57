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
Resumable (bench/runs/beauty-quality/): finished stages are skipped and training resumes. About 3 h (179 min measured) on 2 cores
including LRURec (run it in the background: nohup python bench/beauty_quality.py > bench/runs/beauty-quality.log 2>&1 &).
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "amazon-beauty-ulmrec"
RECIPE = ROOT / "recipes" / "beauty" / "smollm2-135m" / "pipeline.yaml"
RUNS = ROOT / "bench" / "runs" / "beauty-quality"
RETRIEVER_RUN = ROOT / "bench" / "runs" / "beauty-lrurec"  # made by bench/retriever.py (the paper's LRURec settings)
EVAL_SEED = 42
NO_ALIGN = ["--use_index_to_preference", "false", "--use_preference_to_index", "false", "--use_history_to_index", "false",
            "--use_rating", "false", "--use_intent", "false"]
# Shorter prompts than the recipe's so that six scorings of ~1,500 users and two trainings fit the budget on 2 cores.
PROMPT = ["--history_len", "5", "--title_max_tokens", "16"]
PROTOCOLS = ("paper", "shuffled")
MODELS = {"llamarec": NO_ALIGN, "ulmrec_pid": []}
WALL = RUNS / "wall_s.json"  # seconds per stage, summed over the calls that ran it (a resumed stage adds up)


def stage(name: str, run: Path, flags: list[str]) -> None:
    from ulmrec_hf.runner import run_stage

    start = time.time()
    print(f"== {run.relative_to(RUNS)}: ulmrec {name} {' '.join(flags)}", flush=True)
    run_stage(name, ["--config", str(RECIPE), "--run_dir", str(run), *flags])
    wall, key = read_wall(), f"{run.relative_to(RUNS)}/{name}"
    wall[key] = round(wall.get(key, 0) + time.time() - start, 1)
    WALL.write_text(json.dumps(wall, indent=2) + "\n")


def read_wall() -> dict:
    return json.loads(WALL.read_text()) if WALL.exists() else {}


def link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src.resolve(), dst, target_is_directory=True)


def base_run() -> Path:
    """Data and LRURec candidates from bench/runs/beauty-lrurec (trained there if absent), imported preferences, pid index."""
    import subprocess

    base = RUNS / "base"
    if not (RETRIEVER_RUN / "retriever" / "_COMPLETE").exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "retriever.py"), "--only", "lrurec"], check=True)
    for name in ("data", "retriever"):
        link(RETRIEVER_RUN / name, base / name)
    stage("preferences", base, [])
    stage("index", base, [])
    return base


def model_runs(base: Path, common: list[str], train_flags: list[str]) -> None:
    """Each model: tasks and training in the paper protocol, evaluated there; then the shuffled protocol's tasks
    (identical training rows, checked) and the same ranker evaluated on them."""
    from ulmrec_hf.runner import link_shared

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
                stage("evaluate", run, ["--uid_only", "false", "--ranker", str(paper / "ranker")])
    for protocol in PROTOCOLS:
        zero = RUNS / protocol / "zero_shot"
        link_shared(RUNS / protocol / "llamarec", zero, ("prepare", "retrieve", "preferences", "index", "tasks"))
        stage("evaluate", zero, ["--zero_shot", "true", "--zero_shot_dtype", "bfloat16"])


def same_rows(a: Path, b: Path) -> None:
    import datasets

    rows = [datasets.load_from_disk(str(r / "tasks" / "train"))["prompt"] for r in (a, b)]
    if rows[0] != rows[1]:
        raise SystemExit(f"{a} and {b} have different training rows; a ranker cannot be shared between them")


def per_user(run: Path) -> dict:
    import datasets

    test = datasets.load_from_disk(str(run / "eval" / "per_user"))["test"]
    ndcg = lambda r: 1 / math.log2(r + 1) if r <= 10 else 0.0  # noqa: E731
    return {"ranker": dict(zip(test["user_id"], map(ndcg, test["rank"]))), "fused": dict(zip(test["user_id"], map(ndcg, test["fused_rank"]))),
            "retriever": dict(zip(test["user_id"], map(ndcg, test["retriever_rank"])))}


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
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        users = per_user(run)
        if not out:
            out["LRURec order"] = (users["retriever"], metrics["test"]["retriever"], None)
        out[model] = (users["ranker"], metrics["test"]["ranker"], None)
        out[f"{model} + LRURec fused"] = (users["fused"], metrics["test"]["fused"], metrics["fusion"]["weight"])
    return out


def report(args) -> dict:
    meta = json.loads((RUNS / "paper" / "llamarec" / "tasks" / "eval_meta.json").read_text())
    mixtures = {m: json.loads((RUNS / "paper" / m / "tasks" / "mixture.json").read_text()) for m in MODELS}
    retriever = json.loads((RETRIEVER_RUN / "retriever" / "metrics.json").read_text())
    wall = {"retrieve (bench/retriever.py)": retriever["wall_time_s"], **read_wall()}
    results = {}
    for protocol in PROTOCOLS:
        rows = rows_of(protocol)
        lrurec, llamarec = rows["LRURec order"][0], rows["llamarec"][0]
        results[protocol] = {label: {"rank": m["rank"], "overall": m["overall"], "fusion_weight": w,
                                     "vs_lrurec": paired(v, lrurec), "vs_llamarec": paired(v, llamarec)} for label, (v, m, w) in rows.items()}
    summary = {"data": "amazon-beauty-ulmrec (LlamaRec split)", "model": "SmolLM2-135M-Instruct, LoRA r=8 on q,v, bf16 weights",
               "device": "CPU, 2 cores", "eval_seed": EVAL_SEED, "settings": vars(args), "test_users": meta["test"],
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
             f"total wall time {s['wall_s_total'] / 60:.0f} min on 2 cores", ""]
    for protocol, rows in s["results"].items():
        order = "the retriever's order (A = LRURec's top-1)" if protocol == "paper" else "a seeded shuffle"
        lines += [f"## Protocol `{protocol}`: candidates in {order}", "",
                  "| row | rank N@10 | rank R@10 | rank MRR@10 | overall N@10 | Δ vs LRURec (95 % CI) | Δ vs LlamaRec-style (95 % CI) |",
                  "|---|---|---|---|---|---|---|"]
        for label, r in rows.items():
            name = f"{label} (w={r['fusion_weight']:g})" if r["fusion_weight"] is not None else label
            ci = lambda p: f"{p['diff']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"  # noqa: E731
            lines.append(f"| {name} | {r['rank']['ndcg@10']:.4f} | {r['rank']['recall@10']:.4f} | {r['rank']['mrr@10']:.4f} | "
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
