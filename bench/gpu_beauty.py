"""Full-data Beauty on one GPU with SmolLM2-135M (issue 12): a Table-2 result with fused rows.

- LRURec on the full split (the paper's settings), the authors' GPT-3.5 preferences imported;
- indices: the authors' `paper_user_index.json` imported, and ours (`pid`) built on the CPU by bench/beauty_quality.py
  and carried (`--pid_index DIR`: a finished `user_index` folder made from the same prepared data and preferences);
- tasks for every training user in the paper protocol (all prefixes, random negatives, the retriever's order);
- LlamaRec-style (next-item only, no user field) and ULMRec (each index, all alignment tasks) trained 1 epoch with bf16
  LoRA, plus the zero-shot base; every test user evaluated, each row with its fused twin.

Every stage resumes and a finished one is skipped, so the run spans as many device calls as it needs
(bench/gpu_beauty.sh); results are written after each variant. `--dry_run` runs the same steps at tiny sizes on the CPU
(the demo data and a 2-layer Llama with SmolLM2's tokenizer), and a test runs it.

Usage: python bench/gpu_beauty.py [--dry_run] [--data DIR] [--model smollm2|PATH] [--pid_index DIR] [--only v1,v2]
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench_common import NO_ALIGN_TASKS, stage

from ulmrec_hf.layout import RunDir

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "amazon-beauty-ulmrec"
# variant -> (index flags or "pid", tasks flags, evaluate flags, trains)
VARIANTS = {
    "llamarec": (["--scheme", "none"], NO_ALIGN_TASKS, [], True),
    "zero_shot": (None, None, ["--zero_shot", "true", "--zero_shot_dtype", "bfloat16"], False),
    "ulmrec_paper_index": (["--scheme", "import", "--import_file", "{data}/paper_user_index.json"], [], ["--uid_only", "false"], True),
    "ulmrec_pid": ("pid", [], ["--uid_only", "false"], True),
}
FULL = {
    "retrieve": ["--dropout", "0.5", "--attn_dropout", "0.5", "--eval_every_steps", "500", "--patience", "20", "--max_epochs", "40"],
    "tasks": ["--protocol", "paper", "--max_length", "1024", "--history_len", "20", "--title_max_tokens", "32", "--max_validation_users", "5000"],
    "train": ["--bf16", "true", "--dtype", "bfloat16", "--learning_rate", "5e-4", "--per_device_train_batch_size", "16",
              "--per_device_eval_batch_size", "64", "--eval_steps", "1000", "--save_total_limit", "2", "--lora_target_modules", "q_proj", "v_proj",
              "--dataloader_num_workers", "2", "--report_to", "none"],
    "evaluate": ["--batch_size", "64"],
}
DRY = {
    "retrieve": ["--eval_every_steps", "3", "--patience", "2", "--max_epochs", "2", "--batch_size", "32", "--hidden", "32", "--ffn", "64"],
    "tasks": ["--protocol", "paper", "--max_length", "768", "--history_len", "5", "--max_train_samples", "24", "--max_eval_users", "40"],
    "train": ["--max_steps", "2", "--eval_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none",
              "--lora_target_modules", "q_proj", "v_proj", "--eval_before_training", "false"],
    "evaluate": [],
}


def dry_inputs(root: Path) -> tuple[Path, str]:
    """Demo data and a tiny Llama with SmolLM2's tokenizer, for the CPU dry run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ulmrec_hf.demo_data import DemoDataArguments
    from ulmrec_hf.demo_data import main as demo_data
    from ulmrec_hf.llm import load_tokenizer

    raw, model = root / "raw", root / "tiny_llm"
    demo_data(DemoDataArguments(output=str(raw), users=120))
    if not (model / "config.json").exists():  # the model folder, not a run directory
        tokenizer = load_tokenizer("smollm2")
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(model)
        tokenizer.save_pretrained(model)
    return raw, str(model)


def base_run(root: Path, data: Path, dry: bool, sizes: dict, times: dict) -> Path:
    base = root / "base"
    if dry:
        times["prepare"] = stage("prepare", base, ["--input", str(data)])
        times["preferences"] = stage("preferences", base, [])
        users = RunDir(base).prepared()["users"]["user"]
        (root / "paper_user_index.json").write_text(json.dumps({u: f" <a_{n % 8}> <b_{n}>" for n, u in enumerate(users)}))  # a stand-in
    else:
        times["prepare"] = stage("prepare", base, ["--input", str(data / "dataset.json")])
        times["preferences"] = stage("preferences", base, ["--backend", "import", "--import_file", str(data / "preferences.json"),
                                                          "--fallback", "offline-keywords"])
    times["retrieve"] = stage("retrieve", base, sizes["retrieve"])
    return base


