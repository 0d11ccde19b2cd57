"""Full-data Beauty on one GPU with SmolLM2-135M in one device lease (issue 12): a Table-2 result with fused rows.

- Nothing before the LLM is computed there: the base run is bench/beauty_quality.py's, finished on the CPU and carried
  (`--pack_base`): the prepared data, LRURec's candidates (the paper's settings), keyword preferences and our pid index.
- Variants in the paper protocol (all prefixes, random negatives, the retriever's order), every test user and 5,000
  validation users: `llamarec` (next-item rows only, no user field), `ulmrec_pid` (our index and every alignment task,
  half of its rows next-item, as the authors' task_ratio 0.5) and `zero_shot` (the base on llamarec's prompts). Both
  models train one epoch of `--steps` steps at batch 16 with bf16 LoRA.
- Each variant runs its stages in a process of its own (log: RUNS/<variant>.log): the two models side by side on the one
  GPU (a 135M model leaves it mostly idle), zero_shot as soon as llamarec's prompts exist.
- Results (every row with its fused twin, w chosen on validation, and paired 95 % CIs of per-user rank NDCG@10 against
  LRURec and llamarec) are written whenever a variant ends and at `--deadline_s`, which stops what still runs (every
  stage resumes in a later call).

`OPTIONS` holds the stages' option flags per model (`--options JSON` overrides them; null leaves a flag out).
`--dry_run` runs the same steps at tiny sizes on the CPU (demo data, a 2-layer Llama with SmolLM2's tokenizer and a base
built here), and a test runs it. bench/gpu_beauty.sh packs everything and runs it on a lent GPU.

Usage: python bench/gpu_beauty.py [--dry_run] [--base DIR] [--steps N] [--options JSON] [--deadline_s S] [--only v1,v2]
       python bench/gpu_beauty.py --pack_base DIR --to FILE.tar.xz
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from bench_common import NO_ALIGN_TASKS, add_wall, ci_text, paired, per_user, stage

from ulmrec_hf.layout import COMPLETE, STARTED, RunDir
from ulmrec_hf.runner import link_shared

ROOT = Path(__file__).resolve().parents[1]
BENCH_RUNS = Path(os.environ.get("ULMREC_BENCH_RUNS", ROOT / "bench" / "runs"))
STEPS = 600  # measured: see bench/gpu_beauty.sh for the time budget of one lease
BATCH = 16
HALF = 0.5  # ulmrec_pid's next-item share; Beauty has no ratings, so the other four tasks share the other half
# Option flags of the stages, per model; "all" applies to every row (zero_shot too). null: the flag is not passed.
OPTIONS = {
    "llamarec": {"tasks": {"candidate_permutations": 1},
                 "train": {"next_item_loss": "lm", "loss_normalization": "token", "index_token_init": "mean"}},
    "ulmrec_pid": {"tasks": {"candidate_permutations": 1},
                   "train": {"next_item_loss": "lm", "loss_normalization": "token", "index_token_init": "mean"}},
    "all": {"evaluate": {"eval_permutations": 1}},
}


class Variant(NamedTuple):
    index: list[str] | None  # index flags; None: the base's index (ours)
    tasks: list[str]
    next_item_share: float  # of the training rows
    evaluate: list[str]
    prompts_of: str | None = None  # scores this variant's prompts with the base model: no tasks or training of its own


VARIANTS = {
    "llamarec": Variant(["--scheme", "none"], NO_ALIGN_TASKS, 1.0, ["--uid_only", "false"]),
    "ulmrec_pid": Variant(None, [f"--p_{t}={HALF / 4}" for t in ("index_to_preference", "preference_to_index", "history_to_index", "intent")],
                          HALF, ["--uid_only", "true"]),
    "zero_shot": Variant(None, [], 0.0, ["--zero_shot", "true", "--zero_shot_dtype", "bfloat16"], prompts_of="llamarec"),
}
FULL = {
    "tasks": ["--protocol", "paper", "--max_length", "1024", "--history_len", "20", "--title_max_tokens", "32", "--max_validation_users", "5000"],
    "train": ["--bf16", "true", "--dtype", "bfloat16", "--load_in_4bit", "false", "--activation_checkpointing", "false", "--learning_rate", "5e-4",
              "--per_device_eval_batch_size", "64", "--save_total_limit", "2", "--lora_target_modules", "q_proj", "v_proj",
              "--dataloader_num_workers", "2", "--report_to", "none"],
    "evaluate": ["--batch_size", "64"],
}
DRY = {
    "tasks": ["--protocol", "paper", "--max_length", "768", "--history_len", "5", "--max_eval_users", "40"],
    "train": ["--report_to", "none", "--lora_target_modules", "q_proj", "v_proj", "--eval_before_training", "false"],
    "evaluate": [],
}
WALL = "wall_s.json"  # seconds per stage in each variant's folder, summed over the calls that ran it


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


def dry_base(root: Path, raw: Path) -> Path:
    """The CPU dry run's stand-in for the carried base: demo data, keyword preferences, a small LRURec and pid index."""
    base = root / "base"
    stage("prepare", base, ["--input", str(raw)])
    stage("preferences", base, [])
    stage("retrieve", base, ["--eval_every_steps", "3", "--patience", "2", "--max_epochs", "2", "--batch_size", "32", "--hidden", "32", "--ffn", "64"])
    stage("index", base, ["--scheme", "pid", "--text_source", "preferences", "--rq_levels", "3", "--rq_codebook_size", "16", "--rq_code_dim", "8",
                          "--rq_hidden", "32", "--rq_epochs", "10", "--attention_steps", "5"])
    return base


