import json

import datasets
import pytest
import torch
from safetensors.torch import load_file

from ulmrec_hf.common import UlmrecError, read_json
from ulmrec_hf.layout import FOLDERS, RunDir
from ulmrec_hf.runner import run_stage

UPSTREAM = ["prepare", "retrieve", "preferences", "index", "tasks", "train", "evaluate"]


def test_begin_takes_the_same_branch_on_every_rank(tmp_path, monkeypatch):
    """Rank 0 writes the start marker; a slower rank 1 must not read it as an unfinished run to resume and skip the
    barrier rank 0 waits at (the two-process DDP hang). Ranks are threads here, the barrier a threading.Barrier."""
    import threading
    import time

    from ulmrec_hf import layout

    barrier, rank, calls = threading.Barrier(2, timeout=10), threading.local(), {0: 0, 1: 0}

    def sync():
        barrier.wait()
        calls[rank.id] += 1
        if rank.id == 1 and calls[1] == 1:
            time.sleep(0.5)  # rank 1 reads the markers late

    monkeypatch.setattr(layout, "sync", sync)
    monkeypatch.setattr(layout, "main_process", lambda: rank.id == 0)
    results, errors = {}, []

    def worker(r):
        rank.id = r
        try:
            results[r] = RunDir(tmp_path).begin("retrieve", {"lr": 1e-3}, overwrite=False)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and results == {0: True, 1: True} and calls[0] == calls[1] == 3


def test_begin_finish_skip_differ_resume(tmp_path):
    run = RunDir(tmp_path)
    assert run.begin("retrieve", {"lr": 1e-3}, overwrite=False) is True
    (run.path("retrieve") / "partial.txt").write_text("half done")
    assert run.begin("retrieve", {"lr": 1e-3}, overwrite=False) is True  # unfinished, same settings: resume
    assert (run.path("retrieve") / "partial.txt").exists()
    with pytest.raises(UlmrecError, match=r"unfinished output made with other settings:\n  settings.lr: 0.001 -> 0.01"):
        run.begin("retrieve", {"lr": 1e-2}, overwrite=False)
    run.finish("retrieve", {"note": 1})
    assert run.begin("retrieve", {"lr": 1e-3}, overwrite=False) is False
    assert run.begin("tasks", {"n": 1}, overwrite=False) is True  # a stage that does not resume starts again
    (run.path("tasks") / "partial").write_text("x")
    assert run.begin("tasks", {"n": 2}, overwrite=False) is True and not (run.path("tasks") / "partial").exists()
    with pytest.raises(UlmrecError, match="finished output made with other settings(.|\n)*use --overwrite"):
        run.begin("retrieve", {"lr": 1e-2}, overwrite=False)
    assert run.begin("retrieve", {"lr": 1e-2}, overwrite=True) is True
    assert not (run.path("retrieve") / "partial.txt").exists() and not run.is_complete("retrieve")


def test_a_retired_setting_at_its_old_value_still_matches(tmp_path):
    """v0.3 tasks records hold `use_next_item: true`; v0.4 removed the flag, and those runs still resume and skip."""
    run = RunDir(tmp_path)
    settings = {"tasks": {"protocol": "paper"}, "tokenizer": "t"}
    run.begin("tasks", {"tasks": {**settings["tasks"], "use_next_item": True}, "tokenizer": "t"}, overwrite=False)
    run.finish("tasks")
    fingerprint = run.stage_fingerprint("tasks")
    assert run.begin("tasks", settings, overwrite=False) is False and run.stage_fingerprint("tasks") == fingerprint
    other = RunDir(tmp_path / "b")
    other.begin("tasks", {"tasks": {**settings["tasks"], "use_next_item": False}, "tokenizer": "t"}, overwrite=False)
    other.finish("tasks")
    with pytest.raises(UlmrecError, match=r"finished output made with other settings:\n  settings.tasks.use_next_item: false -> \"<unset>\""):
        other.begin("tasks", settings, overwrite=False)


def test_an_added_setting_at_its_neutral_value_matches_an_older_record(tmp_path):
    """v0.4 evaluate records have no `eval_permutations`; at 1 (what v0.4 did) they still skip, at 2 they are refused."""
    run = RunDir(tmp_path)
    run.begin("evaluate", {"batch": 8}, overwrite=False)
    run.finish("evaluate")
    assert run.begin("evaluate", {"batch": 8, "eval_permutations": 1}, overwrite=False) is False
    with pytest.raises(UlmrecError, match=r"other settings:\n  settings.eval_permutations: \"<unset>\" -> 2\nuse --overwrite"):
        run.begin("evaluate", {"batch": 8, "eval_permutations": 2}, overwrite=False)


