"""Hub sharing: the adapter + tokenizer + model card to a model repo; data, user index and preferences
(parquet, with a dataset card) to a dataset repo. `--dry_run` writes the exact folders instead."""

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .common import UlmrecError, read_json, require

logger = logging.getLogger(__name__)
MODEL_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "README.md", "ranker_config.json", "train_metrics.json")


@dataclass
class PushArguments:
    run_dir: str = field(default="runs/demo", metadata={"help": "A finished run directory.", "aliases": ["--run"]})
    model_repo: str | None = field(default=None, metadata={"help": "Hub model repo for the adapter, e.g. you/ulmrec-beauty."})
    dataset_repo: str | None = field(default=None, metadata={"help": "Hub dataset repo for data, index and preferences."})
    dry_run: bool = field(default=False, metadata={"help": "Only write the folders that would be uploaded (run_dir/push/)."})
    private: bool = field(default=False, metadata={"help": "Create private repos."})


def model_folder(run: Path, dest: Path) -> Path:
    ranker = require(run / "ranker", "train")
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (ranker / name).exists():
            shutil.copy2(ranker / name, dest / name)
    return dest


def dataset_folder(run: Path, dest: Path) -> Path:
    import datasets

    require(run / "data", "prepare")
    dest.mkdir(parents=True, exist_ok=True)
    data = datasets.load_from_disk(str(run / "data"))
    parts = {"users": data["users"], "items": data["items"]}
    if (run / "user_index" / "index").exists():
        parts["user_index"] = datasets.load_from_disk(str(run / "user_index" / "index"))
        for name in ("tokens.json", "stats.json", "config.json", "rqvae.safetensors", "attention.safetensors"):
            if (run / "user_index" / name).exists():
                (dest / "user_index").mkdir(exist_ok=True)
                shutil.copy2(run / "user_index" / name, dest / "user_index" / name)
    prefs = run / "preferences" / "preferences.jsonl"
    if prefs.exists():
        parts["preferences"] = datasets.Dataset.from_list([json.loads(line) for line in prefs.read_text().splitlines()])
    for name, ds in parts.items():
        ds.to_parquet(str(dest / f"{name}.parquet"))
    data.save_to_disk(str(dest / "data"))
    (dest / "README.md").write_text(dataset_card(run, list(parts)))
    return dest


def dataset_card(run: Path, configs: list[str]) -> str:
    card = (run / "data" / "README.md").read_text()
    front, body = card.split("---\n", 2)[1], card.split("---\n", 2)[2]
    yaml_configs = "configs:\n" + "".join(f"- config_name: {c}\n  data_files: {c}.parquet\n" for c in configs)
    extra = []
    if "user_index" in configs:
        stats = read_json(run / "user_index" / "stats.json")
        extra.append(f"## User index\nScheme `{stats['scheme']}`, {stats.get('unique')} unique indices"
                     + (f"; text source `{stats['text_source']}`, collision rate {stats['collision_rate_before']} before repair, "
                        f"{stats['collision_rate_after']} after." if stats["scheme"] == "pid" else "."))
    if "preferences" in configs:
        summary = read_json(run / "preferences" / "summary.json")
        extra.append(f"## Preferences\nOne sentence per user from backend `{summary['backend']}` ({summary.get('source')}); "
                     f"{summary['done']} users, {summary.get('fallbacks', 0)} labelled offline-keyword fallbacks.")
    return f"---\n{front}{yaml_configs}---\n{body}\n" + "\n\n".join(extra) + "\n\nLoad with `datasets.load_dataset(REPO, 'users')` (configs: " + ", ".join(configs) + ").\n"


def upload(folder: Path, repo: str, repo_type: str, private: bool) -> str:
    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise UlmrecError("push: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    api = HfApi()
    try:
        api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
        return str(api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type=repo_type, commit_message="Upload with ulmrec-hf"))
    except Exception as e:  # noqa: BLE001 - network and Hub errors become one line
        raise UlmrecError(f"push: could not upload to {repo_type} repo {repo}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def main(args: PushArguments) -> Path:
    run = Path(args.run_dir)
    if not args.dry_run and not (args.model_repo or args.dataset_repo):
        raise UlmrecError("push: give --model_repo and/or --dataset_repo, or --dry_run")
    out = run / "push"
    if out.exists():
        shutil.rmtree(out)
    model_dir = model_folder(run, out / "model")
    data_dir = dataset_folder(run, out / "dataset")
    if args.dry_run:
        print(f"dry run: model folder {model_dir}, dataset folder {data_dir}")
        return out
    if args.model_repo:
        print(f"model: {upload(model_dir, args.model_repo, 'model', args.private)}")
    if args.dataset_repo:
        print(f"dataset: {upload(data_dir, args.dataset_repo, 'dataset', args.private)}")
    return out