def carried(base: Path) -> list[Path]:
    """What the stages here read of the base run: the prepare, preferences and index folders, and of the retriever its
    candidates, metrics and stage records (not its model or checkpoint)."""
    run = RunDir(base)
    folder = run.path("retrieve")
    return [run.path(s) for s in ("prepare", "preferences", "index")] + [run.candidates_path, run.retriever_metrics_file,
                                                                          folder / COMPLETE, folder / STARTED]


def check_base(base: Path) -> None:
    """Every stage of the base finished, made from the inputs it holds (their fingerprints travel in the stage records)."""
    run = RunDir(base)
    for name in ("prepare", "retrieve", "preferences", "index"):
        recorded = run.stage_inputs(name)
        here = run.input_fingerprints(tuple(recorded))
        if recorded != here:
            raise SystemExit(f"{run.path(name)} was made from other inputs than {base} holds ({recorded} != {here})")
    if not run.candidates_path.exists():
        raise SystemExit(f"{run.candidates_path}: missing")


def pack_base(base: Path, to: Path) -> None:
    """The carried part of the base as tar.xz (links followed), checked by unpacking it: the stages accept it."""
    with tarfile.open(to, "w:xz", preset=9, dereference=True) as tar:
        for path in carried(base):
            tar.add(path, arcname=str(path.relative_to(base)))
    with tempfile.TemporaryDirectory() as tmp:
        unpack(to, Path(tmp))
        check_base(Path(tmp))
        fingerprints = {s: RunDir(tmp).stage_fingerprint(s) for s in ("prepare", "retrieve", "preferences", "index")}
        if fingerprints != {s: RunDir(base).stage_fingerprint(s) for s in fingerprints}:
            raise SystemExit(f"{to}: unpacked stage fingerprints differ from {base}'s")
    print(f"{to}: {to.stat().st_size / 2**20:.1f} MiB, stages {fingerprints}")


