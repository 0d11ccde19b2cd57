"""`ulmrec` console entry point: one subcommand per stage, plus `run RECIPE` for all of them.

Every stage takes `--config RECIPE.yaml`; each recipe key is also a flag. Stage modules keep heavy
imports inside `main`, so `ulmrec --help` stays fast.
"""

import functools
import importlib
import logging
import sys
from dataclasses import fields
from pathlib import Path

from .common import RunArguments, UlmrecError

# subcommand -> (module, argument dataclass names; RunArguments is prepended unless the stage has its own, help)
STAGES = {
    "demo-data": ("demo_data", ("DemoDataArguments",), "Write the synthetic demo catalogue (Amazon 2018 format)."),
    "prepare": ("prepare", ("PrepareArguments",), "Raw Amazon reviews -> run_dir/data (HF DatasetDict)."),
    "retrieve": ("retrieve", ("RetrieveArguments",), "Train LRURec/SASRec -> run_dir/retriever (top-k candidates)."),
    "preferences": ("preferences", ("PreferenceArguments",), "One preference sentence per user (OpenAI-compatible, local, import, offline)."),
    "index": ("index", ("IndexArguments",), "Review encoder + ID attention + RQ-VAE -> unique user index tokens."),
    "tasks": ("tasks", ("TaskArguments",), "Alignment-task prompt/completion datasets and their mixture."),
    "train": ("train", ("RankerArguments", "SFTConfig", "ModelConfig"), "(Q)LoRA SFT of the ranker with verbalizer evaluation."),
    "evaluate": ("evaluate", ("EvaluateArguments",), "Test metrics (rank and overall), uid-only and retriever rows."),
    "recommend": ("recommend", ("RecommendArguments",), "Ranked recommendations for users of a finished run."),
    "explain": ("recommend", ("ExplainArguments",), "Generate the preference the model associates with a user index."),
    "push": ("push", ("PushArguments",), "Upload the adapter and the data/index/preferences to the Hub (or --dry_run)."),
}


PIPELINE = ["prepare", "retrieve", "preferences", "index", "tasks", "train", "evaluate"]
ENTRY = {"explain": "explain"}  # subcommands whose function is not `main`


def stage_dataclasses(name: str) -> tuple:
    module_name, arg_names, _ = STAGES[name]
    module = importlib.import_module(f"ulmrec_hf.{module_name}")
    own = tuple(getattr(module, n) for n in arg_names)
    return (own if any("run_dir" in dc.__dataclass_fields__ for dc in own) else (RunArguments, *own)), module


def make_parser(name: str, subparsers=None):
    """The TRL scripts' pattern: the same parser serves `ulmrec NAME` and a stand-alone script."""
    from trl import TrlParser

    dataclass_types, module = stage_dataclasses(name)
    if subparsers is not None:
        parser = subparsers.add_parser(name, help=STAGES[name][2], dataclass_types=dataclass_types)
    else:
        parser = TrlParser(dataclass_types, prog=f"ulmrec {name}", description=STAGES[name][2])
    if hasattr(module, "parser_defaults"):  # machine-dependent defaults; a recipe or flag still overrides them
        parser.set_defaults(**module.parser_defaults())
    return parser


@functools.cache
def known_keys() -> frozenset[str]:
    keys = {"config", "stages", "env"}
    for name in STAGES:
        for dc in stage_dataclasses(name)[0]:
            keys.update(f.name for f in fields(dc))
    return frozenset(keys)


def check_recipe(path: str) -> dict:
    """Load a recipe and reject keys that no stage knows (typos would otherwise be ignored)."""
    import yaml

    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except OSError as e:
        raise UlmrecError(f"{path}: cannot read recipe ({e.strerror})") from None
    if not isinstance(recipe, dict):
        raise UlmrecError(f"{path}: a recipe must be a YAML mapping")
    unknown = sorted(set(recipe) - known_keys())
    if unknown:
        raise UlmrecError(f"{path}: unknown recipe keys {unknown}")
    return recipe


def run_stage(name: str, argv: list[str]):
    if "--config" in argv:
        check_recipe(argv[argv.index("--config") + 1])
    parser = make_parser(name)
    *parsed, remaining = parser.parse_args_and_config(argv, return_remaining_strings=True, fail_with_unknown_args=False)
    flags = [a[2:].split("=")[0].replace("-", "_") for a in remaining if a.startswith("--")]
    unknown = sorted(set(flags) - known_keys())
    if unknown:  # a flag for another stage is fine (`ulmrec run` passes overrides to every stage); a typo is not
        raise UlmrecError(f"unknown arguments {['--' + u for u in unknown]}")
    _, module = stage_dataclasses(name)
    return getattr(module, ENTRY.get(name, "main"))(*parsed)


def run_recipe(argv: list[str]):
    """`ulmrec run RECIPE [--flag value ...]`: every stage of the recipe in order, skipping finished ones."""
    if not argv or argv[0].startswith("-"):
        raise UlmrecError("usage: ulmrec run RECIPE.yaml [--key value ...]")
    recipe_path, overrides = argv[0], argv[1:]
    recipe = check_recipe(recipe_path)
    for name in recipe.get("stages", PIPELINE):
        if name not in STAGES:
            raise UlmrecError(f"{recipe_path}: unknown stage {name!r} in 'stages' (known: {list(STAGES)})")
        logging.getLogger("ulmrec_hf").info("=== stage: %s", name)
        run_stage(name, ["--config", recipe_path, *overrides])
    run_dir = Path(run_stage_value(recipe, overrides, "run_dir", "runs/demo"))
    if (run_dir / "eval" / "table.md").exists():
        print("\n" + (run_dir / "eval" / "table.md").read_text())
    print("artifacts:\n" + "\n".join(f"  {p}" for p in sorted(run_dir.iterdir()) if p.is_dir()))


def run_stage_value(recipe: dict, overrides: list[str], key: str, default):
    """A recipe value as the stages see it: the last `--key value` / `--key=value` override wins."""
    value = recipe.get(key, default)
    for i, arg in enumerate(overrides):
        if arg == f"--{key}" and i + 1 < len(overrides):
            value = overrides[i + 1]
        elif arg.startswith(f"--{key}="):
            value = arg.split("=", 1)[1]
    return value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("accelerate", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    commands = [*STAGES, "run", "ablate"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: ulmrec {" + ",".join(commands) + "} [--config RECIPE.yaml] [--key value ...]\n")
        for name, (_, _, text) in STAGES.items():
            print(f"  {name:12s} {text}")
        print(f"  {'run':12s} Run every stage of a recipe in order; finished stages are skipped.")
        print(f"  {'ablate':12s} The paper's ablation variants of a recipe, as one table and bar chart.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        if argv[0] == "run":
            run_recipe(argv[1:])
        elif argv[0] == "ablate":
            from .ablate import main as ablate

            ablate(argv[1:])
        else:
            run_stage(argv[0], argv[1:])
    except UlmrecError as e:
        print(f"ulmrec {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ulmrec {argv[0]}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
