"""Hub sharing: the adapter (LoRA + index-token rows only) with its tokenizer and model card to a model repo, and/or the
full model `ulmrec export` wrote to another; data, user index and preferences (parquet, with a dataset card) to a
dataset repo. The model cards name the repository ids used here, link the dataset repo and carry the test results
(`model-index`) once `ulmrec evaluate` has run. `--dry_run` writes the exact folders."""

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .common import RunArguments, UlmrecError, read_json
from .layout import CARD, EXPORT_FILE, RankerFolder, RunDir

logger = logging.getLogger(__name__)


@dataclass
class PushArguments:
    _argument_group_name = "push"
    model_repo: str | None = field(default=None, metadata={"help": "Hub model repo for the adapter, e.g. you/ulmrec-beauty."})
    export_repo: str | None = field(default=None, metadata={"help": "Hub model repo for the full model `ulmrec export` wrote (instead of or besides the adapter), e.g. you/ulmrec-beauty-merged."})
    export_dir: str | None = field(default=None, metadata={"help": "The export folder to upload (default: <run_dir>/export)."})
    dataset_repo: str | None = field(default=None, metadata={"help": "Hub dataset repo for data, index and preferences."})
    dry_run: bool = field(default=False, metadata={"help": "Only write the folders that would be uploaded (run_dir/push/)."})
    private: bool = field(default=False, metadata={"help": "Create private repos."})


ARGUMENTS = (RunArguments, PushArguments)


def model_folder(run: RunDir, dest: Path, repo: str | None, dataset_repo: str | None) -> Path:
    from .cards import run_card

    ranker = run.require("train")
    dest.mkdir(parents=True, exist_ok=True)
    for name in RankerFolder.UPLOADED:
        if (ranker / name).exists():
            shutil.copy2(ranker / name, dest / name)
    run_card(run, repo_id=repo, dataset_repo=dataset_repo).save(dest / CARD)
    return dest


def export_folder(run: RunDir, source: Path, dest: Path, repo: str | None, dataset_repo: str | None) -> Path:
    """The export's files (hard links where the file system allows: a 7B export is 13 GB) with a card naming `repo`."""
    import os

    from .cards import card_export, run_card

    if not (source / EXPORT_FILE).exists():
        raise UlmrecError(f"push: {source} holds no export ({EXPORT_FILE}); run `ulmrec export --run_dir {run.root}` first")
    dest.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name != CARD:
            try:
                os.link(path, dest / path.name)
            except OSError:
                shutil.copy2(path, dest / path.name)
    run_card(run, repo_id=repo, dataset_repo=dataset_repo, export=card_export(read_json(source / EXPORT_FILE))).save(dest / CARD)
    return dest


def dataset_folder(run: RunDir, dest: Path) -> Path:
    import datasets

    dest.mkdir(parents=True, exist_ok=True)
    data = run.prepared()
    parts = {"users": data["users"], "items": data["items"]}
    if run.is_complete("index"):
        parts["user_index"] = run.index_table()
        folder = dest / run.path("index").name  # the same folder name as in the run
        folder.mkdir(exist_ok=True)
        for src in (run.index_tokens_file, run.index_stats_file, run.index_attention, run.index_rqvae):
            if src.is_dir():
                shutil.copytree(src, folder / src.name)
            elif src.exists():
                shutil.copy2(src, folder / src.name)
    if run.is_complete("preferences"):
        parts["preferences"] = datasets.load_dataset("json", data_files=str(run.preferences_file), split="train")
    for name, ds in parts.items():
        ds.to_parquet(str(dest / f"{name}.parquet"))
    data.save_to_disk(str(dest / run.path("prepare").name))
    dataset_card(run, list(parts)).save(dest / CARD)
    return dest


def dataset_card(run: RunDir, configs: list[str]):
    """The prepare stage's card, with one Hub config per parquet file and sections on the index and the preferences."""
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(run.dataset_card)
    card.data.configs = [{"config_name": c, "data_files": f"{c}.parquet"} for c in configs]
    extra, user_text = [], run.user_text_provenance()
    if "user_index" in configs:
        stats = run.index_stats()
        extra.append(f"## User index\nScheme `{stats['scheme']}`, {stats.get('unique')} unique indices"
                     + (f"; text source `{stats['text_source']}`, collision rate {stats['collision_rate_before']} before repair, "
                        f"{stats['collision_rate_after']} after." if stats["scheme"] == "pid" else ".")
                     + f" User text: {user_text['index']}.")
    if "preferences" in configs:
        summary = run.preferences_summary()
        extra.append(f"## Preferences\nOne sentence per user from backend `{summary['backend']}` ({summary.get('source')}); "
                     f"{summary['done']} users, {summary.get('fallbacks', 0)} labelled offline-keyword fallbacks. "
                     f"User text: {user_text['preferences']}.")
    card.text += "\n" + "\n\n".join(extra) + f"\n\nLoad with `datasets.load_dataset(REPO, 'users')` (configs: {', '.join(configs)}).\n"
    return card


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


def main(run_args: RunArguments, args: PushArguments) -> Path:
    run = RunDir(run_args.run_dir)
    if not args.dry_run and not (args.model_repo or args.export_repo or args.dataset_repo):
        raise UlmrecError("push: give --model_repo, --export_repo and/or --dataset_repo, or --dry_run")
    source = Path(args.export_dir) if args.export_dir else run.export
    if run.push.exists():
        shutil.rmtree(run.push)
    model_dir = model_folder(run, run.push_folder("model"), args.model_repo, args.dataset_repo)
    export = None
    if args.export_repo or args.export_dir or (args.dry_run and source.exists()):
        export = export_folder(run, source, run.push_folder("export"), args.export_repo, args.dataset_repo)
    data_dir = dataset_folder(run, run.push_folder("dataset"))
    size = RankerFolder(model_dir).adapter.stat().st_size / 1e6
    if args.dry_run:
        print(f"dry run: model folder {model_dir} (adapter {size:.2f} MB)" + (f", export folder {export}" if export else "")
              + f", dataset folder {data_dir}")
        return run.push
    if args.model_repo:
        print(f"model: {upload(model_dir, args.model_repo, 'model', args.private)}")
    if args.export_repo:
        print(f"export: {upload(export, args.export_repo, 'model', args.private)}")
    if args.dataset_repo:
        print(f"dataset: {upload(data_dir, args.dataset_repo, 'dataset', args.private)}")
    return run.push
