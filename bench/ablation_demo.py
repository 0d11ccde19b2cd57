"""The paper's ablations (Fig. 8 and 9) on the demo data: `ulmrec ablate` with a reduced training budget
per variant, so all eleven variants fit in about 25 minutes on 2 CPU cores. Reuses bench/runs/demo
(from bench/train_demo.py) for the shared stages. Copies the table, JSON and PNG to bench/results/."""

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo" / "smollm2-135m" / "pipeline.yaml"
BUDGET = ["--max_train_samples", "120", "--max_eval_users", "80", "--eval_before_training", "false", "--eval_steps", "15"]


def main() -> int:
    from ulmrec_hf.ablate import main as ablate

    run = ROOT / "bench" / "runs" / "demo"
    root = ablate([str(RECIPE), *sys.argv[1:], "--run_dir", str(run), "--demo_output", str(run / "raw"), "--input", str(run / "raw"), *BUDGET])
    for name in ("ablation.md", "ablation.json", "ablation.png"):
        shutil.copy2(root / name, ROOT / "bench" / "results" / f"demo_{name}")
    print(f"wrote bench/results/demo_ablation.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
