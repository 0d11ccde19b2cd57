"""`ulmrec` console entry point: one subcommand per stage, `run RECIPE` for all of them, `ablate RECIPE` for the paper's ablations.

A stage's module (and what it imports: torch, transformers, trl) is imported only when that stage runs or its options
are read (`runner.stage_module`), so `ulmrec --help` and `ulmrec --version` stay fast.
"""

import difflib
import logging
import os
import sys

from . import __version__
from .common import UlmrecError

RUN_HELP = """usage: ulmrec run RECIPE.yaml [--key value ...] [--stage.key value ...]

Run the recipe's `stages:` (default: prepare retrieve preferences index tasks train evaluate) in order.
A finished stage with the same settings is skipped; an unfinished one resumes; other settings are an error
unless --overwrite. `--key value` goes to every stage that has the key (e.g. --seed, --run_dir, --overwrite);
`--stage.key value` to one stage (e.g. --train.learning_rate 5e-4). Ends with the evaluation table.
"""
ABLATE_HELP = """usage: ulmrec ablate RECIPE.yaml [--variants full wo_all_align nid ...] [--key value ...] [--stage.key value ...]

Run the recipe, then the paper's ablation variants (Fig. 8: without each alignment task; Fig. 9: index schemes
with and without alignment), each in <run_dir>-ablate/<variant>/ sharing the base run's data, retriever and
preferences. Writes ablation.json, ablation.md and ablation.png there.
Variants: {variants}
"""


def usage(commands: list[str]) -> str:
    from .runner import STAGES

    lines = ["usage: ulmrec {" + ",".join(commands) + "} [--config RECIPE.yaml] [--key value ...]", "       ulmrec --version", ""]
    lines += [f"  {name:12s} {text}" for name, (_, text) in STAGES.items()]
    lines += [f"  {'run':12s} Run every stage of a recipe in order; finished stages are skipped.",
              f"  {'ablate':12s} The paper's ablation variants of a recipe, as one table and bar chart.", "",
              "`ulmrec COMMAND --help` lists a command's options."]
    return "\n".join(lines)


def setup_logging() -> None:
    """The stages' INFO log (resumes, derived defaults, warnings) on stderr; for the CLI and scripts that call stages."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # our stages show their own progress
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("accelerate", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    from .runner import STAGES, VARIANTS, ablate, run_recipe, run_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    commands = [*STAGES, "run", "ablate"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(commands))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"ulmrec-hf {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in commands:
        close = difflib.get_close_matches(command, commands, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"ulmrec: error: unknown command '{command}'{hint}\n\n{usage(commands)}", file=sys.stderr)
        return 2
    if command in ("run", "ablate") and (not rest or rest[0] in ("-h", "--help")):
        print(RUN_HELP if command == "run" else ABLATE_HELP.format(variants=", ".join(VARIANTS)))
        return 0 if rest else 2
    try:
        if command == "run":
            run_recipe(rest[0], rest[1:])
        elif command == "ablate":
            ablate(rest)
        else:
            run_stage(command, rest)
    except UlmrecError as e:
        print(f"ulmrec {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ulmrec {command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
