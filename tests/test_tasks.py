from collections import Counter

import datasets
import pytest

from ulmrec_hf.common import UlmrecError, read_json
from ulmrec_hf.runner import run_stage
from ulmrec_hf.tasks import PROTOCOLS, Negatives, TaskArguments, enabled_tasks, resolve_protocol, with_target

NO_ALIGN = ["--use_index_to_preference", "false", "--use_preference_to_index", "false", "--use_history_to_index", "false",
            "--use_rating", "false", "--use_intent", "false"]


@pytest.fixture
def inputs(tmp_path, tiny_pipeline, copy_stages):
    """A fresh run directory holding the finished data, retriever, preferences and index of the tiny pipeline."""

    def make(name: str):
        return copy_stages(tiny_pipeline, tmp_path / name, ("prepare", "retrieve", "preferences", "index"))

    return make


def users_by_id(run):
    return {u["user_id"]: u for u in datasets.load_from_disk(str(run / "data"))["users"]}


def test_all_prefix_rows_have_random_negatives_outside_the_history(inputs, tasks_flags):
    """LlamaRec's sampler: negatives are any items but the target and the items before it."""
    run = inputs("a")
    run_stage("tasks", tasks_flags(run, "--protocol", "paper", "--max_train_samples", "300"))
    rows, users = datasets.load_from_disk(str(run / "tasks" / "next_item")), users_by_id(run)
    positions, later = set(), False
    for r in rows:
        seq = users[r["user_id"]]["items"]
        train_seq = seq[:-2]
        assert len(r["candidates"]) == len(set(r["candidates"])) == 20
        assert r["candidates"].count(r["target"]) == 1 and r["candidates"][r["target_position"]] == r["target"]
        negatives = set(r["candidates"]) - {r["target"]}
        t = train_seq.index(r["target"])
        assert t >= 1 and not negatives & set(seq[: t + 1])  # no history item and not the target is a negative
        later |= bool(negatives & set(seq[t + 1:]))
        positions.add((r["user_id"], t))
        history_titles = [line for line in r["prompt"].split("History:\n")[1].split("Candidates:")[0].splitlines() if line]
        assert 1 <= len(history_titles) <= 5
    assert len(positions) == len(rows) == 300 and later  # a later item of the user can be drawn (the sampler never looks at it)
    assert Counter(r["target_position"] for r in rows).most_common(1)[0][1] < 40  # shuffled: no favoured slot
    # the same seed gives the same rows, in a second run directory
    again = inputs("b")
    run_stage("tasks", tasks_flags(again, "--protocol", "paper", "--max_train_samples", "300"))
    assert datasets.load_from_disk(str(again / "tasks" / "next_item")).to_list() == rows.to_list()


def test_all_prefixes_without_a_cap_takes_every_position(inputs, tasks_flags):
    run = inputs("a")
    run_stage("tasks", [*tasks_flags(run, "--protocol", "paper"), *NO_ALIGN, "--max_train_samples", "100000"])
    users = datasets.load_from_disk(str(run / "data"))["users"]["items"]
    assert len(datasets.load_from_disk(str(run / "tasks" / "next_item"))) == sum(len(s) - 3 for s in users)


def test_evaluation_keeps_the_retriever_order(tiny_pipeline):
    mixture = read_json(tiny_pipeline / "tasks" / "mixture.json")
    assert mixture["protocol"] == {"name": "paper", **PROTOCOLS["paper"]}
    candidates = datasets.load_from_disk(str(tiny_pipeline / "retriever" / "candidates" / "test"))
    by_user = {r["user_id"]: r for r in candidates}
    test = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_test"))
    assert len(test) > 10
    for row in test:
        retrieved = by_user[row["user_id"]]
        assert row["candidates"] == retrieved["candidates"]  # letters follow the retriever's order
        assert row["target_position"] == retrieved["target_rank"] - 1 == row["retriever_rank"] - 1
        assert row["retriever_scores"] == retrieved["scores"]


