"""`ulmrec` console entry point: one subcommand per stage, plus `run RECIPE` for all of them.

Every stage takes `--config RECIPE.yaml`; each recipe key is also a flag. Stage modules keep heavy
imports inside `main`, so `ulmrec --help` stays fast.
"""

import importlib
import logging
import sys
from dataclasses import fields

from .common import RunArguments, UlmrecError

# subcommand -> (module, argument dataclass names after RunArguments, help)
STAGES = {
    "demo-data": ("demo_data", ("DemoDataArguments",), "Write the synthetic demo catalogue (Amazon 2018 format)."),
    "prepare": ("prepare", ("PrepareArguments",), "Raw Amazon reviews -> run_dir/data (HF DatasetDict)."),
    "retrieve": ("retrieve", ("RetrieveArguments",), "Train LRURec/SASRec -> run_dir/retriever (top-k candidates)."),
    "preferences": ("preferences", ("PreferenceArguments",), "One preference sentence per user (OpenAI-compatible, local, import, offline)."),
    "index": ("index", ("IndexArguments",), "Review encoder + ID attention + RQ-VAE -> unique user index tokens."),
}


def stage_dataclasses(name: str) -> tuple:
    module_name, arg_names, _ = STAGES[name]
    module = importlib.import_module(f"ulmrec_hf.{module_name}")
    return (RunArguments, *(getattr(module, n) for n in arg_names)), module


def make_parser(name: str, subparsers=None):
    """The TRL scripts' pattern: the same parser serves `ulmrec NAME` and a stand-alone script."""
    from trl import TrlParser

    dataclass_types, _ = stage_dataclasses(name)
    if subparsers is not None:
        return subparsers.add_parser(name, help=STAGES[name][2], dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=f"ulmrec {name}", description=STAGES[name][2])


def known_keys() -> set[str]:
    keys = set()
    for name in STAGES:
        for dc in stage_dataclasses(name)[0]:
            keys.update(f.name for f in fields(dc))
    return keys


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
    unknown = sorted(set(recipe) - known_keys() - {"env", "stages"})
    if unknown:
        raise UlmrecError(f"{path}: unknown recipe keys {unknown}")
    return recipe


def run_stage(name: str, argv: list[str]):
    if "--config" in argv:
        check_recipe(argv[argv.index("--config") + 1])
    parser = make_parser(name)
    parsed = parser.parse_args_and_config(argv, fail_with_unknown_args=False)
    _, module = stage_dataclasses(name)
    return module.main(*parsed)


def run_recipe(argv: list[str]):
    """`ulmrec run RECIPE [--flag value ...]`: every stage of the recipe in order, skipping finished ones."""
    if not argv or argv[0].startswith("-"):
        raise UlmrecError("usage: ulmrec run RECIPE.yaml [--key value ...]")
    recipe_path, overrides = argv[0], argv[1:]
    recipe = check_recipe(recipe_path)
    for name in recipe.get("stages", [s for s in STAGES if s != "demo-data"]):
        if name not in STAGES:
            raise UlmrecError(f"{recipe_path}: unknown stage {name!r} in 'stages' (known: {list(STAGES)})")
        logging.getLogger("ulmrec_hf").info("=== stage: %s", name)
        run_stage(name, ["--config", recipe_path, *overrides])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("accelerate", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    commands = [*STAGES, "run"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: ulmrec {" + ",".join(commands) + "} [--config RECIPE.yaml] [--key value ...]\n")
        for name, (_, _, text) in STAGES.items():
            print(f"  {name:12s} {text}")
        print(f"  {'run':12s} Run every stage of a recipe in order; finished stages are skipped.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        if argv[0] == "run":
            run_recipe(argv[1:])
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