def test_inputs_are_recorded_and_a_changed_input_is_reported(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(UlmrecError, match="run `ulmrec prepare` first"):
        run.begin("retrieve", {}, overwrite=False, inputs=("prepare",))
    run.begin("prepare", {"k": 5}, overwrite=False)
    run.finish("prepare")
    run.begin("retrieve", {}, overwrite=False, inputs=("prepare", "preferences?"))
    run.finish("retrieve")
    assert set(read_json(run.path("retrieve") / "_COMPLETE")["inputs"]) == {"prepare"}
    run.begin("prepare", {"k": 6}, overwrite=True)
    run.finish("prepare")
    with pytest.raises(UlmrecError, match="inputs.prepare"):
        run.begin("retrieve", {}, overwrite=False, inputs=("prepare",))


def test_amending_a_stage_changes_its_fingerprint(tmp_path):
    run = RunDir(tmp_path)
    run.begin("index", {}, overwrite=False)
    run.finish("index")
    before = run.stage_fingerprint("index")
    run.amend("index", {"added_users": 3})
    assert run.stage_fingerprint("index") != before


def second_encoder(tmp_path, tiny_encoder) -> str:
    from transformers import BertModel

    torch.manual_seed(123)
    model = BertModel.from_pretrained(tiny_encoder)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(tmp_path / "other_encoder")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_encoder).save_pretrained(tmp_path / "other_encoder")
    return str(tmp_path / "other_encoder")


def index_embeddings(run) -> torch.Tensor:
    cache = read_json(run / "user_index" / "stats.json")["embedding_cache"]
    return load_file(f"{cache}/shard_00000.safetensors")["embeddings"]


@pytest.mark.parametrize("stage", UPSTREAM)
def test_every_stage_skips_refuses_and_overwrites(stage, tmp_path, tiny_pipeline, copy_stages, demo_raw, tiny_encoder, fast_flags,
                                                   tasks_flags, train_flags):
    run = copy_stages(tiny_pipeline, tmp_path / "run", UPSTREAM[: UPSTREAM.index(stage) + 1])
    r = ["--run_dir", str(run)]
    same = {"prepare": r + ["--input", str(demo_raw)], "retrieve": r + fast_flags["retrieve"], "preferences": r,
            "index": r + fast_flags["index"] + ["--encoder", tiny_encoder], "tasks": tasks_flags(run), "train": train_flags(run),
            "evaluate": r}[stage]
    change = {"prepare": ["--min_interactions", "6"], "retrieve": ["--seed", "7"], "preferences": ["--max_users", "50"],
              "index": ["--encoder", second_encoder(tmp_path, tiny_encoder)] if stage == "index" else [],
              "tasks": ["--history_len", "3"], "train": ["--learning_rate", "2e-2"], "evaluate": ["--fusion_weights", "0", "0.5"]}[stage]
    folder = run / FOLDERS[stage]
    finished = (folder / "_COMPLETE").read_text()
    before = snapshot(stage, run)
    run_stage(stage, same)  # the same settings: skipped, nothing rewritten
    assert (folder / "_COMPLETE").read_text() == finished
    with pytest.raises(UlmrecError, match=f"{stage}: .* made with other settings:\n  settings.*->(.|\n)*use --overwrite"):
        run_stage(stage, same + change)
    assert (folder / "_COMPLETE").read_text() == finished  # refused: still the old output
    run_stage(stage, same + change + ["--overwrite"])
    after = snapshot(stage, run)
    assert after != before
    check_reflects(stage, run, after)


def snapshot(stage: str, run):
    if stage == "prepare":
        return read_json(run / "data" / "stats.json")["min_interactions"], read_json(run / "data" / "stats.json")["interactions"]
    if stage == "retrieve":
        return load_file(str(run / "retriever" / "model" / "model.safetensors"))["item_emb.weight"].sum().item()
    if stage == "preferences":
        return len((run / "preferences" / "preferences.jsonl").read_text().splitlines())
    if stage == "index":
        return index_embeddings(run).sum().item()
    if stage == "tasks":
        return datasets.load_from_disk(str(run / "tasks" / "next_item_test"))["prompt"]
    if stage == "train":
        return sorted(float(v.float().sum()) for k, v in load_file(str(run / "ranker" / "adapter_model.safetensors")).items() if "lora_B" in k)
    return read_json(run / "eval" / "metrics.json")["fusion"]["validation_ndcg@10_by_weight"]


def check_reflects(stage: str, run, after) -> None:
    """The overwritten output was made with the new setting."""
    if stage == "prepare":
        assert after[0] == 6
    elif stage == "preferences":
        assert after == 50
    elif stage == "index":
        assert read_json(run / "user_index" / "_COMPLETE")["settings"]["encoder"].endswith("other_encoder")
    elif stage == "tasks":
        history = after[0].split("History:\n")[1].split("Candidates:")[0].strip().splitlines()
        assert len(history) <= 3
    elif stage == "train":
        assert read_json(run / "ranker" / "_COMPLETE")["settings"]["training"]["learning_rate"] == 2e-2
    elif stage == "evaluate":
        assert set(after) == {"0.0", "0.5"}
    elif stage == "retrieve":
        assert read_json(run / "retriever" / "_COMPLETE")["settings"]["seed"] == 7
    assert json.loads((run / FOLDERS[stage] / "_COMPLETE").read_text())["finished"]


def test_preferences_are_written_atomically(tmp_path):
    """An interrupted write of preferences.jsonl leaves the old file, as every JSON output does."""
    run = RunDir(tmp_path)
    run.write_preferences([{"user": "u", "preference": "old"}])

    def rows():
        yield {"user": "u", "preference": "new"}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.write_preferences(rows())
    assert run.preferences_file.read_text() == '{"user": "u", "preference": "old"}\n'