def pid_index(base: Path, vdir: Path, carried: Path | None, dry: bool, times: dict) -> None:
    """Our index: built here for the dry run; on the GPU, the folder built on the CPU, checked against this run's inputs."""
    target = RunDir(vdir).path("index")
    if dry:
        times["index"] = stage("index", vdir, ["--scheme", "pid", "--text_source", "preferences", "--rq_levels", "3", "--rq_codebook_size", "16",
                                                "--rq_code_dim", "8", "--rq_hidden", "32", "--rq_epochs", "10", "--attention_steps", "5"])
        return
    if carried is None:
        raise SystemExit("ulmrec_pid needs --pid_index DIR (a finished user_index folder from bench/beauty_quality.py's base run)")
    if not target.exists():
        shutil.copytree(carried, target)
    recorded = RunDir(vdir).stage_inputs("index")
    here = RunDir(vdir).input_fingerprints(tuple(recorded))
    if recorded != here:
        raise SystemExit(f"{carried} was built from other data or preferences than this run ({recorded} != {here})")


def run_variant(name: str, root: Path, base: Path, model: str, args, sizes: dict) -> dict:
    from ulmrec_hf.runner import link_shared

    index_flags, task_flags, eval_flags, trains = VARIANTS[name]
    vdir, times = root / name, {}
    if name == "zero_shot":  # the LlamaRec-style prompts, scored by the base model
        link_shared(root / "llamarec", vdir, ("prepare", "retrieve", "preferences", "index", "tasks"))
    else:
        link_shared(base, vdir, ("prepare", "retrieve", "preferences"))
        if index_flags == "pid":
            pid_index(base, vdir, Path(args.pid_index) if args.pid_index else None, args.dry_run, times)
        else:
            times["index"] = stage("index", vdir, [f.format(data=root if args.dry_run else args.data) for f in index_flags])
        times["tasks"] = stage("tasks", vdir, ["--model_name_or_path", model, *sizes["tasks"], *task_flags])
    if trains:
        times["train"] = stage("train", vdir, ["--model_name_or_path", model, *sizes["train"]])
    times["evaluate"] = stage("evaluate", vdir, [*sizes["evaluate"], *eval_flags])
    run = RunDir(vdir)
    metrics, mixture = run.eval_metrics(), run.mixture()
    train = json.loads(run.ranker_files.train_metrics.read_text()) if trains else None
    return {"wall_s_this_call": times, "metrics": metrics, "train_samples": mixture["train_samples"],
            "next_item_samples": mixture["next_item_samples"], "steps": train["steps"] if train else 0,
            "train_runtime_s": next((h["train_runtime"] for h in train["log_history"] if "train_runtime" in h), None) if train else None}


def table(results: dict, retriever: dict) -> str:
    lines = ["| row | rank N@10 | rank R@10 | rank MRR@10 | overall N@10 | overall R@10 |", "|---|---|---|---|---|---|"]
    row = lambda label, m: lines.append(f"| {label} | {m['rank']['ndcg@10']:.4f} | {m['rank']['recall@10']:.4f} | {m['rank']['mrr@10']:.4f} | "  # noqa: E731
                                        f"{m['overall']['ndcg@10']:.4f} | {m['overall']['recall@10']:.4f} |")
    if retriever:
        row("LRURec (retriever order)", retriever)
    for name, r in results.items():
        test, w = r["metrics"]["test"], r["metrics"]["fusion"]["weight"]
        row(name, test["ranker"])
        row(f"{name} + LRURec fused (w={w:g}, chosen on validation)", test["fused"])
    return "\n".join(lines) + "\n"


def main() -> int:
    from ulmrec_hf.cli import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry_run", action="store_true", help="Tiny sizes on the CPU: demo data, a 2-layer Llama.")
    parser.add_argument("--data", default=str(DATA), help="The amazon-beauty-ulmrec folder.")
    parser.add_argument("--model", default="smollm2", help="The base LLM (the smollm2 alias, a path or a Hub id).")
    parser.add_argument("--pid_index", default=None, help="Our index, built on the CPU: a finished user_index folder.")
    parser.add_argument("--runs", default=None, help="Where the runs live (default bench/runs/gpu-beauty[-dry]).")
    parser.add_argument("--only", default=",".join(VARIANTS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    root = Path(args.runs or ROOT / "bench" / "runs" / ("gpu-beauty-dry" if args.dry_run else "gpu-beauty"))
    root.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        sizes, (data, model) = DRY, dry_inputs(root)
    else:
        sizes, data, model = FULL, Path(args.data), args.model
    if not args.dry_run and not (data / "dataset.json").exists():
        print(f"skip: {data}/dataset.json is absent")
        return 0
    start, times = time.time(), {}
    base = base_run(root, data, args.dry_run, sizes, times)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / ("gpu_beauty_dry.json" if args.dry_run else "gpu_beauty.json")
    saved = json.loads(out.read_text()) if out.exists() else {}
    results = {n: r for n, r in saved.get("results", {}).items() if n in VARIANTS}
    for name in [n for n in VARIANTS if n in args.only.split(",")]:
        results[name] = run_variant(name, root, base, model, args, sizes)
        retriever = results[name]["metrics"]["test"]["retriever"]
        summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU", "dry_run": args.dry_run, "model": model,
                   "protocol": results[name]["metrics"]["protocol"], "users": results[name]["metrics"]["users"],
                   "base_stage_wall_s_this_call": times, "wall_s_this_call": round(time.time() - start, 1),
                   "retriever_metrics": RunDir(base).retriever_metrics()["metrics"]["test"],
                   "results": results}
        out.write_text(json.dumps(summary, indent=2) + "\n")
        out.with_suffix(".md").write_text(table(results, retriever))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
