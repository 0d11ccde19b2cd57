"""The run directory: the one place that knows the name of every file a stage writes or reads, and which settings made it.

    runs/<name>/
      data/          prepare      DatasetDict (users, items), stats.json, README.md (dataset card)
      retriever/     retrieve     model/ (save_pretrained), checkpoint/ (resume: accelerate state + trainer_state.json),
                                  runs/ (TensorBoard), metrics.json, candidates/ (DatasetDict train/validation/test)
      preferences/   preferences  preferences.jsonl, summary.json, failures.json
      user_index/    index        index/ (user -> index string; index.tmp/ while it is written), tokens.json, attention/
                                  and attention.json (the trained ID attention and its final loss), rqvae/, stats.json
      tasks/         tasks        one dataset per task (next_item/, index_to_preference/, ...), the mixed train/,
                                  next_item_{validation,test}[_uid_only]/, mixture.json, eval_meta.json, _scratch/ (while it runs)
      ranker/        train        PEFT adapter (adapter_model.safetensors, adapter_config.json) + tokenizer + README.md,
                                  ranker_config.json, train_metrics.json, untrained_metrics.json, validation_scores.json,
                                  checkpoints/ (with TensorBoard's runs/)
      eval/          evaluate     metrics.json, table.md, per_user/
      cache/         named caches that survive --overwrite, keyed by everything that changes their content:
                     preferences/responses.jsonl (every answer), embeddings/<key>/ (index's text-encoder shards)
      export/        export       the merged model (default folder), ulmrec_export.json, README.md
      push/          push         the folders `push --dry_run` writes: model/, export/, dataset/

Each stage folder holds `_STAGE.json` (the settings and input fingerprints it was started with) and, once finished,
`_COMPLETE` (the same plus a fingerprint that later stages record as their input). A finished stage asked to run again
with the same settings and inputs is skipped; with other settings it stops with the differences; `--overwrite` deletes
the folder and computes it again. An unfinished folder of a resumable stage (retrieve, index, train) is resumed when
its settings are the same and refused otherwise; other stages simply start again.

A trained ranker folder (`ranker/`, a folder given to `evaluate --ranker`, or a Hub snapshot) is read through
`RankerFolder`, which names its files.
"""

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from .common import UlmrecError, read_json, write_json, write_jsonl

logger = logging.getLogger(__name__)

RESUMABLE = {"retrieve", "index", "train"}  # stages whose unfinished folder holds work to continue (checkpoints, shards)
FOLDERS = {"prepare": "data", "retrieve": "retriever", "preferences": "preferences", "index": "user_index", "tasks": "tasks",
           "train": "ranker", "evaluate": "eval"}
STARTED, COMPLETE = "_STAGE.json", "_COMPLETE"
CARD = "README.md"  # the model or dataset card of a folder
EXPORT_FILE = "ulmrec_export.json"  # what a server needs besides an exported model
# Every name this module gives to a file or folder inside a stage folder (the tests keep them out of other modules).
NAMES = {STARTED, COMPLETE, CARD, EXPORT_FILE, "stats.json", "model", "checkpoint", "runs", "metrics.json", "candidates", "preferences.jsonl",
         "summary.json", "failures.json", "index", "index.tmp", "tokens.json", "attention", "attention.json", "rqvae", "train",
         "mixture.json", "eval_meta.json", "_scratch", "ranker_config.json", "train_metrics.json", "untrained_metrics.json",
         "validation_scores.json", "adapter_model.safetensors", "index_token_init.safetensors", "checkpoints", "table.md", "per_user", "responses.jsonl", "embeddings",
         "cache", "export", "push", "dataset"}


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


# Settings that one version added or removed, at the value that means what versions without them did: a record with or
# without such a key matches, so a run made before the change resumes instead of recomputing (the fingerprint it
# recorded, which later stages hold, is kept).
NEUTRAL = {
    "tasks": {("tasks", "use_next_item"): True, ("tasks", "candidate_permutations"): 1},
    "train": {("ranker", "next_item_loss"): "lm", ("ranker", "loss_normalization"): "token", ("ranker", "index_token_init"): "mean"},
    "evaluate": {("eval_permutations",): 1},
}


