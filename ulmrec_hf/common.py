"""Pieces every stage shares: the run arguments, the user-facing error, atomic JSON files, recorded settings, file
digests, imported preference files and left padding."""

import dataclasses
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("ulmrec_hf")


class UlmrecError(Exception):
    """An input or configuration problem the user can fix; the CLI prints it as one line."""


@dataclass
class RunArguments:
    """Which run a command works on."""

    _argument_group_name = "run"
    run_dir: str = field(default="runs/demo", metadata={"help": "Run directory shared by all stages.", "aliases": ["--run"]})


@dataclass
class StageArguments(RunArguments):
    """A pipeline stage: which run, and what to do with output that already exists."""

    overwrite: bool = field(default=False, metadata={"help": "Delete this stage's output and compute it again."})


def settings_of(*configs, exclude: tuple[str, ...] = ()) -> dict:
    """The fields of argument dataclasses that decide a stage's output; a class lists the others in `_operational`."""
    out = {}
    for config in configs:
        skip = set(getattr(config, "_operational", ())) | set(exclude) | {"run_dir", "overwrite"}
        for f in dataclasses.fields(config):
            if f.name not in skip:
                out[f.name] = getattr(config, f.name)
    return json.loads(json.dumps(out, default=str))


@contextmanager
def atomic_open(path: Path):
    """A text file written under a temporary name and renamed over `path` once complete, so an interrupted write
    leaves the old file (or none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_json(path: Path, obj, indent: int = 2) -> None:
    """Write JSON atomically (temp file + rename) so an interrupted write leaves the old file."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent, sort_keys=False, ensure_ascii=False, default=str)
        f.write("\n")


def write_jsonl(path: Path, rows) -> None:
    """One JSON object per line, written atomically like `write_json`."""
    with atomic_open(path) as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def text_lines(path: Path):
    """(line number, text) of each line of a text file, gzip or not. Lines are decoded one by one, so a bad byte is
    reported on its own line (a text stream decodes ahead of the line it hands out)."""
    import gzip
    import zlib

    path, n = Path(path), 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            for n, raw in enumerate(f, 1):
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UlmrecError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise UlmrecError(f"{path}: corrupt or truncated file after line {n} ({e})") from None
    except OSError as e:
        raise UlmrecError(f"{path}: cannot read after line {n} ({e.strerror or e})") from None


def read_text(path: Path) -> str:
    """A whole UTF-8 file; a bad byte is reported with its line number."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UlmrecError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None


def content_digest(*paths) -> str:
    """SHA-256 of the files' bytes, one after another (None entries are skipped)."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        if p is not None:
            h.update(Path(p).read_bytes())
    return h.hexdigest()


def file_digest(path) -> str | None:
    """The first 16 hex digits of a file's SHA-256 (recorded for files a stage reads from outside the run), None without one."""
    return content_digest(path)[:16] if path and Path(path).exists() else None


def read_preference_file(path) -> dict[str, str]:
    """user -> preference sentence from a JSON object, or JSONL rows with `user` and `preference`."""
    p = Path(path)
    if not p.exists():
        raise UlmrecError(f"{p}: no such preferences file")
    if p.suffix == ".jsonl":
        mapping = {}
        for n, line in text_lines(p):
            if line.strip():
                try:
                    row = json.loads(line)
                    mapping[str(row["user"])] = row["preference"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UlmrecError(f"{p}:{n}: expected a JSON object with 'user' and 'preference' ({e})") from None
        return mapping
    try:
        data = json.loads(read_text(p))
    except json.JSONDecodeError as e:
        raise UlmrecError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise UlmrecError(f"{p}: expected a JSON object mapping user id to preference")
    return {str(k): v for k, v in data.items()}


def left_pad(rows: list[list[int]], pad_id: int = 0, device=None):
    """(input_ids, attention_mask): token lists padded on the left to the longest (at least one column)."""
    import torch

    width = max(1, max(len(r) for r in rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask
