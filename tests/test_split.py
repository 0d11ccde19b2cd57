"""No text derived from a user contains their validation or test interactions (unless include_heldout_text is set)."""

import shutil

import datasets
import pytest

from ulmrec_hf import preferences as preferences_mod
from ulmrec_hf import split
from ulmrec_hf.index import IndexArguments, user_texts
from ulmrec_hf.layout import RunDir
from ulmrec_hf.runner import run_stage

CANARY = "zqxheldout"


@pytest.fixture
def canary_run(tmp_path, demo_run, copy_stages, fast_flags):
    """The demo data with each user's last two reviews replaced by a canary word, and its retriever candidates."""
    run = copy_stages(demo_run, tmp_path / "run", ("prepare",))
    data = datasets.load_from_disk(str(run / "data"))
    users = data["users"].map(lambda r: {"reviews": r["reviews"][:-2] + [f"{CANARY} {CANARY} {CANARY} works"] * 2})
    datasets.DatasetDict({"users": users, "items": data["items"]}).save_to_disk(str(tmp_path / "data"))
    shutil.rmtree(run / "data")
    shutil.copytree(tmp_path / "data", run / "data")
    shutil.copy(demo_run / "data" / "_COMPLETE", run / "data" / "_COMPLETE")
    run_stage("retrieve", ["--run_dir", str(run), *fast_flags["retrieve"]])
    return run


def held_out_titles(run) -> dict[str, set[str]]:
    """user -> titles of their last two items that none of their training items share."""
    r = RunDir(run)
    titles = r.titles()
    out = {}
    for u in r.prepared()["users"]:
        train = {titles[i] for i in split.training_part(u["items"])}
        out[u["user"]] = {titles[i] for i in u["items"][-2:]} - train
    return out


def history_titles(prompt: str) -> set[str]:
    if "History:\n" not in prompt:
        return set()
    lines = prompt.split("History:\n", 1)[1].splitlines()
    return {line[2:].rsplit(" (", 1)[0] for line in lines[: next((n for n, x in enumerate(lines) if not x.startswith("- ")), len(lines))]}


def test_the_split_is_leave_one_out():
    seq = [1, 2, 3, 4, 5]
    assert split.training_part(seq) == [1, 2, 3]
    assert split.validation_pair(seq) == ([1, 2, 3], 4) and split.test_pair(seq) == ([1, 2, 3, 4], 5)
    row = {"user": "u", "items": seq, "reviews": list("abcde"), "ratings": [1.0] * 5}
    assert split.user_view(row) == {"user": "u", "items": [1, 2, 3], "reviews": ["a", "b", "c"], "ratings": [1.0] * 3}
    assert split.user_view(row, include_heldout=True) is row


def test_the_stages_use_the_one_split():
    """retrieve, tasks, preferences and index cut sequences with `split`, not their own slices."""
    import ast
    import inspect

    from ulmrec_hf import index, retrieve, tasks

    for module in (retrieve, tasks, preferences_mod, index):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):  # docstrings may describe the split; code may not restate it
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node):
                node.body = node.body[1:] or [ast.Pass()]
        code = ast.unparse(tree)
        assert "training_part" in code or "user_view" in code, module.__name__
        assert "[:-2]" not in code and "[:-3]" not in code, module.__name__


@pytest.mark.parametrize("include", [False, True])
def test_preference_prompts_hold_no_heldout_review_or_title(canary_run, monkeypatch, include):
    prompts = {}

    def capture(jobs, args, cache, stats, failures):
        prompts.update({j["user"]: j["prompt"] for j in jobs})
        return []

    monkeypatch.setattr(preferences_mod, "run_local", capture)
    held = held_out_titles(canary_run)
    for source in ("reviews", "titles"):
        prompts.clear()
        run_stage("preferences", ["--run_dir", str(canary_run), "--backend", "local", "--input", source, "--overwrite", "true",
                                  "--include_heldout_text", str(include).lower()])
        assert prompts
        if source == "reviews":
            assert any(CANARY in p for p in prompts.values()) == include
        else:
            leaked = [u for u, p in prompts.items() if any(f"- {t}" in p.splitlines() for t in held[u])]
            assert bool(leaked) == include


@pytest.mark.parametrize("include", [False, True])
def test_index_inputs_hold_no_heldout_review_or_title(canary_run, include):
    r = RunDir(canary_run)
    users, titles, held = r.prepared()["users"].to_list(), r.titles(), held_out_titles(canary_run)
    used, _ = user_texts(users, IndexArguments(text_source="reviews", include_heldout_text=include), titles, None)
    assert any(CANARY in t for ts in used for t in ts) == include
    used, _ = user_texts(users, IndexArguments(text_source="titles", include_heldout_text=include), titles, None)
    assert any(set(ts) & held[u["user"]] for u, ts in zip(users, used)) == include


