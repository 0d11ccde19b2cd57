"""Recipes, stage parsing, `ulmrec run` and `ulmrec ablate`.

A recipe has a few shared top-level keys and one section per stage, named after the stage:

    run_dir: runs/demo          # shared: every stage that has the key gets it
    seed: 42
    model_name_or_path: smollm2
    retrieve:                   # the options of `ulmrec retrieve`, exactly as its --help lists them
      lr: 1.0e-3
    train:                      # `ulmrec train`: its own options, then TRL's ModelConfig and SFTConfig
      learning_rate: 1.0e-4

`ulmrec <stage> --config RECIPE --key value` reads the shared keys and that stage's section; a flag wins over the
recipe. `ulmrec run RECIPE --key value --stage.key value`: an unqualified flag goes to every stage that has the key,
`--stage.key` to that stage only.
"""

import difflib
import functools
import importlib
import logging
import os
from dataclasses import fields
from pathlib import Path

from .common import UlmrecError, write_json
from .layout import RunDir

logger = logging.getLogger(__name__)

# subcommand -> (module, one-line help); each module lists its argument dataclasses in `ARGUMENTS`
STAGES = {
    "demo-data": ("demo_data", "Write the synthetic demo catalogue (Amazon 2018 format)."),
    "prepare": ("prepare", "Raw Amazon reviews -> run_dir/data (HF DatasetDict)."),
    "retrieve": ("retrieve", "Train LRURec/SASRec -> run_dir/retriever (top-k candidates)."),
    "preferences": ("preferences", "One preference sentence per user (OpenAI-compatible, local, import, offline)."),
    "index": ("index", "Review encoder + ID attention + RQ-VAE -> unique user index tokens."),
    "tasks": ("tasks", "Alignment-task prompt/completion datasets and their mixture."),
    "train": ("train", "(Q)LoRA SFT of the ranker with verbalizer evaluation."),
    "evaluate": ("evaluate", "Validation and test metrics (rank and overall), fused, uid-only and retriever rows."),
    "recommend": ("recommend", "Ranked recommendations for users of a finished run."),
    "explain": ("explain", "Generate the preference the model associates with a user index."),
    "export": ("export", "A full model directory for servers: the base with the LoRA merged, index tokens in place."),
    "push": ("push", "Upload the adapter and/or the export and the data/index/preferences to the Hub (or --dry_run)."),
}
PIPELINE = ["prepare", "retrieve", "preferences", "index", "tasks", "train", "evaluate"]
SHARED = ("run_dir", "seed", "model_name_or_path", "overwrite")
RECIPE_ONLY = ("stages", "env")

# Flat keys of recipes written before stages had sections (ulmrec-hf 0.1): old key -> "stage.new_key".
RENAMED = {
    **{f"retriever_{k}": f"retrieve.{k}" for k in ("hidden", "blocks", "ffn", "dropout", "attn_dropout", "heads", "batch_size", "lr",
                                                   "weight_decay", "max_epochs", "eval_batch_size")},
    **{k: f"retrieve.{k}" for k in ("max_len", "eval_every_steps", "patience", "num_candidates", "mask_history")},
    "preference_backend": "preferences.backend", "preference_model": "preferences.model", "preferences_file": "preferences.import_file",
    "preference_input": "preferences.input", "preference_system_prompt": "preferences.system_prompt", "preference_prompt": "preferences.prompt",
    "max_preference_chars": "preferences.max_chars", "preference_max_new_tokens": "preferences.max_tokens",
    "preference_batch_size": "preferences.batch_size", "preference_fallback": "preferences.fallback",
    **{k: f"preferences.{k}" for k in ("base_url", "api_key_env", "review_token_budget", "concurrency", "request_timeout", "max_retries",
                                       "backoff_base", "backoff_max", "response_prefix", "max_users")},
    "index_scheme": "index.scheme", "index_import_file": "index.import_file", "index_preferences_file": "index.preferences_file",
    **{k: f"index.{k}" for k in ("text_source", "include_heldout_text", "encoder", "encoder_batch_size", "encoder_max_length",
                                 "encoder_shard_size", "attention_steps", "attention_lr", "attention_batch_users", "attention_temperature",
                                 "rq_levels", "rq_codebook_size", "rq_code_dim", "rq_hidden", "rq_commitment", "rq_epochs", "rq_batch_size",
                                 "rq_lr", "rq_kmeans_iters", "rq_dead_code_threshold", "add_users")},
    "candidate_order": "tasks.eval_order", "history_len": "tasks.history_len", "title_max_tokens": "tasks.title_max_tokens",
    **{k: f"tasks.{k}" for k in ("max_train_samples", "max_eval_users", "max_validation_users", "eval_seed")},
    "quantization": "train.load_in_4bit",
    "eval_batch_size": "evaluate.batch_size", "eval_split": "evaluate (which now scores validation and test)",
    "zero_shot": "evaluate.zero_shot", "zero_shot_dtype": "evaluate.zero_shot_dtype", "uid_only": "evaluate.uid_only",
    "demo_output": "demo-data.output", "demo_users": "demo-data.users", "demo_items": "demo-data.items",
    "demo_min_length": "demo-data.min_length", "demo_max_length": "demo-data.max_length", "transition_prob": "demo-data.transition_prob",
}
# Options that no longer exist: key -> why.
REMOVED = {"use_next_item": "next-item prediction is the ranking task and is always on"}


