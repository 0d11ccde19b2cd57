"""Does the LLM re-ranker beat its retriever, and do user indices + alignment tasks beat the same LLM without them?
The paper's Table 2 claim measured on the real Beauty split at CPU scale (SmolLM2-135M, LoRA), issue 8.

Every variant is scored on the same seeded test users (`--eval_seed`) with the same candidates:
  retriever (LRURec order), zero_shot (SmolLM2 without tuning, LlamaRec prompts), llamarec (next-item only, no user field),
  ulmrec_pid (pid index + all alignment tasks; also its uid-only prompts), paper_index (the authors' indices imported),
  nid, oid, and llamarec / ulmrec_pid again with a second training seed.

Usage: python bench/beauty_quality.py [--train_samples 400] [--eval_users 8000] [--only v1,v2] [--key value ...]
Resumable: each variant lives in bench/runs/beauty-quality/<variant>/; finished stages and variants are kept and a
cut-off run continues where it stopped (training resumes from its last checkpoint). Run it in the background:
  nohup python bench/beauty_quality.py > bench/runs/beauty-quality.log 2>&1 &
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from ulmrec_hf.ablate import link_shared

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "amazon-beauty-ulmrec"
RECIPE = ROOT / "recipes" / "beauty" / "smollm2-135m" / "pipeline.yaml"
RUNS = ROOT / "bench" / "runs" / "beauty-quality"
RETRIEVER_RUN = ROOT / "bench" / "runs" / "beauty-lrurec"  # made by bench/retriever.py (the paper's LRURec settings)
EVAL_SEED = 42
# Shorter prompts than the recipe's (10 history items, 24-token titles: ~700 tokens) so that the 9 scorings of ~1,000
# users and 7 trainings fit ~2.5 h on 2 cores: ~500 tokens, 2.1 users/s in bf16 against 1.3 (measured side by side).
PROMPT = ["--history_len", "5", "--title_max_tokens", "16"]
NO_ALIGN = ["--use_index_to_preference", "false", "--use_preference_to_index", "false", "--use_history_to_index", "false",
            "--use_rating", "false", "--use_intent", "false"]
ONE_PASS = ["--uid_only", "false"]  # uid-only prompts still hold the 20 candidates: ~6 min per variant, so ulmrec_pid only
# name -> (stage overrides, index source: "base" links the base run's pid index, None builds its own, or another variant's name)
VARIANTS = {  # in run order: the key comparisons first
    "llamarec": (["--index_scheme", "none", *NO_ALIGN], None),
    "zero_shot": (["--zero_shot", "true", "--zero_shot_dtype", "bfloat16"], "llamarec"),
    "ulmrec_pid": ([], "base"),
    "paper_index": (["--index_scheme", "import", "--index_import_file", str(DATA / "paper_user_index.json"), *ONE_PASS], None),
    "llamarec_seed2": (["--index_scheme", "none", *NO_ALIGN, "--seed", "43"], None),
    "ulmrec_pid_seed2": (["--seed", "43", *ONE_PASS], "base"),
    "nid": (["--index_scheme", "nid", *ONE_PASS], None),
    "oid": (["--index_scheme", "oid", *ONE_PASS], None),
}
COLS = [f"{m}@{k}" for k in (5, 10) for m in ("mrr", "ndcg", "recall")]


def stage(name: str, run: Path, flags: list[str]) -> None:
    cmd = [sys.executable, "-m", "ulmrec_hf.cli", name, "--config", str(RECIPE), "--run_dir", str(run), *flags]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src.resolve(), dst, target_is_directory=True)


def base_run(common: list[str]) -> Path:
    """Data and LRURec candidates from bench/runs/beauty-lrurec (trained there if absent), imported preferences, pid index."""
    base = RUNS / "base"
    if not (RETRIEVER_RUN / "retriever" / "_COMPLETE").exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "retriever.py"), "--only", "lrurec"], check=True)
    for name in ("data", "retriever"):
        link(RETRIEVER_RUN / name, base / name)
    for name in ("preferences", "index"):
        stage(name, base, common)
    return base


def run_variant(name: str, base: Path, common: list[str]) -> dict:
    overrides, index_from = VARIANTS[name]
    vdir = RUNS / name
    link_shared(base, vdir, with_index=index_from == "base")
    stages = ["index", "tasks", "train", "evaluate"]
    if index_from == "base":
        stages = stages[1:]
    elif index_from:  # zero-shot: the other variant's prompts, the base model
        for shared in ("user_index", "tasks"):
            link(RUNS / index_from / shared, vdir / shared)
        stages = ["evaluate"]
    timer = vdir / "bench_time.json"
    spent = json.loads(timer.read_text()) if timer.exists() else {}
    for s in stages:
        if (vdir / {"index": "user_index", "train": "ranker", "evaluate": "eval"}.get(s, s) / "_COMPLETE").exists():
            continue
        start = time.time()
        stage(s, vdir, [*common, *overrides])
        spent[s] = round(spent.get(s, 0) + time.time() - start, 1)
        timer.write_text(json.dumps(spent))
    metrics = json.loads((vdir / "eval" / "metrics.json").read_text())
    train = json.loads((vdir / "ranker" / "train_metrics.json").read_text()) if index_from != "llamarec" else None
    mixture = json.loads((vdir / "tasks" / "mixture.json").read_text())
    return {"overrides": overrides, "wall_s": spent, "wall_s_total": round(sum(spent.values()), 1), "metrics": metrics,
            "train_samples": train["train_samples"] if train else 0, "steps": train["steps"] if train else 0,
            "mixture": {t: v["in_mixture"] for t, v in mixture["tasks"].items()}}


def random_order(share: float, n: int = 20) -> tuple[dict, dict]:
    """Expected rank and overall metrics of a uniformly random order of n candidates (the floor to beat)."""
    rank = {}
    for k in (5, 10):
        rank.update({f"mrr@{k}": sum(1 / r for r in range(1, k + 1)) / n, f"recall@{k}": k / n,
                     f"ndcg@{k}": sum(1 / math.log2(r + 1) for r in range(1, k + 1)) / n})
    return rank, {key: v * share for key, v in rank.items()}


def rows(results: dict) -> list[tuple[str, dict, dict, str]]:
    """(row name, rank metrics, overall metrics, wall) in table order; the retriever row comes from any variant (same users)."""
    out = []
    first = next(iter(results.values()), None)
    if first:
        m = first["metrics"]["metrics"]["retriever"]
        out.append(("random order (expected)", *random_order(first["metrics"]["users_in_candidates"] / first["metrics"]["users"]), "-"))
        out.append(("retriever (LRURec order)", m["rank"], m["overall"], "-"))
    for name, r in results.items():
        for key, label in (("ulmrec", name), ("ulmrec_uid_only", f"{name} uid-only")):
            m = r["metrics"]["metrics"].get(key)
            if m:
                out.append((label, m["rank"], m["overall"], f"{r['wall_s_total'] / 60:.1f}" if key == "ulmrec" else "(same model)"))
    return out


def table(results: dict, meta: dict) -> str:
    head = "| variant | " + " | ".join(f"rank {c}" for c in COLS) + " | overall N@10 | overall R@10 | wall min |"
    lines = [head, "|---" * (len(COLS) + 4) + "|"]
    for label, rank, overall, wall in rows(results):
        lines.append(f"| {label} | " + " | ".join(f"{rank[c]:.4f}" for c in COLS) + f" | {overall['ndcg@10']:.4f} | {overall['recall@10']:.4f} | {wall} |")
    return "\n".join([f"# Beauty re-ranking quality (SmolLM2-135M-Instruct, CPU)\n", *meta_lines(meta), "", *lines, ""])


def meta_lines(meta: dict) -> list[str]:
    return [f"- test users sampled: {meta['users']} of {meta['all_users']} (eval seed {EVAL_SEED}); ground truth in LRURec top 20: "
            f"{meta['rank_users']} (the rank users; overall = per user over all sampled users, 0 when missed)",
            f"- training: {meta['train_samples']} mixed samples per variant (a seeded sample of training users), LoRA r=8 on q,v, "
            f"bf16 weights, 1 epoch; prompts: {PROMPT[1]} history items, titles cut to {PROMPT[3]} tokens; candidate order: {meta['candidate_order']}",
            "- wall min: index + tasks + train + evaluate of the variant on this 2-core CPU"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_samples", type=int, default=200)
    parser.add_argument("--eval_users", type=int, default=8000, help="test users sampled (~13%% have the ground truth in the top 20)")
    parser.add_argument("--validation_users", type=int, default=400)
    parser.add_argument("--only", default=",".join(VARIANTS))
    args, extra = parser.parse_known_args()
    if not DATA.exists():
        print(f"skip: {DATA} is absent")
        return 0
    steps = max(1, args.train_samples // 4)  # the recipe's batch size; one checkpoint + validation at the end
    common = ["--max_train_samples", str(args.train_samples), "--max_eval_users", str(args.eval_users), "--eval_seed", str(EVAL_SEED),
              "--max_validation_users", str(args.validation_users), "--eval_steps", str(steps), "--eval_before_training", "false",
              *PROMPT, *extra]
    base = base_run(common)
    out_json = ROOT / "bench" / "results" / "beauty_quality.json"
    saved = json.loads(out_json.read_text()) if out_json.exists() else {}
    results = {n: r for n, r in saved.get("results", {}).items() if n in VARIANTS}
    for name in args.only.split(","):
        results[name] = run_variant(name, base, common)
        results = {n: results[n] for n in VARIANTS if n in results}
        write(results, args, out_json)
    return 0


def write(results: dict, args, out_json: Path) -> None:
    any_run = next(iter(results.values()))["metrics"]
    trained = [r["train_samples"] for r in results.values() if r["train_samples"]]
    meta = {"users": any_run["users"], "all_users": any_run["all_users_of_split"], "rank_users": any_run["users_in_candidates"],
            "candidate_order": any_run["candidate_order"], "train_samples": sorted(set(trained)) or args.train_samples}
    spread = paired_ndcg(results)
    summary = {"data": "amazon-beauty-ulmrec (LlamaRec split)", "model": "SmolLM2-135M-Instruct", "device": "CPU, 2 cores",
               "eval_seed": EVAL_SEED, "settings": vars(args), **meta, "paper_metrics": json.loads((DATA / "paper_metrics.json").read_text()),
               "table": [{"variant": label, "rank": rank, "overall": overall} for label, rank, overall, _ in rows(results)],
               "rank_ndcg@10_paired_vs_llamarec": spread, "results": results}
    out_json.write_text(json.dumps(summary, indent=2) + "\n")
    md = table(results, meta) + spread_table(spread)
    (out_json.with_suffix(".md")).write_text(md)
    print(md, flush=True)


def per_user_ndcg10(ranks) -> dict:
    return {u: (1 / math.log2(r + 1) if r <= 10 else 0.0) for u, r in ranks}


def paired_ndcg(results: dict) -> dict:
    """Per-user rank NDCG@10 of every scored row against llamarec on the same users: mean, standard error, paired 95 % CI."""
    import datasets

    scored = {}
    for name in results:
        per_user = datasets.load_from_disk(str(RUNS / name / "eval" / "per_user"))
        scored[name] = per_user_ndcg10(zip(per_user["user_id"], per_user["rank"]))
        if "rank_uid_only" in per_user.column_names:
            scored[f"{name} uid-only"] = per_user_ndcg10(zip(per_user["user_id"], per_user["rank_uid_only"]))
    if "llamarec" not in scored:
        return {}
    base = scored["llamarec"]
    cands = datasets.load_from_disk(str(RUNS / "base" / "retriever" / "candidates" / "test"))
    ranks = dict(zip(cands["user_id"], cands["target_rank"]))
    scored = {"retriever (LRURec order)": per_user_ndcg10((u, ranks[u]) for u in base), **scored}
    out = {}
    for name, values in scored.items():
        x = [values[u] for u in base]
        d = [values[u] - base[u] for u in base]
        out[name] = {"users": len(x), "mean": mean(x), "se": se(x), "diff_vs_llamarec": mean(d), "diff_ci95": [mean(d) - 1.96 * se(d), mean(d) + 1.96 * se(d)]}
    return out


def mean(x: list[float]) -> float:
    return sum(x) / len(x)


def se(x: list[float]) -> float:
    m = mean(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1) / len(x))


def spread_table(spread: dict) -> str:
    if not spread:
        return ""
    lines = ["", "Rank NDCG@10 per user on the same users: mean ± standard error, and the paired difference to llamarec (95 % CI).", "",
             "| variant | rank N@10 | ± SE | Δ vs llamarec | 95 % CI |", "|---|---|---|---|---|"]
    for name, v in spread.items():
        lo, hi = v["diff_ci95"]
        lines.append(f"| {name} | {v['mean']:.4f} | {v['se']:.4f} | {v['diff_vs_llamarec']:+.4f} | [{lo:+.4f}, {hi:+.4f}] |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
