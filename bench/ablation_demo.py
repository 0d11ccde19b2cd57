"""The paper's ablations (Fig. 8 and 9) on the demo data: `ulmrec ablate` with the demo's training budget per variant;
by default four variants (pass `--variants ...` for others), each also scored on the uid-only prompts. Reuses bench/runs/demo (from bench/train_demo.py) for the
shared stages. Copies the table, JSON and PNG to bench/results/."""

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo" / "smollm2-135m" / "pipeline.yaml"
VARIANTS = ["--variants", "full", "wo_all_align", "nid", "oid"]  # all 10 variants take about 10 demo trainings
UID_ONLY = ["--evaluate.uid_only", "true"]  # Table 4's rows: the index alone, the same with another user's index, a random order


def main() -> int:
    from ulmrec_hf.cli import setup_logging

    setup_logging()
    from ulmrec_hf.runner import ablate

    run = ROOT / "bench" / "runs" / "demo"
    root = ablate([str(RECIPE), *(sys.argv[1:] or VARIANTS), *UID_ONLY, "--run_dir", str(run), "--demo-data.output", str(run / "raw"),
                   "--prepare.input", str(run / "raw")])
    for name in ("ablation.md", "ablation.json", "ablation.png"):
        shutil.copy2(root / name, ROOT / "bench" / "results" / f"demo_{name}")
    print("wrote bench/results/demo_ablation.{md,json,png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