def stage_module(name: str):
    return importlib.import_module(f"ulmrec_hf.{STAGES[name][0]}")


@functools.cache
def stage_keys(name: str) -> frozenset[str]:
    return frozenset(f.name for dc in stage_module(name).ARGUMENTS for f in fields(dc))


def make_parser(name: str):
    """The TRL scripts' pattern: one TrlParser over the stage's dataclasses, its own options first."""
    from trl import TrlParser

    return TrlParser(stage_module(name).ARGUMENTS, prog=f"ulmrec {name}", description=STAGES[name][1])


def misplaced(key: str, stage: str | None = None) -> str:
    """Why a key is not accepted where it stands, with the place it belongs."""
    if key in RENAMED:
        return f"`{key}` was renamed to `{RENAMED[key]}`"
    if key in REMOVED:
        return f"`{key}` was removed: {REMOVED[key]}"
    owners = [s for s in STAGES if key in stage_keys(s)]
    if owners and stage is None:
        return f"`{key}` belongs in the section of " + " or ".join(f"`{s}:`" for s in owners)
    if owners:
        return f"`{key}` is an option of " + ", ".join(f"`ulmrec {s}`" for s in owners) + f", not of `ulmrec {stage}`"
    known = stage_keys(stage) if stage else set(SHARED) | set(STAGES) | set(RECIPE_ONLY)
    close = difflib.get_close_matches(key, known, n=1)
    return f"unknown key `{key}`" + (f" (did you mean `{close[0]}`?)" if close else "")


