"""The run directory: the one place that knows where each stage's output lives and which settings made it.

    runs/<name>/
      data/          prepare      DatasetDict (users, items), stats.json, README.md (dataset card)
      retriever/     retrieve     model/ (save_pretrained), checkpoint/ (resume), runs/ (TensorBoard), metrics.json, candidates/
      preferences/   preferences  preferences.jsonl, summary.json, failures.json
      user_index/    index        index/ (user -> index string), tokens.json, attention/, rqvae/, stats.json
      tasks/         tasks        one dataset per task, train/, next_item_{validation,test}[_uid_only]/, mixture.json, eval_meta.json
      ranker/        train        PEFT adapter (LoRA + index-token rows) + tokenizer + README.md, ranker_config.json,
                                  train_metrics.json, validation_scores.json, checkpoints/ (with TensorBoard's runs/)
      eval/          evaluate     metrics.json, table.md, per_user/
      cache/         named caches that survive --overwrite, keyed by everything that changes their content
      push/          push         the folders `push --dry_run` writes

Each stage folder holds `_STAGE.json` (the settings and input fingerprints it was started with) and, once finished,
`_COMPLETE` (the same plus a fingerprint that later stages record as their input). A finished stage asked to run again
with the same settings and inputs is skipped; with other settings it stops with the differences; `--overwrite` deletes
the folder and computes it again. An unfinished folder of a resumable stage (retrieve, index, train) is resumed when
its settings are the same and refused otherwise; other stages simply start again.
"""

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from .common import UlmrecError, read_json, write_json

logger = logging.getLogger(__name__)

RESUMABLE = {"retrieve", "index", "train"}  # stages whose unfinished folder holds work to continue (checkpoints, shards)
FOLDERS = {"prepare": "data", "retrieve": "retriever", "preferences": "preferences", "index": "user_index", "tasks": "tasks",
           "train": "ranker", "evaluate": "eval"}
STARTED, COMPLETE = "_STAGE.json", "_COMPLETE"


def main_process() -> bool:
    """Under `accelerate launch`, only rank 0 writes the stage markers; every rank reads them."""
    return os.environ.get("RANK", "0") == "0"


