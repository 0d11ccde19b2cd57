"""Does alignment tuning learn? SmolLM2-135M LoRA on the demo data (CPU), against the untrained model
and a random ranking, on the same validation users. Runs the demo recipe (resumable) in bench/runs/demo
and writes bench/results/train_demo.json. Extra `--key value` flags override the recipe."""

import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo" / "smollm2-135m" / "pipeline.yaml"
LONGER = ["--max_train_samples", "240", "--max_eval_users", "100", "--eval_steps", "30"]  # 60 steps instead of the demo's 24


def random_ndcg(k: int, n: int = 20) -> float:
    """Expected NDCG@k of a uniformly random order of n candidates with one relevant item."""
    return sum(1 / math.log2(r + 1) for r in range(1, k + 1)) / n


def main() -> int:
    from ulmrec_hf.cli import run_recipe

    run = ROOT / "bench" / "runs" / "demo"
    start = time.time()
    run_recipe([str(RECIPE), "--run_dir", str(run), "--demo_output", str(run / "raw"), "--input", str(run / "raw"), *LONGER, *sys.argv[1:]])
    train = json.loads((run / "ranker" / "train_metrics.json").read_text())
    test = json.loads((run / "eval" / "metrics.json").read_text())
    untrained, best = train["untrained"], train["best"]
    result = {
        "model": "SmolLM2-135M-Instruct (LoRA r=8 on q,v; bf16 weights; CPU)", "candidate_order": train["candidate_order"],
        "train_samples": train["train_samples"], "steps": train["steps"], "wall_s_this_call": round(time.time() - start, 1),
        "validation": {"random_ndcg@10": round(random_ndcg(10), 4), "untrained_ndcg@10": round(untrained["untrained_ndcg@10"], 4),
                       "trained_ndcg@10": round(best["eval_ndcg@10"], 4), "untrained_recall@10": round(untrained["untrained_recall@10"], 4),
                       "trained_recall@10": round(best["eval_recall@10"], 4)},
        "test": test["metrics"], "test_users": test["users"], "test_users_in_candidates": test["users_in_candidates"],
        "log_history": [h for h in train["log_history"] if "eval_ndcg@10" in h],
    }
    v = result["validation"]
    result["trained_beats_untrained_and_random"] = v["trained_ndcg@10"] > max(v["untrained_ndcg@10"], v["random_ndcg@10"])
    out = ROOT / "bench" / "results" / "train_demo.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| validation NDCG@10 | random | untrained | trained |\n|---|---|---|---|")
    print(f"| demo ({result['candidate_order']}) | {v['random_ndcg@10']} | {v['untrained_ndcg@10']} | {v['trained_ndcg@10']} |")
    print((run / "eval" / "table.md").read_text())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