def load_recipe(path: str) -> dict:
    """A recipe with every key checked: shared keys, stage sections and their options; typos and old keys are errors."""
    import yaml

    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except OSError as e:
        raise UlmrecError(f"{path}: cannot read recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UlmrecError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(recipe, dict):
        raise UlmrecError(f"{path}: a recipe must be a YAML mapping")
    problems = []
    for key, value in recipe.items():
        if key in STAGES:
            if not isinstance(value, dict):
                problems.append(f"`{key}:` must be a mapping of that stage's options")
                continue
            problems += [f"{key}: {misplaced(k, key)}" for k in value if k not in stage_keys(key)]
        elif key not in SHARED + RECIPE_ONLY:
            problems.append(misplaced(key))
    for name in recipe.get("stages") or []:
        if name not in STAGES:
            problems.append(f"unknown stage {name!r} in `stages` (known: {', '.join(STAGES)})")
    if problems:
        raise UlmrecError(f"{path}: " + "; ".join(problems))
    return recipe


def stage_config(recipe: dict, name: str) -> dict:
    """What stage `name` reads from a recipe: the shared keys it has, then its own section."""
    own = stage_keys(name)
    return {**{k: v for k, v in recipe.items() if k in SHARED and k in own}, **(recipe.get(name) or {})}


def parse_stage(name: str, argv: list[str]) -> tuple:
    argv = list(argv)
    parser = make_parser(name)
    if "--config" in argv:
        i = argv.index("--config")
        path = argv[i + 1] if i + 1 < len(argv) else None
        if path is None:
            raise UlmrecError("--config needs a recipe path")
        del argv[i:i + 2]
        recipe = load_recipe(path)
        for key, value in (recipe.get("env") or {}).items():
            os.environ[key] = str(value)
        parser.set_defaults_with_config(**stage_config(recipe, name))
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as e:  # a dataclass's own check (TrainingArguments, ModelConfig) of a contradiction
        raise UlmrecError(f"{name}: {e}") from None
    flags = [a[2:].split("=")[0] for a in remaining if a.startswith("--")]
    if remaining:
        reasons = [misplaced(f.replace("-", "_"), name) for f in flags] or [f"unexpected arguments {remaining}"]
        raise UlmrecError("; ".join(reasons))
    return tuple(parsed)


def run_stage(name: str, argv: list[str]):
    parsed = parse_stage(name, argv)
    return stage_module(name).main(*parsed)


def split_overrides(argv: list[str]) -> list[tuple[str | None, str, list[str]]]:
    """`--key v`, `--key=v`, `--stage.key v1 v2`, `--flag` -> (stage or None, key, values)."""
    out = []
    for token in argv:
        if token.startswith("--"):
            name, _, value = token[2:].partition("=")
            stage, _, key = name.rpartition(".")
            out.append((stage or None, key.replace("-", "_"), [value] if value else []))
        elif out:
            out[-1][2].append(token)
        else:
            raise UlmrecError(f"unexpected argument {token!r}; overrides look like --key value or --stage.key value")
    return out


def stage_argv(name: str, recipe_path: str, overrides: list[tuple[str | None, str, list[str]]]) -> list[str]:
    argv = ["--config", recipe_path]
    for stage, key, values in overrides:
        if stage == name or (stage is None and key in stage_keys(name)):
            argv += [f"--{key}", *values]
    return argv


def check_overrides(overrides, stages: list[str]) -> None:
    for stage, key, _ in overrides:
        if stage is not None and stage not in STAGES:
            raise UlmrecError(f"--{stage}.{key}: unknown stage {stage!r} (known: {', '.join(STAGES)})")
        if stage is not None and key not in stage_keys(stage):
            raise UlmrecError(f"--{stage}.{key}: {misplaced(key, stage)}")
        if stage is None and not any(key in stage_keys(s) for s in stages):
            raise UlmrecError(f"--{key}: {misplaced(key)}; give it as --<stage>.{key} or in the recipe")


def run_recipe(recipe_path: str, argv: list[str], skip: tuple[str, ...] = ()) -> Path:
    """Every stage of the recipe in order but those in `skip`; finished stages with the same settings are skipped."""
    recipe = load_recipe(recipe_path)
    stages = recipe.get("stages") or PIPELINE
    overrides = split_overrides(argv)
    check_overrides(overrides, stages)
    for name in (s for s in stages if s not in skip):
        logger.info("=== stage: %s", name)
        run_stage(name, stage_argv(name, recipe_path, overrides))
    run_dir = Path(override_value(overrides, "run_dir", recipe.get("run_dir", "runs/demo")))
    print("artifacts:\n" + "\n".join(f"  {p}" for p in sorted(run_dir.iterdir()) if p.is_dir()))
    return run_dir


def override_value(overrides, key: str, default):
    for stage, k, values in overrides:
        if stage is None and k == key and values:
            default = values[0]
    return default


# -- ablations (the paper's Fig. 8 and 9) ---------------------------------------------------------------------------------
ALIGNMENT = ("index_to_preference", "preference_to_index", "history_to_index", "rating", "intent")
NO_ALIGN = [f"--tasks.use_{t}=false" for t in ALIGNMENT]
VARIANTS = {
    "full": [],
    "wo_preference": ["--tasks.use_index_to_preference=false", "--tasks.use_preference_to_index=false"],
    "wo_history_index": ["--tasks.use_history_to_index=false"],
    "wo_rating": ["--tasks.use_rating=false"],
    "wo_intent": ["--tasks.use_intent=false"],
    "wo_all_align": NO_ALIGN,  # Fig. 8's "w/o all" is also Fig. 9's PID without alignment
    "nid": ["--index.scheme=nid"],
    "nid_wo_align": ["--index.scheme=nid", *NO_ALIGN],
    "oid": ["--index.scheme=oid"],
    "oid_wo_align": ["--index.scheme=oid", *NO_ALIGN],
}
ALIASES = {"pid_wo_align": "wo_all_align"}  # the same model under Fig. 9's name: trained once
SHARED_STAGES = ("prepare", "retrieve", "preferences")
VARIANT_STAGES = ("tasks", "train", "evaluate")  # every variant computes these in its own folder (the base run does not)


def variant_overrides(names: list[str]) -> dict[str, list[str]]:
    """The overrides of each named variant; an alias runs (once) as the variant it names."""
    names = list(dict.fromkeys(ALIASES.get(n, n) for n in names))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UlmrecError(f"ablate: unknown variants {unknown}; known: {list(VARIANTS)} (aliases: {ALIASES})")
    return {n: VARIANTS[n] for n in names}


def stages_for(overrides: list[str]) -> list[str]:
    """The stages a variant computes in its own folder: the index when it overrides an index option (another scheme),
    then tasks, train and evaluate; the rest is linked from the base run."""
    redo_index = any(o.startswith("--index.") for o in overrides)
    return (["index"] if redo_index else []) + list(VARIANT_STAGES)


def link_shared(base: Path, variant: Path, stages: tuple[str, ...]) -> None:
    """Symlink finished stages of the base run into a variant's run directory (their fingerprints travel with them)."""
    Path(variant).mkdir(parents=True, exist_ok=True)
    for stage in stages:
        src, dst = RunDir(base).path(stage).resolve(), RunDir(variant).path(stage)
        if src.exists() and not dst.exists():
            os.symlink(src, dst, target_is_directory=True)


def run_ablation(recipe_path: str, names: list[str], argv: list[str]) -> Path:
    recipe = load_recipe(recipe_path)
    base = run_recipe(recipe_path, argv, skip=VARIANT_STAGES)  # the stages variants link; finished ones are skipped
    root = Path(f"{base}-ablate")
    results = {}
    for name, extra in variant_overrides(names).items():
        vdir = root / name
        stages = stages_for(extra)
        link_shared(base, vdir, SHARED_STAGES + (() if "index" in stages else ("index",)))
        overrides = split_overrides([*argv, *extra, "--run_dir", str(vdir)])
        check_overrides(overrides, stages)
        for stage in stages:
            run_stage(stage, stage_argv(stage, recipe_path, overrides))
        results[name] = RunDir(vdir).eval_metrics()
    results = {n: results[ALIASES.get(n, n)] for n in dict.fromkeys(names)}  # an alias keeps its row, with its target's numbers
    write_json(root / "ablation.json", {"recipe": recipe_path, "variants": {n: VARIANTS[ALIASES.get(n, n)] for n in results},
                                        "aliases": {n: t for n, t in ALIASES.items() if n in results}, "results": results,
                                        "stages": recipe.get("stages")})
    (root / "ablation.md").write_text(ablation_table(results))
    plot(results, root / "ablation.png")
    print(ablation_table(results))
    return root


def ablation_table(results: dict) -> str:
    lines = ["| variant | rank N@10 | rank R@10 | overall N@10 | overall R@10 | uid-only rank N@10 | uid-only, swapped index | random order |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        m = r["test"]["ranker"]
        uid = " | ".join(f"{r['test'][row]['rank']['ndcg@10']:.4f}" if row in r["test"] else "— (not scored)"
                         for row in ("ranker_uid_only", "ranker_uid_only_swapped_index", "random_order"))
        label = f"{name} (= {ALIASES[name]}, trained once)" if name in ALIASES else name
        lines.append(f"| {label} | {m['rank']['ndcg@10']:.4f} | {m['rank']['recall@10']:.4f} | {m['overall']['ndcg@10']:.4f} | "
                     f"{m['overall']['recall@10']:.4f} | {uid} |")
    order = {r["protocol"]["eval_order"] for r in results.values()}
    return "\n".join(lines) + f"\n\nEvaluation candidate order: {', '.join(sorted(order))}.\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(names)), 4))
    for ax, metric in zip(axes, ("ndcg@10", "recall@10")):
        values = [results[n]["test"]["ranker"]["rank"][metric] for n in names]
        ax.bar(names, values, color=["#4C72B0" if "wo" not in n else "#DD8452" for n in names])
        ax.set_title(f"rank {metric}")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ablate(argv: list[str]) -> Path:
    if not argv or argv[0].startswith("-"):
        raise UlmrecError("usage: ulmrec ablate RECIPE.yaml [--variants full wo_all_align ...] [--key value ...]")
    recipe, rest = argv[0], argv[1:]
    names = list(VARIANTS)
    if "--variants" in rest:
        i = rest.index("--variants")
        j = next((k for k in range(i + 1, len(rest)) if rest[k].startswith("--")), len(rest))
        names, rest = rest[i + 1:j], rest[:i] + rest[j:]
    return run_ablation(recipe, names, rest)