def sync() -> None:
    """All ranks wait here when there are several (the same PartialState the stage's Accelerator or Trainer uses)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"  {prefix}{key}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return lines


class RunDir:
    def __init__(self, root):
        self.root = Path(root)

    # -- stage folders and their lifecycle --------------------------------------------------------------------------------
    def path(self, stage: str) -> Path:
        return self.root / FOLDERS[stage]

    def is_complete(self, stage: str) -> bool:
        return (self.path(stage) / COMPLETE).exists()

    def require(self, stage: str) -> Path:
        """A finished stage's folder, or a clear error naming the command that makes it."""
        if not self.is_complete(stage):
            raise UlmrecError(f"{self.path(stage)}: missing or unfinished; run `ulmrec {stage}` first")
        return self.path(stage)

    def stage_fingerprint(self, stage: str) -> str:
        return read_json(self.require(stage) / COMPLETE)["fingerprint"]

    def begin(self, stage: str, settings: dict, overwrite: bool, inputs: tuple[str, ...] = ()) -> bool:
        """True when the stage must run (fresh, resumed or overwritten), False when its output is finished and current.

        `inputs` are the earlier stages it reads; a missing required one is an error, an optional one (`name?`) is
        recorded only when it exists."""
        record = {"settings": json.loads(json.dumps(settings, default=str)), "inputs": self.input_fingerprints(inputs)}
        folder = self.path(stage)
        if overwrite and folder.exists() and main_process():
            logger.info("%s: --overwrite: deleting %s and computing it again", stage, folder)
            shutil.rmtree(folder)
        if not (folder / COMPLETE).exists() and (folder / STARTED).exists() and stage not in RESUMABLE and main_process():
            logger.info("%s: %s is unfinished and %s does not resume; starting again", stage, folder, stage)
            shutil.rmtree(folder)
        sync()
        state = self.existing_output(stage, record)
        sync()  # every rank has read the markers before rank 0 writes one, so all ranks take the same branch
        if state == "finished":
            logger.info("%s: %s is finished with these settings; skipping (--overwrite recomputes it)", stage, folder)
            return False
        if state == "unfinished":
            logger.info("%s: resuming the unfinished output in %s", stage, folder)
            return True
        if main_process():
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / STARTED, {**record, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        sync()
        return True

    def existing_output(self, stage: str, record: dict) -> str | None:
        """"finished" or "unfinished" when the stage's folder holds output made with `record`, None when it holds none;
        output made with other settings is an error listing the differences."""
        folder = self.path(stage)
        for marker, state in ((COMPLETE, "finished"), (STARTED, "unfinished")):
            if (folder / marker).exists():
                old = read_json(folder / marker)
                old = {"settings": old.get("settings", {}), "inputs": old.get("inputs", {})}
                if old == record:
                    return state
                raise UlmrecError(f"{stage}: {folder} holds {state} output made with other settings:\n"
                                  + "\n".join(differences(old, record))
                                  + "\nuse --overwrite to delete it and compute it again, or run with the old settings")
        return None

    def finish(self, stage: str, info: dict | None = None) -> None:
        if not main_process():
            return
        record = read_json(self.path(stage) / STARTED)
        record.update(fingerprint=fingerprint([record["settings"], record["inputs"]]), finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                      **(info or {}))
        write_json(self.path(stage) / COMPLETE, record)

    def stage_key(self, stage: str) -> str:
        """A fingerprint of the settings and inputs a started stage runs with (for caches made during the stage)."""
        record = read_json(self.path(stage) / STARTED)
        return fingerprint([record["settings"], record["inputs"]])

    def amend(self, stage: str, change: dict) -> None:
        """Record a change to a finished stage's output (e.g. users added to the index): its fingerprint changes, so
        later stages made from the old output say so instead of reusing it."""
        record = read_json(self.require(stage) / COMPLETE)
        record.setdefault("amendments", []).append(change)
        record["fingerprint"] = fingerprint([record["settings"], record["inputs"], record["amendments"]])
        write_json(self.path(stage) / COMPLETE, record)

    def settings(self, stage: str) -> dict:
        return read_json(self.require(stage) / COMPLETE)["settings"]

    def input_fingerprints(self, inputs: tuple[str, ...]) -> dict:
        out = {}
        for name in inputs:
            optional = name.endswith("?")
            name = name.rstrip("?")
            if optional and not self.is_complete(name):
                continue
            out[name] = self.stage_fingerprint(name)
        return out

    # -- named caches, logs and the push folder ---------------------------------------------------------------------------
    def cache(self, *parts: str) -> Path:
        return self.root.joinpath("cache", *parts)

    def logs(self, stage: str) -> Path:
        return self.path(stage) / "runs"

    @property
    def push(self) -> Path:
        return self.root / "push"

    # -- prepare ----------------------------------------------------------------------------------------------------------
    def prepared(self):
        import datasets

        return datasets.load_from_disk(str(self.require("prepare")))

    def titles(self) -> dict[int, str]:
        items = self.prepared()["items"]
        return dict(zip(items["item_id"], items["title"]))

    # -- retrieve ---------------------------------------------------------------------------------------------------------
    @property
    def retriever_model(self) -> Path:
        return self.path("retrieve") / "model"

    @property
    def retriever_checkpoint(self) -> Path:
        return self.path("retrieve") / "checkpoint"

    def candidates(self, split: str | None = None):
        """The retriever's top-k per user (`train`, `validation`, `test`), or one split of them."""
        import datasets

        data = datasets.load_from_disk(str(self.require("retrieve") / "candidates"))
        return data[split] if split else data

    # -- preferences ------------------------------------------------------------------------------------------------------
    @property
    def preferences_file(self) -> Path:
        return self.path("preferences") / "preferences.jsonl"

    def preferences(self, required: bool = True) -> dict[str, str]:
        """user (original id) -> preference sentence; {} when the stage has not run and `required` is False."""
        if not required and not self.is_complete("preferences"):
            return {}
        self.require("preferences")
        with open(self.preferences_file) as f:
            return {row["user"]: row["preference"] for row in map(json.loads, f)}

    def user_text_provenance(self) -> dict[str, str]:
        """Which interactions the text derived from each user came from (see `split`): preferences and index."""
        unknown = "not recorded (made before ulmrec-hf 0.3, which read all interactions)"
        out = {}
        for stage, name in (("preferences", "summary.json"), ("index", "stats.json")):
            path = self.path(stage) / name
            out[stage] = (read_json(path).get("user_text", unknown) if path.exists() else unknown) if self.is_complete(stage) else "stage not run"
        return out

    # -- index ------------------------------------------------------------------------------------------------------------
    def index_table(self):
        import datasets

        return datasets.load_from_disk(str(self.require("index") / "index"))

    def index(self) -> dict[str, str]:
        """user (original id) -> index string ('' for the `none` scheme)."""
        table = self.index_table()
        return dict(zip(table["user"], table["index"]))

    def index_tokens(self) -> list[str]:
        return read_json(self.require("index") / "tokens.json")

    # -- tasks ------------------------------------------------------------------------------------------------------------
    def task(self, name: str):
        import datasets

        path = self.require("tasks") / name
        return datasets.load_from_disk(str(path)) if path.exists() else None

    def mixture(self) -> dict:
        return read_json(self.require("tasks") / "mixture.json")

    def eval_meta(self) -> dict:
        return read_json(self.require("tasks") / "eval_meta.json")

    # -- train and evaluate -----------------------------------------------------------------------------------------------
    @property
    def ranker(self) -> Path:
        return self.path("train")

    @property
    def checkpoints(self) -> Path:
        return self.path("train") / "checkpoints"

    def ranker_config(self) -> dict:
        return read_json(self.require("train") / "ranker_config.json")

    def eval_metrics(self) -> dict:
        return read_json(self.require("evaluate") / "metrics.json")