def without_neutral(stage: str, settings: dict) -> dict:
    settings = json.loads(json.dumps(settings))
    for (*parents, key), value in NEUTRAL.get(stage, {}).items():
        group = settings
        for name in parents:
            group = group.get(name, {}) if isinstance(group, dict) else {}
        if isinstance(group, dict) and group.get(key, object()) == value:
            del group[key]
    return settings


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
        new = {**record, "settings": without_neutral(stage, record["settings"])}
        for marker, state in ((COMPLETE, "finished"), (STARTED, "unfinished")):
            if (folder / marker).exists():
                old = read_json(folder / marker)
                old = {"settings": without_neutral(stage, old.get("settings", {})), "inputs": old.get("inputs", {})}
                if old == new:
                    return state
                raise UlmrecError(f"{stage}: {folder} holds {state} output made with other settings:\n"
                                  + "\n".join(differences(old, new))
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

    def stage_inputs(self, stage: str) -> dict:
        """The input fingerprints a finished stage was made from."""
        return read_json(self.require(stage) / COMPLETE)["inputs"]

    # -- named caches, logs, the export and push folders ------------------------------------------------------------------
    def cache(self, *parts: str) -> Path:
        return self.root.joinpath("cache", *parts)

    @property
    def preferences_cache(self) -> Path:
        return self.cache("preferences", "responses.jsonl")

    def embedding_cache(self, key: str) -> Path:
        return self.cache("embeddings", key)

    def logs(self, stage: str) -> Path:
        return self.path(stage) / "runs"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def push(self) -> Path:
        return self.root / "push"

    def push_folder(self, kind: str) -> Path:
        """`model`, `export` or `dataset`: what `push` uploads to each repository."""
        if kind not in ("model", "export", "dataset"):
            raise ValueError(kind)
        return self.push / kind

    # -- prepare ----------------------------------------------------------------------------------------------------------
    def prepared(self):
        import datasets

        return datasets.load_from_disk(str(self.require("prepare")))

    def titles(self) -> dict[int, str]:
        items = self.prepared()["items"]
        return dict(zip(items["item_id"], items["title"]))

    @property
    def dataset_card(self) -> Path:
        return self.path("prepare") / CARD

    @property
    def prepare_stats_file(self) -> Path:
        return self.path("prepare") / "stats.json"

    # -- retrieve ---------------------------------------------------------------------------------------------------------
    @property
    def retriever_model(self) -> Path:
        return self.path("retrieve") / "model"

    @property
    def retriever_checkpoint(self) -> Path:
        return self.path("retrieve") / "checkpoint"

    @property
    def retriever_metrics_file(self) -> Path:
        return self.path("retrieve") / "metrics.json"

    @property
    def candidates_path(self) -> Path:
        return self.path("retrieve") / "candidates"

    def retriever_metrics(self) -> dict:
        self.require("retrieve")
        return read_json(self.retriever_metrics_file)

    def candidates(self, split: str | None = None):
        """The retriever's top-k per user (`train`, `validation`, `test`), or one split of them."""
        import datasets

        self.require("retrieve")
        data = datasets.load_from_disk(str(self.candidates_path))
        return data[split] if split else data

    # -- preferences ------------------------------------------------------------------------------------------------------
    @property
    def preferences_file(self) -> Path:
        return self.path("preferences") / "preferences.jsonl"

    @property
    def preferences_summary_file(self) -> Path:
        return self.path("preferences") / "summary.json"

    @property
    def preferences_failures_file(self) -> Path:
        return self.path("preferences") / "failures.json"

    def write_preferences(self, rows) -> None:
        """preferences.jsonl, written atomically: an interrupted write leaves the old file."""
        write_jsonl(self.preferences_file, rows)

    def preferences(self, required: bool = True) -> dict[str, str]:
        """user (original id) -> preference sentence; {} when the stage has not run and `required` is False."""
        if not required and not self.is_complete("preferences"):
            return {}
        self.require("preferences")
        with open(self.preferences_file) as f:
            return {row["user"]: row["preference"] for row in map(json.loads, f)}

    def preferences_summary(self) -> dict:
        self.require("preferences")
        return read_json(self.preferences_summary_file)

    def user_text_provenance(self) -> dict[str, str]:
        """Which interactions the text derived from each user came from (see `split`): preferences and index."""
        unknown = "not recorded (made before ulmrec-hf 0.3, which read all interactions)"
        out = {}
        for stage, path in (("preferences", self.preferences_summary_file), ("index", self.index_stats_file)):
            out[stage] = (read_json(path).get("user_text", unknown) if path.exists() else unknown) if self.is_complete(stage) else "stage not run"
        return out

    # -- index ------------------------------------------------------------------------------------------------------------
    @property
    def index_dataset(self) -> Path:
        return self.path("index") / "index"

    @property
    def index_dataset_tmp(self) -> Path:
        return self.path("index") / "index.tmp"

    @property
    def index_tokens_file(self) -> Path:
        return self.path("index") / "tokens.json"

    @property
    def index_stats_file(self) -> Path:
        return self.path("index") / "stats.json"

    @property
    def index_attention(self) -> Path:
        return self.path("index") / "attention"

    @property
    def index_attention_record(self) -> Path:
        """The trained ID attention's final loss; its presence means A is trained (an interrupted run resumes after it)."""
        return self.path("index") / "attention.json"

    @property
    def index_rqvae(self) -> Path:
        return self.path("index") / "rqvae"

    def index_table(self):
        import datasets

        self.require("index")
        return datasets.load_from_disk(str(self.index_dataset))

    def index(self) -> dict[str, str]:
        """user (original id) -> index string ('' for the `none` scheme)."""
        table = self.index_table()
        return dict(zip(table["user"], table["index"]))

    def index_tokens(self) -> list[str]:
        self.require("index")
        return read_json(self.index_tokens_file)

    def index_stats(self) -> dict:
        self.require("index")
        return read_json(self.index_stats_file)

    # -- tasks ------------------------------------------------------------------------------------------------------------
    def task_path(self, name: str) -> Path:
        """A task's dataset folder: a task name, `train` (the mixture) or an evaluation set (`eval_set_name`)."""
        return self.path("tasks") / name

    @property
    def tasks_scratch(self) -> Path:
        return self.path("tasks") / "_scratch"

    @property
    def mixture_file(self) -> Path:
        return self.path("tasks") / "mixture.json"

    @property
    def eval_meta_file(self) -> Path:
        return self.path("tasks") / "eval_meta.json"

    def task(self, name: str):
        import datasets

        self.require("tasks")
        path = self.task_path(name)
        return datasets.load_from_disk(str(path)) if path.exists() else None

    def eval_set(self, split: str, uid_only: bool = False):
        """The next-item prompts of `validation` or `test` users (uid-only: the index without the history; None when absent)."""
        return self.task(eval_set_name(split, uid_only))

    def mixture(self) -> dict:
        self.require("tasks")
        return read_json(self.mixture_file)

    def eval_meta(self) -> dict:
        self.require("tasks")
        return read_json(self.eval_meta_file)

    def prompt_settings(self) -> dict:
        """The tasks stage's recorded settings (instructions, lengths): serving builds the same prompts from them."""
        return self.settings("tasks")["tasks"]

    # -- train and evaluate -----------------------------------------------------------------------------------------------
    @property
    def ranker(self) -> Path:
        return self.path("train")

    @property
    def ranker_files(self) -> "RankerFolder":
        return RankerFolder(self.ranker)

    @property
    def checkpoints(self) -> Path:
        return self.path("train") / "checkpoints"

    def ranker_config(self) -> dict:
        self.require("train")
        return read_json(self.ranker_files.config)

    @property
    def eval_metrics_file(self) -> Path:
        return self.path("evaluate") / "metrics.json"

    @property
    def eval_table(self) -> Path:
        return self.path("evaluate") / "table.md"

    @property
    def eval_per_user(self) -> Path:
        return self.path("evaluate") / "per_user"

    def eval_metrics(self) -> dict:
        self.require("evaluate")
        return read_json(self.eval_metrics_file)


def eval_set_name(split: str, uid_only: bool = False) -> str:
    return f"next_item_{split}" + ("_uid_only" if uid_only else "")


class RankerFolder:
    """The files of a trained ranker: `ranker/` of a run, a folder given to `evaluate --ranker`, or a Hub snapshot."""

    UPLOADED = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", CARD, "ranker_config.json", "train_metrics.json", "index_token_init.safetensors")  # what `push` puts in a model repo

    def __init__(self, folder):
        self.root = Path(folder)

    @property
    def config(self) -> Path:
        """ranker_config.json: the base, its precision, the answer-letter ids and the protocol the adapter was trained with."""
        return self.root / "ranker_config.json"

    @property
    def train_metrics(self) -> Path:
        return self.root / "train_metrics.json"

    @property
    def untrained_metrics(self) -> Path:
        return self.root / "untrained_metrics.json"

    @property
    def validation_scores(self) -> Path:
        return self.root / "validation_scores.json"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter_model.safetensors"

    @property
    def index_token_init(self) -> Path:
        """The index tokens' first rows when they came from text (`index_token_init: text`); loading puts them back."""
        return self.root / "index_token_init.safetensors"

    @property
    def card(self) -> Path:
        return self.root / CARD

    @property
    def complete(self) -> Path:
        return self.root / COMPLETE

    def is_ranker(self) -> bool:
        return self.config.exists()

    def read_config(self) -> dict:
        return read_json(self.config)
