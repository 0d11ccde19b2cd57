"""Multi-GPU accelerate configs on a real run: FSDP2 (`accelerate_configs/fsdp.yaml`) and DeepSpeed ZeRO-2
(`accelerate_configs/deepspeed_zero2.yaml`) against one process (issue 23).

Needs 2 or more CUDA devices and a run directory whose stages up to `tasks` are finished (the demo with a small model
is enough). Each config trains the same ranker in a copy of the run with `--num_processes 2`, then checks:
- world size 2 and, for FSDP, accelerate's distributed type FSDP with sharded (DTensor) parameters, read from
  `train_metrics.json` (`distributed`), so a run that silently trained unsharded copies fails;
- the logged training losses against the single process's, step by step, within `--tolerance` (the two runs see the
  same global batches: 2 x half the batch; a mean of two per-process means differs from one mean when completion
  lengths differ, hence a tolerance rather than equality);
- the saved adapter reloads with `load_ranker` and scores the validation prompts as the trained model did in memory.

On a machine without 2 GPUs it only says so. Writes bench/results/gpu_multi.json.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from ulmrec_hf.layout import RunDir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"fsdp": ROOT / "accelerate_configs" / "fsdp.yaml", "deepspeed_zero2": ROOT / "accelerate_configs" / "deepspeed_zero2.yaml"}
UP_TO_TASKS = ("prepare", "retrieve", "preferences", "index", "tasks")


def train(run: Path, base: Path, flags: list[str], config: Path | None, log: Path) -> dict:
    """`ulmrec train` in a fresh copy of the run (one process, or 2 under `config`); its train_metrics.json."""
    if run.exists():
        shutil.rmtree(run)
    for stage in UP_TO_TASKS:
        if RunDir(base).path(stage).exists():
            shutil.copytree(RunDir(base).path(stage), RunDir(run).path(stage), symlinks=True)
    launch = ([str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config), "--num_processes", "2"]
              if config else [sys.executable])
    with open(log, "w") as f:
        proc = subprocess.run([*launch, "-m", "ulmrec_hf.cli", "train", "--run_dir", str(run), *flags], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}; log {log}: " + log.read_text()[-2000:]}
    return json.loads(RunDir(run).ranker_files.train_metrics.read_text())


def losses(metrics: dict) -> list[float]:
    return [row["loss"] for row in metrics["log_history"] if "loss" in row]


def reload_matches(run: Path, metrics: dict) -> float:
    """Largest difference between the reloaded adapter's scores and the in-memory model's on the same prompts."""
    import numpy as np

    from ulmrec_hf.ranker import load_ranker, score_prompts

    model, tokenizer, config = load_ranker(RunDir(run).ranker)
    check = metrics["reload_check"]
    return float(np.abs(score_prompts(model, tokenizer, check["prompts"], config["letter_token_ids"]) - np.array(check["scores"])).max())


def check(name: str, metrics: dict, single: list[float], tolerance: float, run: Path) -> dict:
    if "error" in metrics:
        return {"ok": False, **metrics}
    dist, mine = metrics["distributed"], losses(metrics)
    diff = max(abs(a - b) for a, b in zip(mine, single)) if mine and len(mine) == len(single) else float("inf")
    out = {"distributed": dist, "world_size": metrics["world_size"], "losses": mine, "max_loss_difference": diff,
           "reload_max_score_difference": reload_matches(run, metrics)}
    sharded = dist["type"] == "FSDP" and dist["sharded_parameters"] > 0 if name == "fsdp" else dist["type"] == "DEEPSPEED"
    out["ok"] = bool(metrics["world_size"] == 2 and sharded and diff <= tolerance and out["reload_max_score_difference"] < 1e-2)
    return out


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="A run directory with `tasks` finished.")
    parser.add_argument("--work", default="/tmp/ulmrec_gpu_multi")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batch", type=int, default=8, help="Global batch: one process takes all of it, two take half each.")
    parser.add_argument("--tolerance", type=float, default=0.05, help="Largest allowed per-step loss difference to one process.")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_multi.json"))
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="Extra `ulmrec train` flags (after --).")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        print(f"gpu_multi: needs 2 CUDA devices, found {torch.cuda.device_count()}; nothing run")
        return 0
    base, work = Path(args.run), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    flags = ["--max_steps", "8", "--eval_steps", "4", "--logging_steps", "1", "--report_to", "none", "--seed", "0",
             "--eval_before_training", "false", "--allow_worse_than_untrained", "true", *[f for f in args.flags if f != "--"]]
    single = train(work / "single", base, flags + ["--per_device_train_batch_size", str(args.batch)], None, work / "single.log")
    if "error" in single:
        print(single["error"])
        return 1
    results = {"single": {"losses": losses(single), "distributed": single["distributed"]}}
    for name in args.configs.split(","):
        metrics = train(work / name, base, flags + ["--per_device_train_batch_size", str(args.batch // 2)], CONFIGS[name], work / f"{name}.log")
        results[name] = check(name, metrics, losses(single), args.tolerance, work / name)
    Path(args.out).write_text(json.dumps({"gpus": torch.cuda.device_count(), "device": torch.cuda.get_device_name(0),
                                          "tolerance": args.tolerance, "results": results}, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'losses'})}")
    return 0 if all(r.get("ok", True) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
