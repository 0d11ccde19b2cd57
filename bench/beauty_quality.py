"""Does the LLM re-ranker earn its place on real Beauty? The paper's Table 2 at CPU scale (SmolLM2-135M, LoRA), issues 12 and 21.

Two protocols side by side, every row on the same test users and candidates:
- paper: the retriever's order at evaluation (letter A is LRURec's top-1), as the authors' code evaluates;
- shuffled: a seeded shuffle per user, which measures what the LLM itself understands.
Training is the authors' in both (every prefix of each training sequence, 19 random negatives, shuffled), so each model
is trained once on identical rows (checked), with its final checkpoint only, and scored under both orders.

Three parts, each resumable:
1. v0.4's rows (the paper's training options): LRURec order; zero-shot SmolLM2 (LlamaRec prompts, no tuning);
   LlamaRec-style (next-item only, no user field); ULMRec pid (our index + every alignment task; the same next-item rows,
   alignment rows on top); each LLM row also fused with LRURec, z(retriever) + w z(letter log-prob), w chosen on validation.
2. Options chosen on validation users only (paper protocol, each model's 400 next-item rows, the validation users the
   fusion weight uses): the loss (`next_item_loss`, `loss_normalization`), then ULMRec's `index_token_init`, then
   `eval_permutations` (1 or 3) per model and protocol, on that protocol's validation prompts. A challenger replaces the incumbent (the paper's option, or the cheaper k) only
   when it beats it by more than one paired standard error, the rule the fusion weight follows. The loss options are tried
   as one challenger (`letters` with `sample`: the pair that removes the dilution of the letter rows), not one by one, and
   `candidate_permutations` stays 1 (it multiplies the training rows): this CPU budget allows no more trainings.
3. The test table, run once, with what validation chose: zero-shot, LlamaRec-style and ULMRec (every alignment task), ULMRec
   with none, LlamaRec-style and ULMRec with 4x the next-item rows; uid-only, swapped-index and random-order rows of ULMRec.
   A row whose chosen settings are part 1's (the paper's options, one candidate order) is part 1's evaluation, not a
   second scoring of the same test users.
Paired 95 % CIs of per-user rank NDCG@10 against LRURec and against LlamaRec-style at equal next-item rows, and paired
contrasts for the rows' own questions (the alignment tasks, 4x rows, the user's own index against another user's).

Usage: python bench/beauty_quality.py [--train_samples 400] [--eval_users 8000] [--validation_users 4000] [--report_only]
Environment: ULMREC_BENCH_RUNS=DIR keeps the runs outside the checkout; ULMREC_BENCH_LOCK=FILE makes each stage hold that
lock (flock), so that other jobs sharing a 2-core machine run between stages instead of beside them.
Resumable (bench/runs/beauty-quality/): finished stages are skipped and training resumes. Part 1 took 179 min on 2 cores
including LRURec; parts 2 and 3 take several hours more (run it in the background, in as many sessions as it needs:
nohup python bench/beauty_quality.py > bench/runs/beauty-quality.log 2>&1 &); --report_only writes the tables of what
has finished.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench_common import NO_ALIGN_TASKS, add_wall, ci_text, held, paired, per_user
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
WALL = RUNS / "wall_s.json"  # seconds per stage, summed over the calls that ran it (a resumed or killed attempt adds up)
TRAIN = ["--eval_before_training", "false", "--eval_steps", "1000000"]  # the final weights, scored once at the end
# Part 3's longer trainings keep a checkpoint every 25 steps, so a session that ends mid-training loses little (the final
# weights are kept either way: nothing is evaluated before the end).
RESUMABLE = ["--save_steps", "25", "--load_best_model_at_end", "false"]
DEFAULTS = {"next_item_loss": "lm", "loss_normalization": "token", "index_token_init": "mean"}  # the paper's training options
# Challengers tried on validation, one step after another; each step starts from what the step before chose.
STEPS = {"llamarec": [("loss", [{"next_item_loss": "letters"}])],
         "ulmrec_pid": [("loss", [{"next_item_loss": "letters", "loss_normalization": "sample"}]),
                        ("index_token_init", [{"index_token_init": "text"}])],
         "zero_shot": []}
EVAL_PERMUTATIONS = (1, 3)
SELECTION = RUNS / "select" / "selection.json"
X4 = 4  # the larger training budget: this many times the next-item rows


def stage(name: str, run: Path, flags: list[str]) -> None:
    """One stage with the recipe, holding STAGE_LOCK; its seconds (a killed attempt's included) are added to WALL."""
    run_timed(name, run, flags, recipe=RECIPE, lock=STAGE_LOCK, label=str(run.relative_to(RUNS)), wall=(WALL, f"{run.relative_to(RUNS)}/{name}"))


def read_selection() -> dict:
    """Part 2's record of what validation chose ({} before it starts)."""
    return json.loads(SELECTION.read_text()) if SELECTION.exists() else {}


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


def protocol_pair(base: Path, root: Path, name: str, model: str, tasks: list[str], train: list[str], evaluate: dict) -> None:
    """One model (runs root/<protocol>/<name>): tasks and training in the paper protocol, evaluated there; then the shuffled
    protocol's tasks (identical training rows, checked) and the same ranker evaluated on them (`evaluate`: each protocol's flags)."""
    index = [] if model == "ulmrec_pid" else ["--scheme", "none"]
    for protocol in PROTOCOLS:
        run = root / protocol / name
        link_shared(base, run, ("prepare", "retrieve", "preferences") + (() if index else ("index",)))
        if index:
            stage("index", run, index)
        stage("tasks", run, ["--protocol", protocol, *tasks])
        if protocol == "paper":
            stage("train", run, train)
            stage("evaluate", run, evaluate[protocol])
        else:
            paper = root / "paper" / name
            same_rows(paper, run)
            stage("evaluate", run, [*evaluate[protocol], "--ranker", str(RunDir(paper).ranker)])


def model_runs(base: Path, common: list[str]) -> None:
    """Part 1: each model with the paper's training options, then the zero-shot base on LlamaRec-style prompts."""
    for model, flags in MODELS.items():
        protocol_pair(base, RUNS, model, model, [*common, *flags], TRAIN, dict.fromkeys(PROTOCOLS, ["--uid_only", "false"]))
    for protocol in PROTOCOLS:
        zero = RUNS / protocol / "zero_shot"
        link_shared(RUNS / protocol / "llamarec", zero, ("prepare", "retrieve", "preferences", "index", "tasks"))
        stage("evaluate", zero, ["--zero_shot", "true", "--zero_shot_dtype", "bfloat16"])


def same_rows(a: Path, b: Path) -> None:
    rows = [RunDir(r).task("train")["prompt"] for r in (a, b)]
    if rows[0] != rows[1]:
        raise SystemExit(f"{a} and {b} have different training rows; a ranker cannot be shared between them")


# -- part 2: options chosen on validation users ----------------------------------------------------------------------
def option_flags(options: dict) -> list[str]:
    return [arg for key, value in options.items() for arg in (f"--{key}", value)]


def label(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def trained(model: str, options: dict) -> Path:
    """The paper-protocol run whose ranker learned `model`'s part-1 rows with `options` (part 1's own run for the paper's)."""
    paper = RUNS / "paper" / model
    if options == DEFAULTS or model == "zero_shot":
        return paper
    run = RUNS / "select" / model / "__".join(f"{k}-{v}" for k, v in options.items() if DEFAULTS[k] != v)
    link_shared(paper, run, ("prepare", "retrieve", "preferences", "index", "tasks"))
    stage("train", run, [*TRAIN, *option_flags(options)])
    return run


def validation_ndcg(model: str, run: Path, k: int, protocol: str = "paper"):
    """Per-user rank NDCG@10 of `run`'s model on the protocol's validation prompts over k candidate orders. The paper
    protocol's k = 1 scores are the ones training (or part 1's zero-shot evaluation) saved; the others are scored here
    once, holding STAGE_LOCK, and kept in select/."""
    import numpy as np

    from ulmrec_hf.metrics import score_metrics

    prompts = RunDir(run if protocol == "paper" else RUNS / protocol / ("llamarec" if model == "zero_shot" else model))
    validation = prompts.eval_set("validation")
    scores = validation_scores(model, run, prompts, validation, k, protocol)
    return np.array(score_metrics(scores, np.array(validation["target_position"]), ks=(10,), per_user=True)["per_user"]["ndcg@10"])


def validation_scores(model: str, run: Path, prompts: RunDir, validation, k: int, protocol: str):
    import numpy as np

    from ulmrec_hf.common import read_json

    r = RunDir(run)
    if protocol == "paper" and k == 1:
        if model == "zero_shot":
            import datasets

            return np.array(datasets.load_from_disk(str(r.eval_per_user))["validation"]["scores"], dtype=np.float32)
        return np.array(read_json(r.ranker_files.validation_scores)["scores"], dtype=np.float32)
    name = run.relative_to(RUNS).as_posix().replace("/", "_")
    cache = RUNS / "select" / (f"validation_k{k}_{name}.npy" if protocol == "paper" else f"validation_{protocol}_k{k}_{name}.npy")
    if not cache.exists():
        first = validation_scores(model, run, prompts, validation, 1, protocol) if k > 1 else None
        with held(STAGE_LOCK):
            start = time.time()
            np.save(cache, more_orders(model, r, prompts, validation, first, k))
            add_wall(WALL, f"{run.relative_to(RUNS)}/{protocol} validation scored over {k} candidate orders", round(time.time() - start, 1))
    return np.load(cache)


def more_orders(model: str, run: RunDir, prompts: RunDir, validation, first, k: int):
    """`run`'s model's scores of `prompts`' validation set over k candidate orders, as `evaluate --eval_permutations k`
    computes them (`first`: the shown order's scores, when known)."""
    from ulmrec_hf.evaluate import EvaluateArguments, load_model, score, user_keys

    args = EvaluateArguments(eval_permutations=k, zero_shot=model == "zero_shot", zero_shot_dtype="bfloat16")
    return score(*load_model(run, args), validation, args, "validation", user_keys(prompts, "validation", validation), first)


def challenge(incumbent: str, ndcg: dict) -> tuple[str, dict]:
    """The best challenger when its mean validation NDCG@10 beats the incumbent's by more than one paired standard error
    (a smaller gain is noise on a few hundred users), else the incumbent; with each one's record."""
    import numpy as np

    base, record = ndcg[incumbent], {}
    for name, v in ndcg.items():
        d = v - base
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if name != incumbent else 0.0
        record[name] = {"ndcg@10": round(float(v.mean()), 4), "diff_vs_incumbent": round(float(d.mean()), 4), "paired_se": round(se, 4)}
    winners = [n for n, r in record.items() if n != incumbent and r["diff_vs_incumbent"] > r["paired_se"]]
    return (max(winners, key=lambda n: record[n]["ndcg@10"]) if winners else incumbent), record


def select(model: str) -> dict:
    """Part 2 for one model: each step's options, then eval_permutations, chosen on validation users."""
    options, steps = dict(DEFAULTS), []
    for step, challengers in STEPS[model]:
        tried = {label(o): o for o in [options] + [{**options, **c} for c in challengers]}
        ndcg = {name: validation_ndcg(model, trained(model, o), 1) for name, o in tried.items()}
        chosen, record = challenge(label(options), ndcg)
        steps.append({"step": step, "incumbent": label(options), "chosen": chosen, "candidates": record})
        options = tried[chosen]
    run = trained(model, options)
    return {"options": options, "run": str(run.relative_to(RUNS)), "steps": steps + [orders_step(model, run, "paper")]}


def orders_step(model: str, run: Path, protocol: str) -> dict:
    """eval_permutations chosen on the protocol's validation users (1, the cheaper, is the incumbent)."""
    ndcg = {str(k): validation_ndcg(model, run, k, protocol) for k in EVAL_PERMUTATIONS}
    k, record = challenge(str(EVAL_PERMUTATIONS[0]), ndcg)
    return {"step": f"eval_permutations ({protocol})", "incumbent": str(EVAL_PERMUTATIONS[0]), "chosen": k, "candidates": record}


def selection() -> dict:
    """Part 2 for every model, kept in select/selection.json as it goes; then each protocol's eval_permutations."""
    chosen = read_selection()
    for model in STEPS:
        if model not in chosen:
            chosen[model] = select(model)
        r = chosen[model]
        if r.pop("eval_permutations", None) is not None:  # chosen before it was chosen per protocol: the paper protocol's
            next(s for s in r["steps"] if s["step"] == "eval_permutations")["step"] = "eval_permutations (paper)"
        for protocol in PROTOCOLS:
            if f"eval_permutations ({protocol})" not in {s["step"] for s in r["steps"]}:
                r["steps"].append(orders_step(model, RUNS / r["run"], protocol))
        SELECTION.write_text(json.dumps(chosen, indent=2) + "\n")
    return chosen


def orders(chosen: dict, model: str, protocol: str) -> int:
    """The eval_permutations validation chose for this model and protocol."""
    return int(next(s["chosen"] for s in chosen[model]["steps"] if s["step"] == f"eval_permutations ({protocol})"))


def gpu_options(chosen: dict) -> dict:
    """What validation chose, as bench/gpu_beauty.py's --options (GPU_BEAUTY_OPTIONS): each model's training options and
    its candidate orders in the paper protocol, the protocol that bench scores."""
    out = {model: {"evaluate": {"eval_permutations": orders(chosen, model, "paper")}} for model in STEPS}
    for model in STEPS:
        if model != "zero_shot":
            out[model]["train"] = chosen[model]["options"]
    return out


# -- part 3: the test table with what validation chose -------------------------------------------------------------
def eval_flags(name: str, model: str, chosen: dict, protocol: str) -> list[str]:
    """Evaluate flags of run `name` (trained as `model`): the orders validation chose; uid-only rows for ULMRec's main row."""
    zero = ["--zero_shot", "true", "--zero_shot_dtype", "bfloat16"] if model == "zero_shot" else []
    return [*zero, "--eval_permutations", str(orders(chosen, model, protocol)), "--uid_only", str(name == "ulmrec_pid").lower()]


def part_one(name: str, chosen: dict, protocol: str) -> bool:
    """Whether part 1 already scored this row on test with what validation chose (the paper's options, one candidate
    order; its tasks hold no uid-only prompts), so that its test users are not scored a second time."""
    return name in ("zero_shot", "llamarec") and chosen[name]["options"] == DEFAULTS and orders(chosen, name, protocol) == 1


def chosen_run(name: str, chosen: dict, protocol: str) -> Path:
    """Where part 3's row `name` is evaluated in `protocol`: part 1's run when that is the same evaluation."""
    return RUNS / protocol / name if part_one(name, chosen, protocol) else RUNS / "chosen" / protocol / name


def chosen_runs(base: Path, chosen: dict, common: list[str], x4: list[str]) -> None:
    """Part 3: the part-2 rankers scored on test once (both protocols), and the rows trained here with the chosen options."""
    for model in ("zero_shot", "llamarec", "ulmrec_pid"):
        tasks_from = "llamarec" if model == "zero_shot" else model
        ranker = [] if model == "zero_shot" else ["--ranker", str(RunDir(RUNS / chosen[model]["run"]).ranker)]
        for protocol in PROTOCOLS:
            run = chosen_run(model, chosen, protocol)
            if run.is_relative_to(RUNS / "chosen"):
                link_shared(RUNS / protocol / tasks_from, run, ("prepare", "retrieve", "preferences", "index", "tasks"))
                stage("evaluate", run, [*ranker, *eval_flags(model, model, chosen, protocol)])
    for name, (model, tasks) in own_rows(common, x4).items():
        protocol_pair(base, RUNS / "chosen", name, model, tasks, [*TRAIN, *RESUMABLE, *option_flags(chosen[model]["options"])],
                      {protocol: eval_flags(name, model, chosen, protocol) for protocol in PROTOCOLS})


OWN = {"ulmrec_no_align": "ulmrec_pid", f"llamarec_x{X4}": "llamarec", f"ulmrec_pid_x{X4}": "ulmrec_pid"}  # part 3's trainings: whose options


def own_rows(common: list[str], x4: list[str]) -> dict:
    """Part 3's own trainings, name -> (the model whose options it takes, its tasks flags)."""
    tasks = {"ulmrec_no_align": [*common, *NO_ALIGN_TASKS], f"llamarec_x{X4}": [*x4, *NO_ALIGN_TASKS], f"ulmrec_pid_x{X4}": x4}
    return {name: (OWN[name], tasks[name]) for name in OWN}


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


CHOSEN = {"zero-shot": "zero_shot", "LlamaRec-style": "llamarec", "ULMRec": "ulmrec_pid", "ULMRec, no alignment": "ulmrec_no_align",
          f"LlamaRec-style, {X4}x rows": f"llamarec_x{X4}", f"ULMRec, {X4}x rows": f"ulmrec_pid_x{X4}"}
UID_ROWS = {"uid_only": "ULMRec uid-only (index + candidates)", "uid_only_swapped_index": "ULMRec uid-only, every index another user's",
            "random_order": "random order"}
# Paired contrasts that answer a row's own question: (row, baseline, what the difference measures).
CONTRASTS = [("ULMRec", "ULMRec, no alignment", "the alignment tasks"),
             (f"LlamaRec-style, {X4}x rows", "LlamaRec-style", f"{X4}x next-item rows, LlamaRec-style"),
             (f"ULMRec, {X4}x rows", "ULMRec", f"{X4}x next-item rows, ULMRec"),
             ("ULMRec", UID_ROWS["uid_only"], "the history (ULMRec's prompts with vs without it)"),
             ("ULMRec", UID_ROWS["random_order"], "ULMRec vs a random order"),
             (f"ULMRec, {X4}x rows", UID_ROWS["random_order"], f"ULMRec with {X4}x rows vs a random order"),
             ("zero-shot", "ULMRec", "the untuned base vs ULMRec"),
             ("zero-shot", UID_ROWS["random_order"], "the untuned base vs a random order"),
             (UID_ROWS["uid_only"], UID_ROWS["uid_only_swapped_index"], "the user's own index (vs another user's)"),
             (UID_ROWS["uid_only"], UID_ROWS["random_order"], "uid-only ranking vs a random order"),
             (UID_ROWS["uid_only_swapped_index"], UID_ROWS["random_order"], "another user's index vs a random order")]


def chosen_rows(protocol: str, chosen: dict) -> tuple[dict, list[str]]:
    """Part 3's rows of one protocol, label -> (per-user NDCG@10, metrics, fusion w, LlamaRec-style row at equal next-item
    rows), and the runs not finished yet."""
    out, pending = {}, []
    for label, name in CHOSEN.items():
        run = chosen_run(name, chosen, protocol)
        if not RunDir(run).is_complete("evaluate"):
            pending.append(str(run.relative_to(RUNS)))
            continue
        metrics, users = RunDir(run).eval_metrics(), per_user(run)
        equal = f"LlamaRec-style, {X4}x rows" if name.endswith(f"_x{X4}") else "LlamaRec-style"
        if not out:
            out["LRURec order"] = (users["retriever"], metrics["test"]["retriever"], None, None)
        cost, validation = scoring_cost(run, metrics), {"validation_rank_ndcg@10": metrics["validation"]["ranker"]["rank"]["ndcg@10"]}
        out[label] = (users["ranker"], {**metrics["test"]["ranker"], **cost, **validation}, None, equal)
        fused = {**metrics["test"]["fused"], **cost, "fusion_validation": fusion_validation(metrics["fusion"])}
        out[f"{label} + LRURec fused"] = (users["fused"], fused, metrics["fusion"]["weight"], equal)
        if name == "ulmrec_pid" and "uid_only" not in users:
            pending.append(f"{run.relative_to(RUNS)}: the uid-only rows (evaluated without them)")
        for row, text in UID_ROWS.items() if name == "ulmrec_pid" and "uid_only" in users else ():
            key = "random_order" if row == "random_order" else f"ranker_{row}"
            seconds = metrics["scoring"]["seconds"].get(f"test {row}")
            uid_cost = {"eval_permutations": cost["eval_permutations"], "scoring_s": {"test": seconds}} if seconds else {}
            out[text] = (users[row], {**metrics["test"][key], **uid_cost}, None, equal)
    return out, pending


def fusion_validation(fusion: dict) -> dict:
    """Why a fused row has its weight: validation rank NDCG@10 at w = 0 (LRURec alone), at the chosen w and at the best w."""
    # evaluate keys its grid by str(float(w))
    at = lambda w: fusion["validation_ndcg@10_by_weight"][str(float(w))]  # noqa: E731
    best = fusion["best_weight"]
    return {"chosen_weight": fusion["weight"], "best_weight": best, "ndcg@10_w0": at(0), "ndcg@10_chosen": at(fusion["weight"]),
            "ndcg@10_best": at(best), "best_minus_w0": round(at(best) - at(0), 6),
            "paired_se_w0_vs_best": fusion["paired_se_vs_best"][str(float(0))], "rule": fusion["chosen_on"]}


def scoring_cost(run: Path, metrics: dict) -> dict:
    """Candidate orders and scoring seconds of an evaluation (part 1's runs predate the record: their evaluate stage's)."""
    if "scoring" in metrics:
        return {"eval_permutations": metrics["scoring"]["eval_permutations"], "scoring_s": metrics["scoring"]["seconds"]}
    return {"eval_permutations": 1, "scoring_s": {"evaluate stage": read_wall().get(f"{run.relative_to(RUNS)}/evaluate")}}


def chosen_table(chosen: dict) -> tuple[dict, dict, list[str]]:
    """Part 3's rows per protocol (`chosen`: part 2's selection) with paired CIs against LRURec and LlamaRec-style; its
    paired contrasts per protocol; the runs not finished yet."""
    results, contrasts, pending = {}, {}, []
    if not selection_complete(chosen):
        return results, contrasts, ["the selection (part 2)"]
    for protocol in PROTOCOLS:
        rows, missing = chosen_rows(protocol, chosen)
        pending += missing
        if "LRURec order" not in rows:
            continue
        lrurec = rows["LRURec order"][0]
        results[protocol] = {label: {"rank": m["rank"], "overall": m["overall"], "fusion_weight": w, "tied_gold_users": m["tied_gold_users"],
                                     "eval_permutations": m.get("eval_permutations"), "scoring_s": m.get("scoring_s"),
                                     **{k: m[k] for k in ("validation_rank_ndcg@10", "fusion_validation") if k in m},
                                     **({"users_shown_their_own_index": m["users_shown_their_own_index"]} if "users_shown_their_own_index" in m else {}),
                                     "vs_lrurec": paired(v, lrurec), "vs_llamarec_equal_rows": paired(v, rows[equal][0]) if equal in rows else None,
                                     "llamarec_row": equal} for label, (v, m, w, equal) in rows.items()}
        contrasts[protocol] = [{"row": a, "baseline": b, "measures": what, **paired(rows[a][0], rows[b][0])}
                               for a, b, what in CONTRASTS if a in rows and b in rows]
    return results, contrasts, pending


def selection_complete(chosen: dict) -> bool:
    """Whether part 2 has chosen every model's options and its candidate orders in both protocols."""
    steps = lambda model: {s["step"] for s in chosen[model].get("steps", [])}  # noqa: E731
    return all(model in chosen and {f"eval_permutations ({p})" for p in PROTOCOLS} <= steps(model) for model in STEPS)


def chosen_training(chosen: dict | None) -> dict:
    """Rows and training options of each trained row of part 3 (read from its run), and where its options come from."""
    out = {}
    if not chosen or not selection_complete(chosen):
        return out
    for name, model in {"llamarec": "llamarec", "ulmrec_pid": "ulmrec_pid", **OWN}.items():
        run = RUNS / (chosen[name]["run"] if name in chosen else f"chosen/paper/{name}")
        if not RunDir(run).is_complete("tasks"):
            continue
        mix = RunDir(run).mixture()
        steps = json.loads(RunDir(run).ranker_files.train_metrics.read_text())["steps"] if RunDir(run).is_complete("train") else None
        out[name] = {"run": str(run.relative_to(RUNS)), "next_item_rows": mix["next_item_samples"], "all_rows": mix["train_samples"], "steps": steps,
                     "options": chosen[model]["options"], "options_chosen_on": "its own validation" if name in chosen else f"{model}'s validation (its part-2 rows; not validated again)"}
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
               "results": results, "selection": read_selection()}
    summary["chosen"], summary["contrasts"], summary["pending"] = chosen_table(summary["selection"])
    summary["chosen_training"] = chosen_training(summary["selection"])
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
        lines += [f"## Protocol `{protocol}`: candidates in {order}; every model with the paper's training options (before part 2's selection)", "",
                  "| row | rank N@10 | old rule | v0.2.0 | tied | rank R@10 | rank MRR@10 | overall N@10 | Δ vs LRURec (95 % CI) | Δ vs LlamaRec-style (95 % CI) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, r in rows.items():
            name = f"{label} (w={r['fusion_weight']:g})" if r["fusion_weight"] is not None else label
            fmt = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"| {name} | {r['rank']['ndcg@10']:.4f} | {fmt(r.get('old_rule_rank_ndcg@10'))} | {fmt(r['v0.2.0_rank_ndcg@10'])} | {r['tied_gold_users']} | {r['rank']['recall@10']:.4f} | {r['rank']['mrr@10']:.4f} | "
                         f"{r['overall']['ndcg@10']:.4f} | {ci_text(r['vs_lrurec'])} | {ci_text(r['vs_llamarec'])} |")
        lines.append("")
    paper = s["paper_metrics"]
    lines.append(f"For scale, the authors' released Llama-2-7b checkpoint on all test users with their own LRURec candidates: "
                 f"rank N@10 {paper['rank_subset']['test_NDCG@10']:.4f}, overall N@10 {paper['overall']['test_NDCG@10']:.4f}.")
    return "\n".join(lines + selection_markdown(s["selection"]) + chosen_markdown(s["chosen"], s["contrasts"], s["pending"], s["chosen_training"])
                     + part_three_times(s["wall_s"])) + "\n"


def selection_markdown(selection: dict | None) -> list[str]:
    lines = ["", "## Options chosen on validation users (400 next-item rows; the training options in the paper protocol)", ""]
    if not selection:
        return lines + ["Not measured yet."]
    lines += ["A challenger replaces the incumbent only when it beats it by more than one paired standard error of per-user "
              "validation rank NDCG@10.", "", "| model | step | candidate | validation rank N@10 | Δ vs incumbent (SE) | chosen |", "|---|---|---|---|---|---|"]
    for model, r in selection.items():
        for step in r["steps"]:
            for name, c in step["candidates"].items():
                lines.append(f"| {model} | {step['step']} | {name} | {c['ndcg@10']:.4f} | {c['diff_vs_incumbent']:+.4f} ({c['paired_se']:.4f}) | "
                             f"{'**yes**' if name == step['chosen'] else ''} |")
    return lines


def chosen_markdown(chosen: dict, contrasts: dict, pending: list[str], training: dict) -> list[str]:
    lines = ["", "## The test table with what validation chose", ""]
    if pending:
        lines += [f"Not finished yet: {', '.join(pending)}.", ""]
    if training:
        lines += ["| trained row | run | next-item rows | all rows | steps | training options | chosen on |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {t['run']} | {t['next_item_rows']} | {t['all_rows']} | {t.get('steps') or '—'} | {', '.join(f'{k}={v}' for k, v in t['options'].items())} | "
                  f"{t['options_chosen_on']} |" for name, t in training.items()] + [""]
    for protocol, rows in chosen.items():
        lines += [f"### Protocol `{protocol}`", "", "| row | rank N@10 | tied | rank R@10 | rank MRR@10 | overall N@10 | validation rank N@10 | "
                  "candidate orders (scoring s) | Δ vs LRURec (95 % CI) | Δ vs LlamaRec-style at equal next-item rows (95 % CI) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, r in rows.items():
            name = f"{label} (w={r['fusion_weight']:g})" if r["fusion_weight"] is not None else label
            if "users_shown_their_own_index" in r:
                name += f" ({r['users_shown_their_own_index']} users shown their own)"
            lines.append(f"| {name} | {r['rank']['ndcg@10']:.4f} | {r['tied_gold_users']} | {r['rank']['recall@10']:.4f} | {r['rank']['mrr@10']:.4f} | "
                         f"{r['overall']['ndcg@10']:.4f} | {validation_text(r)} | {cost_text(r)} | {ci_text(r['vs_lrurec'])} | {ci_text(r['vs_llamarec_equal_rows'])} |")
        lines += fusion_markdown(rows)
        if contrasts.get(protocol):
            lines += ["", "| paired contrast (same users) | measures | Δ rank N@10 (95 % CI) |", "|---|---|---|"]
            lines += [f"| {c['row']} − {c['baseline']} | {c['measures']} | {ci_text(c)} |" for c in contrasts[protocol]]
        lines.append("")
    return lines


def validation_text(r: dict) -> str:
    """A row's validation rank NDCG@10: the ranker's, or the fused row's at its chosen weight; '—' for rows not scored there."""
    if "fusion_validation" in r:
        return f"{r['fusion_validation']['ndcg@10_chosen']:.4f}"
    return f"{r['validation_rank_ndcg@10']:.4f}" if "validation_rank_ndcg@10" in r else "—"


def fusion_markdown(rows: dict) -> list[str]:
    """Why each fused row has its weight: the validation figures the weight was chosen on."""
    fused = {label: r["fusion_validation"] for label, r in rows.items() if "fusion_validation" in r}
    if not fused:
        return []
    lines = ["", f"Fusion weights, chosen on {next(iter(fused.values()))['rule']}:", "",
             "| fused row | chosen w | validation N@10 at w = 0 (LRURec alone) | best w | validation N@10 at best w | best − w=0 (paired SE) |",
             "|---|---|---|---|---|---|"]
    return lines + [f"| {label} | {f['chosen_weight']:g} | {f['ndcg@10_w0']:.4f} | {f['best_weight']:g} | {f['ndcg@10_best']:.4f} | "
                    f"{f['best_minus_w0']:+.4f} ({f['paired_se_w0_vs_best']:.4f}) |" for label, f in fused.items()]


def part_three_times(wall: dict) -> list[str]:
    """Part 3's stage seconds (its own runs: the rows that reuse part 1's or part 2's models and scores add none)."""
    keys = [k for k in wall if k.startswith("chosen/")]
    if not keys:
        return []
    lines = ["", "## Part 3's stage times (2 cores; seconds, a resumed stage's attempts added)", "", "| stage | seconds |", "|---|---|"]
    return lines + [f"| {k} | {wall[k]:.0f} |" for k in keys] + ["", f"Part 3 in all: {sum(wall[k] for k in keys) / 60:.0f} min "
                                                                       "(LlamaRec-style's and ULMRec's main models were trained in parts 1 and 2)."]


def cost_text(r: dict) -> str:
    """'k (seconds)': the candidate orders and the test scoring's seconds (or the whole evaluate stage's, for part 1's runs)."""
    if not r.get("eval_permutations"):
        return "—"
    seconds = r["scoring_s"] or {}
    if "test" in seconds:
        return f"{r['eval_permutations']} ({seconds['test']:.0f})"
    stage = seconds.get("evaluate stage")
    return f"{r['eval_permutations']} (evaluate stage {stage:.0f})" if stage else str(r["eval_permutations"])


def main() -> int:
    from ulmrec_hf.cli import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_samples", type=int, default=400, help="Next-item training rows of both models.")
    parser.add_argument("--eval_users", type=int, default=8000, help="Test users sampled (about 13%% have the ground truth in the top 20).")
    parser.add_argument("--validation_users", type=int, default=4000)
    parser.add_argument("--report_only", action="store_true", help="Write the tables of what has finished, run nothing.")
    parser.add_argument("--gpu_options", action="store_true", help="Print the options validation chose as bench/gpu_beauty.py's --options JSON.")
    args = parser.parse_args()
    if args.gpu_options:
        chosen = read_selection()
        if not selection_complete(chosen):
            raise SystemExit(f"{SELECTION}: part 2 has not chosen every option yet")
        print(json.dumps(gpu_options(chosen)))
        return 0
    if not DATA.exists():
        print(f"skip: {DATA} is absent")
        return 0
    if not args.report_only:
        sizes = ["--max_eval_users", str(args.eval_users), "--eval_seed", str(EVAL_SEED), "--max_validation_users", str(args.validation_users), *PROMPT]
        base, common = base_run(), ["--max_train_samples", str(args.train_samples), *sizes]
        model_runs(base, common)
        chosen_runs(base, selection(), common, ["--max_train_samples", str(X4 * args.train_samples), *sizes])
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