def unpack(archive: Path, target: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")


def chosen(options: dict, variant: str, name: str) -> dict:
    """The options of one stage of a variant: the rows' common ones, then the model's own."""
    return {**options.get("all", {}).get(name, {}), **options.get(variant, {}).get(name, {})}


def option_flags(options: dict, variant: str, name: str) -> list[str]:
    return [arg for key, value in chosen(options, variant, name).items() if value is not None for arg in (f"--{key}", str(value))]


def merged(old: dict, new: dict) -> dict:
    return {k: merged(old.get(k, {}), v) if isinstance(v, dict) else v for k, v in {**old, **new}.items()}


def run_variant(name: str, root: Path, base: Path, model: str, steps: int, options: dict, dry: bool) -> None:
    """One variant's stages, in this process (a child of the main one)."""
    v, vdir = VARIANTS[name], root / name
    sizes, batch = (DRY, 4) if dry else (FULL, BATCH)

    def timed(stage_name: str, flags: list[str]) -> None:
        add_wall(vdir / WALL, stage_name, stage(stage_name, vdir, [*flags, *option_flags(options, name, stage_name)], label=name))

    if v.prompts_of:
        link_shared(root / v.prompts_of, vdir, ("prepare", "retrieve", "preferences", "index", "tasks"))
    else:
        link_shared(base, vdir, ("prepare", "retrieve", "preferences") + (("index",) if v.index is None else ()))
        if v.index is not None:
            timed("index", v.index)
        permutations = chosen(options, name, "tasks").get("candidate_permutations") or 1
        targets = max(1, round(steps * batch * v.next_item_share / permutations))  # next-item rows stay steps x batch x share
        timed("tasks", ["--model_name_or_path", model, *sizes["tasks"], "--max_train_samples", str(targets), *v.tasks])
        timed("train", ["--model_name_or_path", model, *sizes["train"], "--per_device_train_batch_size", str(batch),
                        "--eval_steps", str(max(1, steps // 4))])
    timed("evaluate", [*sizes["evaluate"], *v.evaluate])


class Scheduler:
    """Each variant's process, started once its inputs exist; all stopped at the deadline; results after each one ends."""

    def __init__(self, args, root: Path, base: Path, model: str, report):
        self.args, self.root, self.base, self.model, self.report = args, root, base, model, report
        self.waiting = [n for n in VARIANTS if n in args.only.split(",")]
        self.running = {}

    def ready(self, name: str) -> bool:
        shared = VARIANTS[name].prompts_of
        return shared is None or RunDir(self.root / shared).is_complete("tasks")

    def start(self, name: str) -> None:
        cmd = [sys.executable, __file__, "--child", name, "--runs", str(self.root), "--base", str(self.base), "--model", self.model,
               "--steps", str(self.args.steps), "--options", json.dumps(self.args.options), *(["--dry_run"] if self.args.dry_run else [])]
        log = open(self.root / f"{name}.log", "a")  # noqa: SIM115 (the child writes it; closed when the child ends)
        self.running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
        self.waiting.remove(name)
        print(f"[{self.elapsed()}] {name}: started (log {log.name})", flush=True)

    def end(self, name: str, stopped: bool = False) -> None:
        """A variant's process has ended: the end of its log when it failed by itself, then the results so far."""
        proc, log = self.running.pop(name)
        log.close()
        print(f"[{self.elapsed()}] {name}: exit {proc.returncode}{' (stopped)' if stopped else ''}", flush=True)
        if proc.returncode and not stopped:
            print("".join(Path(log.name).read_text().splitlines(keepends=True)[-25:]), flush=True)
        if not stopped:
            self.report()

    def elapsed(self) -> str:
        return f"{time.time() - self.args.started:.0f} s"

    def run(self) -> bool:
        """True when every variant ended before the deadline."""
        deadline = self.args.started + self.args.deadline_s
        try:
            while self.waiting or self.running:
                for name in [n for n in self.waiting if self.ready(n)]:
                    self.start(name)
                for name in [n for n, (p, _) in self.running.items() if p.poll() is not None]:
                    self.end(name)
                for name in [n for n in self.waiting if VARIANTS[n].prompts_of not in self.running and not self.ready(n)]:
                    print(f"{name}: {VARIANTS[name].prompts_of}'s tasks are missing and nothing makes them; skipped", flush=True)
                    self.waiting.remove(name)
                if time.time() > deadline:
                    print(f"[{self.elapsed()}] deadline: stopping {sorted(self.running)}; a later call resumes them", flush=True)
                    return False
                time.sleep(2)
            return True
        finally:
            self.stop()

    def stop(self, grace_s: float = 15) -> None:
        """SIGINT to what still runs (a stage stops as after Ctrl-C), then SIGKILL to what has not ended after `grace_s`."""
        for proc, _ in self.running.values():
            proc.send_signal(signal.SIGINT)
        give_up = time.time() + grace_s
        for name in list(self.running):
            proc = self.running[name][0]
            try:
                proc.wait(timeout=max(0.1, give_up - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.end(name, stopped=True)


def train_summary(run: RunDir) -> dict:
    """Steps and speed from train_metrics.json (train_runtime includes the validations during training)."""
    t = json.loads(run.ranker_files.train_metrics.read_text())
    end = next(h for h in t["log_history"] if "train_runtime" in h)
    validation = round(sum(h.get("eval_runtime", 0) for h in t["log_history"]), 1)
    return {"steps": t["steps"], "train_runtime_s": end["train_runtime"], "steps_per_s": end["train_steps_per_second"],
            "steps_per_s_without_validation": round(t["steps"] / max(end["train_runtime"] - validation, 1e-9), 2),
            "validation_s_in_training": validation, "best_validation": t["best"], "untrained": t["untrained"]}


def variant_result(root: Path, name: str) -> dict:
    run, vdir = RunDir(root / name), root / name
    out = {"finished": [s for s in ("index", "tasks", "train", "evaluate") if run.is_complete(s)],
           "wall_s": json.loads((vdir / WALL).read_text()) if (vdir / WALL).exists() else {}}
    if run.is_complete("tasks"):
        mixture = run.mixture()
        out["rows"] = {"train_samples": mixture["train_samples"], "next_item_samples": mixture["next_item_samples"],
                       "tasks": {t: m["rows"] for t, m in mixture["tasks"].items()}}
    if run.is_complete("train") and not VARIANTS[name].prompts_of:
        out["train"] = train_summary(run)
    if run.is_complete("evaluate"):
        out["metrics"] = run.eval_metrics()
    return out


def table_rows(root: Path, results: dict) -> dict:
    """label -> (per-user rank NDCG@10, test metrics, fusion weight) of every evaluated row, LRURec's first."""
    rows = {}
    for name, r in results.items():
        if "metrics" not in r:
            continue
        users, test, w = per_user(root / name), r["metrics"]["test"], r["metrics"]["fusion"]["weight"]
        rows.setdefault("LRURec (retriever order)", (users["retriever"], test["retriever"], None))
        rows[name] = (users["ranker"], test["ranker"], None)
        rows[f"{name} + LRURec fused"] = (users["fused"], test["fused"], w)
        for row, key, text in (("uid_only", "ranker_uid_only", "uid-only"), ("uid_only_swapped_index", "ranker_uid_only_swapped_index",
                                                                              "uid-only, every index another user's"), ("random_order", "random_order", "random order")):
            if row in users:
                rows[f"{name} {text}"] = (users[row], test[key], None)
    return rows


def compared(rows: dict) -> dict:
    lrurec, llamarec = rows["LRURec (retriever order)"][0], rows.get("llamarec", (None,))[0]
    return {label: {"rank": m["rank"], "overall": m["overall"], "fusion_weight": w, "vs_lrurec": paired(v, lrurec),
                    "vs_llamarec": paired(v, llamarec) if llamarec else None} for label, (v, m, w) in rows.items()}


def report(args, root: Path, base: Path, model: str, extra: dict) -> dict:
    import importlib.metadata as md

    import torch

    results = {n: variant_result(root, n) for n in VARIANTS if (root / n).exists()}
    rows = table_rows(root, results)
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU", "dry_run": args.dry_run, "model": model,
               "versions": {p: md.version(p) for p in ("torch", "transformers", "trl", "peft", "datasets")},
               "steps": args.steps, "batch": 4 if args.dry_run else BATCH, "options": args.options, "base": str(base),
               "retriever_metrics": RunDir(base).retriever_metrics()["metrics"]["test"], **extra,
               "wall_s_run": round(time.time() - args.started, 1),
               "wall_s_call": round(time.time() - float(os.environ.get("CALL_START", args.started)), 1),
               "results": results, "table": compared(rows) if rows else {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(summary))
    return summary


def markdown(s: dict) -> str:
    lines = [f"# Beauty on {s['device']}: {'a tiny Llama (dry run)' if s['dry_run'] else 'SmolLM2-135M-Instruct, bf16 LoRA'}, paper protocol", "",
             f"- {s['steps']} steps at batch {s['batch']}; options {json.dumps(s['options'])}",
             (f"- wall: this run {s['wall_s_run']:.0f} s, this device call {s['wall_s_call']:.0f} s; "
              f"stopped at the deadline: {s.get('stopped_at_deadline')}")]
    for name, r in s["results"].items():
        train = r.get("train", {})
        speed = (f", {train['steps']} steps at {train['steps_per_s']} steps/s ({train['steps_per_s_without_validation']} without the "
                 f"{train['validation_s_in_training']} s of validation)") if train else ""
        lines.append(f"- {name}: finished {', '.join(r['finished']) or 'nothing'}; rows {r.get('rows', {}).get('tasks')}{speed}; wall {r['wall_s']}")
    lines += ["", "| row | rank N@10 | rank R@10 | rank MRR@10 | overall N@10 | overall R@10 | Δ vs LRURec (95 % CI) | Δ vs llamarec (95 % CI) |",
              "|---|---|---|---|---|---|---|---|"]
    for label, r in s["table"].items():
        name = f"{label} (w={r['fusion_weight']:g}, chosen on validation)" if r["fusion_weight"] is not None else label
        lines.append(f"| {name} | {r['rank']['ndcg@10']:.4f} | {r['rank']['recall@10']:.4f} | {r['rank']['mrr@10']:.4f} | "
                     f"{r['overall']['ndcg@10']:.4f} | {r['overall']['recall@10']:.4f} | {ci_text(r['vs_lrurec'])} | {ci_text(r['vs_llamarec'])} |")
    return "\n".join(lines) + "\n"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry_run", action="store_true", help="Tiny sizes on the CPU: demo data, a 2-layer Llama, a base built here.")
    parser.add_argument("--base", type=Path, default=BENCH_RUNS / "beauty-quality" / "base", help="The finished base run (carried).")
    parser.add_argument("--model", default="smollm2", help="The base LLM (the smollm2 alias, a path or a Hub id).")
    parser.add_argument("--steps", type=int, default=None, help=f"Training steps of each model (default {STEPS}; 2 with --dry_run).")
    parser.add_argument("--options", type=json.loads, default={}, help="JSON merged into OPTIONS, e.g. '{\"llamarec\": {\"train\": {\"next_item_loss\": \"letters\"}}}'.")
    parser.add_argument("--deadline_s", type=float, default=float("inf"), help="Stop every stage this many seconds after the start; results stay.")
    parser.add_argument("--runs", type=Path, default=None, help="Where the runs live (default bench/runs/gpu-beauty[-dry]).")
    parser.add_argument("--only", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--pack_base", type=Path, default=None, help="Write the carried part of this base run to --to and check it.")
    parser.add_argument("--to", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.started, args.options = time.time(), merged(OPTIONS, args.options)
    args.steps = args.steps or (2 if args.dry_run else STEPS)
    args.runs = args.runs or ROOT / "bench" / "runs" / ("gpu-beauty-dry" if args.dry_run else "gpu-beauty")
    args.out = args.out or ROOT / "bench" / "results" / ("gpu_beauty_dry.json" if args.dry_run else "gpu_beauty.json")
    return args


def main() -> int:
    from ulmrec_hf.cli import setup_logging
    from ulmrec_hf.llm import resolve_model_path

    setup_logging()
    args = parse_args()
    if args.pack_base:
        pack_base(args.pack_base, args.to)
        return 0
    root = args.runs
    root.mkdir(parents=True, exist_ok=True)
    if args.child:
        run_variant(args.child, root, args.base, args.model, args.steps, args.options, args.dry_run)
        return 0
    raw, model = dry_inputs(root) if args.dry_run else (None, args.model)
    base = dry_base(root, raw) if args.dry_run else args.base
    if not RunDir(base).path("prepare").exists():
        print(f"skip: {base} holds no base run (bench/beauty_quality.py makes it; bench/gpu_beauty.sh pack carries it)")
        return 0
    check_base(base)
    start = time.time()
    resolve_model_path(model)  # the smollm2 alias converts its GGUF once, here, before the children read it
    extra = {"model_load_s": round(time.time() - start, 1)}
    done = False
    try:
        done = Scheduler(args, root, base, model, lambda: report(args, root, base, model, extra)).run()
    finally:  # also when the shell's timeout interrupts this process
        print(markdown(report(args, root, base, model, {**extra, "stopped_at_deadline": not done})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
