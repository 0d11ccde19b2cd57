"""Does alignment tuning learn? The demo recipe (SmolLM2-135M LoRA on the synthetic demo data, CPU), against the untrained
model and a random ranking on the same validation users, and the fused row against the retriever. Runs the demo recipe
(resumable) in bench/runs/demo and writes bench/results/train_demo.json. Extra `--key value` / `--stage.key value` flags
override the recipe, e.g. `--train.max_steps 80`."""

import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo" / "smollm2-135m" / "pipeline.yaml"


def random_ndcg(k: int, n: int = 20) -> float:
    """Expected NDCG@k of a uniformly random order of n candidates with one relevant item."""
    return sum(1 / math.log2(r + 1) for r in range(1, k + 1)) / n


def main() -> int:
    from ulmrec_hf.cli import setup_logging

    setup_logging()
    from ulmrec_hf.runner import run_recipe

    run = ROOT / "bench" / "runs" / "demo"
    start = time.time()
    run_recipe(str(RECIPE), ["--run_dir", str(run), "--demo-data.output", str(run / "raw"), "--prepare.input", str(run / "raw"), *sys.argv[1:]])
    from ulmrec_hf.layout import RunDir

    train = json.loads(RunDir(run).ranker_files.train_metrics.read_text())
    evaluation = RunDir(run).eval_metrics()
    val, test = evaluation["validation"], evaluation["test"]
    result = {
        "model": "SmolLM2-135M-Instruct (LoRA; CPU)", "protocol": evaluation["protocol"], "train_samples": train["train_samples"],
        "steps": train["steps"], "wall_s_this_call": round(time.time() - start, 1), "fusion": evaluation["fusion"],
        "validation_rank_ndcg@10": {"random": round(random_ndcg(10), 4), "untrained": round(train["untrained"]["untrained_ndcg@10"], 4),
                                    "trained": round(val["ranker"]["rank"]["ndcg@10"], 4), "fused": round(val["fused"]["rank"]["ndcg@10"], 4),
                                    "retriever": round(val["retriever"]["rank"]["ndcg@10"], 4)},
        "test_rank_ndcg@10": {name: round(m["rank"]["ndcg@10"], 4) for name, m in test.items()},
        "users": evaluation["users"], "log_history": [h for h in train["log_history"] if "eval_ndcg@10" in h],
    }
    v, t = result["validation_rank_ndcg@10"], result["test_rank_ndcg@10"]
    result["trained_beats_untrained_on_validation"] = v["trained"] > v["untrained"]
    result["fused_minus_retriever_on_test"] = round(t["fused"] - t["retriever"], 4)
    out = ROOT / "bench" / "results" / "train_demo.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| rank NDCG@10 | random | untrained | trained | fused | retriever |\n|---|---|---|---|---|---|")
    print(f"| validation | {v['random']} | {v['untrained']} | {v['trained']} | {v['fused']} | {v['retriever']} |")
    print(f"| test | | | {t['ranker']} | {t['fused']} | {t['retriever']} |")
    print(f"fusion weight {result['fusion']['weight']} (chosen on validation); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