def test_shuffled_evaluation_is_a_seeded_permutation(inputs, tasks_flags):
    runs = []
    for seed in (1, 2):
        run = inputs(f"seed{seed}")
        run_stage("tasks", tasks_flags(run, "--protocol", "shuffled", "--seed", str(seed), "--eval_seed", "7"))
        runs.append(datasets.load_from_disk(str(run / "tasks" / "next_item_test")))
    a, b = runs
    assert a["prompt"] == b["prompt"] and a["user_id"] == b["user_id"]  # the eval seed fixes users and order across seeds
    candidates = datasets.load_from_disk(str(inputs("c") / "retriever" / "candidates" / "test"))
    by_user = {r["user_id"]: r for r in candidates}
    moved = 0
    for row in a:
        retrieved = by_user[row["user_id"]]
        assert sorted(row["candidates"]) == sorted(retrieved["candidates"])
        score = dict(zip(retrieved["candidates"], retrieved["scores"]))
        assert row["retriever_scores"] == [score[c] for c in row["candidates"]]
        moved += row["candidates"] != retrieved["candidates"]
    assert moved == len(a)


def test_a_missed_target_takes_a_seeded_random_slot():
    slots = Counter()
    for user in range(400):
        cands = with_target(list(range(100, 120)), 7, shuffle=False, key=f"42-next-{user}")
        assert cands.count(7) == 1 and len(cands) == 20
        slots[cands.index(7)] += 1
        assert cands == with_target(list(range(100, 120)), 7, shuffle=False, key=f"42-next-{user}")
    assert len(slots) == 20 and max(slots.values()) < 45  # about 20 each; never one fixed slot
    assert with_target([1, 2, 3], 2, shuffle=False, key="x") == [1, 2, 3]  # a retrieved target stays where it is


def test_retriever_training_candidates_never_fix_the_answer_slot(inputs, tasks_flags):
    run = inputs("custom")
    run_stage("tasks", tasks_flags(run, "--protocol", "custom", "--train_targets", "last", "--train_candidates", "retriever",
                                   "--eval_order", "retriever", "--max_train_samples", "200"))
    rows = datasets.load_from_disk(str(run / "tasks" / "next_item"))
    train = {r["user_id"]: r for r in datasets.load_from_disk(str(run / "retriever" / "candidates" / "train"))}
    missed = [r for r in rows if train[r["user_id"]]["target_rank"] is None]
    assert len(missed) > 20
    assert Counter(r["target_position"] for r in missed).most_common(1)[0][1] < len(missed) / 4


def test_protocol_contradictions_are_errors():
    assert resolve_protocol(TaskArguments(protocol="paper")) == PROTOCOLS["paper"]
    assert resolve_protocol(TaskArguments(protocol="paper", eval_order="retriever")) == PROTOCOLS["paper"]
    with pytest.raises(UlmrecError, match="protocol 'paper' means eval_order=retriever"):
        resolve_protocol(TaskArguments(protocol="paper", eval_order="shuffled"))
    with pytest.raises(UlmrecError, match="needs train_candidates=random"):
        resolve_protocol(TaskArguments(protocol="custom", train_targets="all_prefixes", train_candidates="retriever"))
    assert resolve_protocol(TaskArguments(protocol="custom", eval_order="retriever"))["train_candidates"] == "retriever"


def test_alignment_rows_come_on_top_of_the_same_next_item_rows(inputs, tasks_flags):
    made = {}
    for name, extra in (("llamarec", NO_ALIGN), ("ulmrec", [])):
        run = inputs(name)
        run_stage("tasks", [*tasks_flags(run, "--max_train_samples", "40"), *extra])
        made[name] = (datasets.load_from_disk(str(run / "tasks" / "next_item")), read_json(run / "tasks" / "mixture.json"))
    (plain, plain_mix), (full, full_mix) = made["llamarec"], made["ulmrec"]
    assert plain.to_list() == full.to_list()  # the same next-item rows for both variants
    assert plain_mix["train_samples"] == 40
    for task in ("index_to_preference", "preference_to_index", "history_to_index", "rating", "intent"):
        assert full_mix["tasks"][task]["rows"] == 8  # p 0.1 / 0.5 of 40 next-item rows
    assert full_mix["train_samples"] == 80 and full_mix["next_item_samples"] == 40


