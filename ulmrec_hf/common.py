"""Shared pieces of every stage: run arguments, errors, run-directory helpers."""

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("ulmrec_hf")


class UlmrecError(Exception):
    """An input or configuration problem the user can fix; the CLI prints it as one line."""


@dataclass
class RunArguments:
    """Where a run lives and how stages treat earlier output."""

    run_dir: str = field(default="runs/demo", metadata={"help": "Run directory shared by all stages.", "aliases": ["--run"]})
    overwrite: bool = field(default=False, metadata={"help": "Redo a stage even if its output is complete."})
    seed: int = field(default=42, metadata={"help": "Seed for every random choice of the stage."})


def stage_dir(run_args: RunArguments, name: str) -> Path:
    return Path(run_args.run_dir) / name


def is_complete(path: Path) -> bool:
    """A stage marks its output complete by writing `_COMPLETE` last."""
    return (path / "_COMPLETE").exists()


def mark_complete(path: Path, info: dict | None = None) -> None:
    write_json(path / "_COMPLETE", info or {})


def should_skip(run_args: RunArguments, path: Path, stage: str) -> bool:
    if is_complete(path) and not run_args.overwrite:
        logger.info("%s: output in %s is complete; skipping (use --overwrite to redo)", stage, path)
        return True
    if run_args.overwrite and is_complete(path):
        (path / "_COMPLETE").unlink()
    return False


def require(path: Path, command: str) -> Path:
    """A finished stage output, or a clear error naming the command that makes it."""
    if not is_complete(path):
        raise UlmrecError(f"{path}: missing or unfinished; run `ulmrec {command}` first")
    return path


def load_prepared(run_args: RunArguments):
    """The prepared `DatasetDict` of a run (users, items)."""
    import datasets

    return datasets.load_from_disk(str(require(stage_dir(run_args, "data"), "prepare")))


def write_json(path: Path, obj, indent: int = 2) -> None:
    """Write JSON atomically (temp file + rename) so an interrupted write leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=False, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)