@pytest.mark.parametrize("include", [False, True])
def test_the_index_stage_encodes_no_heldout_review(canary_run, tiny_encoder, fast_flags, monkeypatch, include):
    from ulmrec_hf import index as index_mod

    seen, real = [], index_mod.encode_cached
    monkeypatch.setattr(index_mod, "encode_cached", lambda texts, *a, **kw: (seen.extend(texts), real(texts, *a, **kw))[1])
    run_stage("index", ["--run_dir", str(canary_run), *fast_flags["index"], "--encoder", tiny_encoder, "--include_heldout_text", str(include).lower()])
    assert seen and any(CANARY in t for t in seen) == include


@pytest.mark.parametrize("include", [False, True])
def test_keyword_preferences_from_titles_hold_no_heldout_title_word(canary_run, include):
    """Without review text the keyword sentence comes from titles: from the training items' titles only."""
    import re

    data = datasets.load_from_disk(str(canary_run / "data"))
    users = data["users"].map(lambda r: {"reviews": [""] * len(r["reviews"])})
    rows = [split.user_view(u, include) for u in users.to_list()]
    titles = dict(zip(data["items"]["item_id"], data["items"]["title"]))
    words = lambda items: {w for i in items for w in re.findall(r"[a-z][a-z\-]{2,}", titles[i].lower())}  # noqa: E731
    leaked = 0
    for full, row in zip(users.to_list(), rows):
        only_held_out = words(full["items"][-2:]) - words(split.training_part(full["items"]))
        sentence = set(re.findall(r"[a-z][a-z\-]{2,}", preferences_mod.keyword_preference(row, titles).lower()))
        leaked += bool(sentence & only_held_out)
    assert (leaked > 0) == include


@pytest.mark.parametrize("include", [False, True])
def test_training_and_evaluation_prompts_hold_no_heldout_text(canary_run, tasks_flags, fast_flags, include):
    """Offline preferences (their keywords would carry the canary) and a nid index, then every task's rows."""
    run = str(canary_run)
    run_stage("preferences", ["--run_dir", run, "--include_heldout_text", str(include).lower()])
    run_stage("index", ["--run_dir", run, "--scheme", "nid"])
    run_stage("tasks", tasks_flags(canary_run, "--max_train_samples", "400"))
    r, held = RunDir(canary_run), held_out_titles(canary_run)
    names = dict(zip(r.prepared()["users"]["user_id"], r.prepared()["users"]["user"]))
    train = r.task("train")
    assert set(train["task"]) >= {"next_item", "index_to_preference", "preference_to_index", "intent"}
    texts = [*train["prompt"], *train["completion"], *r.task("next_item_validation")["prompt"], *r.task("next_item_test")["prompt"]]
    assert any(CANARY in t for t in texts) == include
    assert not any(history_titles(p) & held[names[u]] for p, u in zip(list(train["prompt"]), list(train["user_id"])))
    assert r.user_text_provenance()["preferences"] == split.text_scope(include)


def test_moving_the_split_moves_every_stage(monkeypatch):
    """The stages cut sequences with `split`'s functions, not copies: three held-out interactions instead of two moves
    retrieve's training rows and pairs, the tasks' training targets, the index's texts and the preferences' user view."""
    from ulmrec_hf import index, retrieve, tasks

    seq, reviews = [1, 2, 3, 4, 5, 6, 7], list("abcdefg")
    monkeypatch.setattr(split, "HELD_OUT", 3)
    assert retrieve.training_rows([seq], max_len=50) == [[1, 2, 3, 4]]
    pairs = retrieve.user_splits([seq], 50)
    assert pairs["train"] == [([1, 2, 3], 4)] and pairs["validation"] == [([1, 2, 3, 4], 5)]
    assert tasks.training_targets([{"items": seq}], "last") == [(0, 3)]
    assert tasks.training_targets([{"items": seq}], "all_prefixes") == [(0, 1), (0, 2), (0, 3)]
    used, held = index.user_texts([{"user": "u", "items": seq, "reviews": reviews}], index.IndexArguments(), {}, None)
    assert used == [list("abcd")] and held == [list("efg")]
    assert preferences_mod.user_view({"user": "u", "items": seq, "reviews": reviews})["reviews"] == list("abcd")