def test_the_mixture_is_interleave_datasets_with_the_recorded_probabilities(inputs, tasks_flags):
    run = inputs("mix")
    run_stage("tasks", tasks_flags(run, "--max_train_samples", "40"))
    mixture, train = read_json(run / "tasks" / "mixture.json"), datasets.load_from_disk(str(run / "tasks" / "train"))
    mixing = mixture["mixing"]
    assert mixing["method"] == "datasets.interleave_datasets" and mixing["stopping_strategy"] == "all_exhausted_without_replacement"
    rows = {t: v["rows"] for t, v in mixture["tasks"].items()}
    assert mixing["probabilities"] == {t: round(n / sum(rows.values()), 6) for t, n in rows.items()}
    parts = [datasets.load_from_disk(str(run / "tasks" / t)).select_columns(train.column_names).shuffle(seed=mixing["seed"]) for t in rows]
    assert mixing["within_task"] == f"Dataset.shuffle(seed={mixing['seed']})"
    again = datasets.interleave_datasets(parts, probabilities=[n / sum(rows.values()) for n in rows.values()], seed=mixing["seed"],
                                         stopping_strategy=mixing["stopping_strategy"])
    assert again.to_list() == train.to_list()  # exactly what interleave_datasets gives with the recorded settings
    assert sorted(map(str, train.to_list())) == sorted(str(r) for p in parts for r in p.to_list())  # every row once
    assert train["task"][:10] != sorted(train["task"][:10], key=list(rows).index)  # mixed, not task after task


def test_intent_rows_follow_the_candidate_rule(inputs, tasks_flags):
    run = inputs("intent")
    run_stage("tasks", tasks_flags(run, "--protocol", "paper", "--max_train_samples", "200"))
    rows, users = datasets.load_from_disk(str(run / "tasks" / "intent")), users_by_id(run)
    assert len(rows) == 40
    for r in rows:
        seq = users[r["user_id"]]["items"]
        assert r["target"] == seq[-3] and r["candidates"].count(r["target"]) == 1
        assert not (set(r["candidates"]) - {r["target"]}) & set(seq[:-2])
        assert "Preference:" in r["prompt"] and r["completion"] == "ABCDEFGHIJKLMNOPQRST"[r["target_position"]]


def test_rating_task_is_skipped_without_ratings():
    tasks, skipped = enabled_tasks(TaskArguments(), has_ratings=False, has_index=True, has_prefs=True)
    assert "rating" not in tasks and skipped == {"rating": "the data set has no ratings"}
    tasks, skipped = enabled_tasks(TaskArguments(use_intent=False), has_ratings=True, has_index=False, has_prefs=True)
    assert set(skipped) == {"intent", "index_to_preference", "preference_to_index", "history_to_index"}
    assert tasks[0] == "next_item"


def test_next_item_prediction_has_no_switch():
    """The ranking task is always on: the option that could only raise is gone, and naming it says why."""
    from ulmrec_hf.runner import parse_stage

    assert not hasattr(TaskArguments(), "use_next_item")
    with pytest.raises(UlmrecError, match="always on"):
        parse_stage("tasks", ["--use_next_item", "false"])


def test_eval_seed_fixes_test_users_across_training_seeds(inputs, tasks_flags):
    made = {}
    for seed in (1, 2):
        run = inputs(f"s{seed}")
        run_stage("tasks", tasks_flags(run, "--seed", str(seed), "--max_eval_users", "40", "--max_validation_users", "20",
                                       "--max_train_samples", "30", "--eval_seed", "7"))
        made[seed] = {split: datasets.load_from_disk(str(run / "tasks" / split)) for split in ("train", "next_item_test")}
        meta = read_json(run / "tasks" / "eval_meta.json")
        assert meta["test"]["users"] == 40 and meta["validation"]["users"] == 20 and meta["eval_seed"] == 7
    assert made[1]["next_item_test"]["prompt"] == made[2]["next_item_test"]["prompt"]
    assert made[1]["train"]["prompt"] != made[2]["train"]["prompt"]  # the training sample follows the training seed


def test_negatives_stop_with_a_clear_error_when_the_catalogue_is_too_small():
    """Without enough items outside the history the sampler would loop forever; it must say why instead."""
    history = {1, 2, 3, 4, 5}
    cands = Negatives(list(range(25)), 20, seed=0).candidates(0, history, "u1")
    assert len(set(cands)) == 20 and cands.count(0) == 1 and not history & set(cands)
    with pytest.raises(UlmrecError, match="fewer than 19 negatives"):
        Negatives(list(range(24)), 20, seed=0).candidates(0, history, "u1")
