"""Issue 21's options: the letters loss, per-sample normalisation, index rows from text, training and scoring under
several candidate orders, and the uid-only row with swapped indices."""

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ulmrec_hf import train as train_mod
from ulmrec_hf.common import UlmrecError, read_json
from ulmrec_hf.layout import RunDir
from ulmrec_hf.prompts import LETTERS, permutation, permuted_prompt
from ulmrec_hf.ranker import load_ranker, log_softmax, permutation_average, score_prompts
from ulmrec_hf.runner import parse_stage, run_stage

UP_TO_TASKS = ("prepare", "retrieve", "preferences", "index", "tasks")


def trainer_for(run: Path, flags: list[str]):
    _, ranker, model_args, training_args = parse_stage("train", flags)
    mixture = RunDir(run).mixture()
    train_mod.resolve(model_args, training_args, RunDir(run), mixture)
    return train_mod.build_trainer(RunDir(run), ranker, model_args, training_args, mixture)[0]


def mixed_batch(trainer, n: int = 8) -> dict:
    """A padded training batch holding letter rows (letter + EOS) and longer alignment rows."""
    rows = [trainer.train_dataset[i] for i in range(min(40, len(trainer.train_dataset)))]
    labelled = (trainer.data_collator(rows)["labels"] != -100).sum(1).tolist()
    short, long = [i for i, a in enumerate(labelled) if a == 2], [i for i, a in enumerate(labelled) if a > 2]
    assert short and long
    return trainer._prepare_inputs(trainer.data_collator([rows[i] for i in short[: n // 2] + long[: n // 2]]))


def hand_loss(model, batch: dict, letters: list[int], next_item_loss: str) -> torch.Tensor:
    """The token-mean loss written out row by row from the full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    terms = []
    for row in range(len(logits)):
        positions = (batch["labels"][row, 1:] != -100).nonzero().squeeze(-1).tolist()
        labels = [int(batch["labels"][row, p + 1]) for p in positions]
        if next_item_loss == "letters" and len(labels) == 2 and labels[0] in letters:
            terms.append(-torch.log_softmax(logits[row, positions[0], letters], -1)[letters.index(labels[0])])
            continue
        terms += [-torch.log_softmax(logits[row, p], -1)[t] for p, t in zip(positions, labels)]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("next_item_loss", ["lm", "letters"])
def test_the_letters_loss_is_the_cross_entropy_over_the_letter_logits(tiny_pipeline, train_flags, next_item_loss):
    trainer = trainer_for(tiny_pipeline, train_flags(tiny_pipeline, "--next_item_loss", next_item_loss))
    batch = mixed_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch)
        want = hand_loss(trainer.model, batch, trainer.letter_ids, next_item_loss)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def row_weights(normalization: str) -> list[float]:
    """How much of the loss each of two rows carries, a 2-token and a 25-token completion, read from the gradient: with
    uniform logits every term's gradient has the same size, so a row's share is the sum of its positions' gradients."""
    vocab, positions = 50, 25
    logits = torch.zeros(2, positions, vocab, requires_grad=True)
    labels = torch.full((2, positions), -100)
    labels[0, -2:] = torch.tensor([7, 9])
    labels[1] = torch.arange(positions) % vocab
    rows = torch.arange(2)[:, None].expand(2, positions)
    train_mod.completion_loss(logits, labels, rows, list(range(20, 40)), "lm", normalization).backward()
    return [float(logits.grad[r].abs().sum()) for r in range(2)]


def test_sample_normalisation_weighs_a_2_token_and_a_25_token_completion_equally():
    short, long = row_weights("sample")
    assert short == pytest.approx(long, rel=1e-6)
    short, long = row_weights("token")
    assert long / short == pytest.approx(25 / 2, rel=1e-6)


def test_the_losses_agree_where_they_must():
    """One letter row alone: letters+sample = letters+token; with only LM rows of equal length, sample = token."""
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 4, 50), torch.full((3, 4), -100)
    labels[:, 2:] = torch.tensor([[21, 2], [30, 2], [5, 6]])
    rows = torch.arange(3)[:, None].expand(3, 4)
    loss = {(n, m): train_mod.completion_loss(logits, labels, rows, list(range(20, 40)), n, m) for n in ("lm", "letters") for m in ("token", "sample")}
    torch.testing.assert_close(loss["lm", "token"], loss["lm", "sample"])
    letter_terms = [-torch.log_softmax(logits[r, 2, 20:40], -1)[labels[r, 2] - 20] for r in (0, 1)]
    lm_row = -torch.log_softmax(logits[2, 2:], -1)[[0, 1], [5, 6]]
    torch.testing.assert_close(loss["letters", "token"], torch.cat([torch.stack(letter_terms), lm_row]).mean())
    torch.testing.assert_close(loss["letters", "sample"], (letter_terms[0] + letter_terms[1] + lm_row.mean()) / 3)


@pytest.fixture(scope="module")
def text_init_run(tmp_path_factory, tiny_pipeline, train_flags):
    from ulmrec_hf.layout import FOLDERS

    run = tmp_path_factory.mktemp("text_init")
    for stage in UP_TO_TASKS:
        (run / FOLDERS[stage]).symlink_to(tiny_pipeline / FOLDERS[stage])
    run_stage("train", train_flags(run, "--index_token_init", "text", "--train_index_embeddings", "false", "--max_steps", "2",
                                   "--eval_before_training", "false"))
    return run


def test_text_init_rows_are_deterministic_and_reload_bit_identically(text_init_run, tiny_llm):
    from ulmrec_hf.llm import load_tokenizer
    from ulmrec_hf.prompts import add_index_tokens, text_rows
    from ulmrec_hf.ranker import load_base

    run = RunDir(text_init_run)
    saved = load_file(str(run.ranker_files.index_token_init))
    tokenizer = load_tokenizer(tiny_llm)
    ids = add_index_tokens(tokenizer, run.index_tokens())
    by_token = train_mod.index_texts(run)
    used = [t for t, texts in by_token.items() if texts]
    assert 0 < len(used) and saved["token_ids"].tolist() == tokenizer.convert_tokens_to_ids(used)
    for _ in range(2):  # computed again from a freshly loaded base: the same bits
        again = text_rows(load_base(tiny_llm, "none", "float32", "cpu", len(tokenizer)), tokenizer, by_token)
        assert torch.equal(torch.stack(list(again.values())), saved["rows"])
    base = load_base(tiny_llm, "none", "float32", "cpu", len(tokenizer))
    first = {u: [] for u in used}  # a row is the mean of its users' mean token embeddings
    for user in sorted(run.index()):
        for token in used:
            if token in run.index()[user] and run.preferences().get(user):
                first[token].append(base.get_input_embeddings().weight[tokenizer(run.preferences()[user], add_special_tokens=False).input_ids].mean(0))
    torch.testing.assert_close(saved["rows"][0], torch.stack(first[used[0]]).mean(0).detach())
    model, tok, config = load_ranker(run.ranker)
    rows = model.get_base_model().get_input_embeddings().weight[saved["token_ids"]]
    assert torch.equal(rows, saved["rows"]) and config["index_token_init"] == "text" and len(ids) == config["index_tokens"]
    metrics = read_json(run.ranker_files.train_metrics)
    check = metrics["reload_check"]
    assert score_prompts(model, tok, check["prompts"], config["letter_token_ids"]).tolist() == check["scores"]
    assert "preferences" in read_json(run.path("train") / "_COMPLETE")["inputs"]  # the texts the rows came from
    assert metrics["training_options"] == {"next_item_loss": "lm", "loss_normalization": "token", "index_token_init": "text",
                                           "index_rows_from_text": len(used)}
    assert "index-token rows started from: `text`" in run.ranker_files.card.read_text()


def test_the_letters_loss_refuses_a_mixture_where_another_row_answers_with_a_letter():
    rows = {"task": ["next_item", "intent", "index_to_preference"], "completion": ["C", "A", "The user likes soap."]}
    train_mod.check_letter_rows(rows, 20)
    with pytest.raises(UlmrecError, match="a index_to_preference row has the completion 'B'"):
        train_mod.check_letter_rows({**rows, "completion": ["C", "A", "B"]}, 20)


def test_text_init_needs_preferences(tmp_path, tiny_pipeline, copy_stages, train_flags):
    import shutil

    run = copy_stages(tiny_pipeline, tmp_path / "run", UP_TO_TASKS)
    shutil.rmtree(run / "preferences")
    with pytest.raises(UlmrecError, match="index_token_init text"):
        train_mod.index_texts(RunDir(run))


def test_permutation_average_is_each_items_mean_log_probability_over_its_positions():
    prompt = "### Instruction:\nI\n### Input:\nCandidates:\n" + "\n".join(f"({LETTERS[i]}) item {i}" for i in range(4)) + "\n### Response:\n"
    prompts, keys = [prompt, prompt.replace("item 0", "thing 0")], ["u1", "u2"]

    def score(shown: list[str], j: int = 0) -> np.ndarray:  # a scorer that prefers letter A and item 2
        return np.array([[(2.0 if i == 0 else 0.0) + (3.0 if "item 2" in p.split(f"({LETTERS[i]}) ")[1].split("\n")[0] else 0.0)
                          for i in range(4)] for p in shown], dtype=np.float32)

    first = score(prompts)
    assert permutation_average(first, prompts, keys, 1, score) is first  # k = 1: the scores of today's evaluation
    for k in (0, -1):  # never a silent reversal or an all-tied ranking
        with pytest.raises(UlmrecError, match="eval_permutations must be at least 1"):
            permutation_average(first, prompts, keys, k, score)
    got = permutation_average(first, prompts, keys, 3, score)
    for r, key in enumerate(keys):
        orders = [list(range(4))] + [permutation(4, f"{key}-perm{j}") for j in (1, 2)]
        shown = [log_softmax(score([permuted_prompt(prompts[r], o)]))[0] for o in orders]
        want = [np.mean([s[o.index(item)] for s, o in zip(shown, orders)]) for item in range(4)]
        np.testing.assert_allclose(got[r], want, rtol=1e-6)
    assert got.dtype == np.float32 and (got.argmax(1) == 2).all()  # the letter-A bias averages out, the item's preference stays


def test_one_key_seeds_a_users_shuffled_order_and_extra_orders(monkeypatch):
    import random

    from ulmrec_hf import prompts

    assert prompts.user_key(42, "test", 7) == "42-test-7"  # the spelling stored results and served rankings were seeded with
    monkeypatch.setattr(prompts, "next_item_row", lambda builder, user, history, cands, target, **extra: cands)
    row = {"user_id": 7, "candidates": list(range(20)), "scores": [0.0] * 20, "history": [], "target": 3, "target_rank": 4}
    expected = list(range(20))
    random.Random("42-test-7").shuffle(expected)
    assert prompts.eval_row(None, "shuffled", row, None, 42, "test") == expected != list(range(20))
    assert prompts.eval_row(None, "retriever", row, None, 42, "test") == list(range(20))


def test_a_permuted_prompt_moves_whole_candidate_lines():
    prompt = "### Instruction:\nI\n### Input:\nUser: <a_1>\nCandidates:\n(A) one (big)\n(B) two\n(C) three\n### Response:\n"
    assert permuted_prompt(prompt, [0, 1, 2]) == prompt
    assert permuted_prompt(prompt, [2, 0, 1]).endswith("Candidates:\n(A) three\n(B) one (big)\n(C) two\n### Response:\n")
    with pytest.raises(UlmrecError, match="candidate block"):
        permuted_prompt(prompt, [0, 1, 2, 3])


@pytest.fixture(scope="module")
def permuted_eval(tmp_path_factory, tiny_pipeline):
    from ulmrec_hf.layout import FOLDERS

    run = tmp_path_factory.mktemp("eval_permutations")
    for stage in (*UP_TO_TASKS, "train"):
        (run / FOLDERS[stage]).symlink_to(tiny_pipeline / FOLDERS[stage])
    run_stage("evaluate", ["--run_dir", str(run), "--eval_permutations", "3", "--uid_only", "false"])
    return run


def test_eval_permutations_one_scores_exactly_as_before(tiny_pipeline):
    """The default (1) scores the stored prompts as shown: the per-user scores are score_prompts' own, bit for bit."""
    model, tokenizer, config = load_ranker(tiny_pipeline / "ranker")
    test = RunDir(tiny_pipeline).eval_set("test")
    per_user = datasets.load_from_disk(str(tiny_pipeline / "eval" / "per_user"))["test"]
    assert np.array_equal(np.array(per_user["scores"], dtype=np.float32), score_prompts(model, tokenizer, test["prompt"], config["letter_token_ids"]))
    assert read_json(tiny_pipeline / "eval" / "metrics.json")["scoring"]["eval_permutations"] == 1


def test_eval_permutations_average_each_items_positions_and_serving_agrees(permuted_eval):
    from ulmrec_hf.recommend import recommend_users

    run = RunDir(permuted_eval)
    model, tokenizer, config = load_ranker(run.ranker)
    test, seed = run.eval_set("test"), run.eval_meta()["eval_seed"]
    per_user = datasets.load_from_disk(str(run.eval_per_user))["test"]
    for n in range(3):
        prompt, user = test[n]["prompt"], test[n]["user_id"]
        orders = [list(range(20))] + [permutation(20, f"{seed}-test-{user}-perm{j}") for j in (1, 2)]
        shown = [log_softmax(score_prompts(model, tokenizer, [permuted_prompt(prompt, o)], config["letter_token_ids"]))[0] for o in orders]
        want = [np.mean([s[o.index(c)] for s, o in zip(shown, orders)]) for c in range(20)]
        np.testing.assert_allclose(per_user[n]["scores"], want, rtol=1e-5, atol=1e-6)
    metrics = read_json(run.eval_metrics_file)
    assert metrics["scoring"]["eval_permutations"] == 3 and set(metrics["scoring"]["seconds"]) == {"validation", "test"}
    assert "over 3 candidate orders" in run.eval_table.read_text()
    users = per_user["user_id"][:2]
    served = recommend_users(str(permuted_eval), [str(u) for u in users], ranker_only=True)  # k from evaluate's record
    for n, ranked in enumerate(served):
        np.testing.assert_allclose(sorted(s for _, _, s in ranked), sorted(per_user[n]["scores"]), rtol=1e-6)


def test_the_swapped_index_row_gives_every_user_another_users_index(tiny_pipeline):
    from ulmrec_hf.evaluate import swapped_index

    run = RunDir(tiny_pipeline)
    data = run.eval_set("test", uid_only=True)
    swapped, unchanged = swapped_index(run, data)
    assert unchanged == 0
    table = run.prepared()["users"]
    name = dict(zip(table["user_id"], table["user"]))
    own = [run.index()[name[u]] for u in data["user_id"]]
    shown = [p.split("User: ")[1].split("\n")[0] for p in swapped["prompt"]]
    assert all(a != b for a, b in zip(own, shown)) and sorted(own) == sorted(shown)
    for before, after, a, b in zip(data["prompt"], swapped["prompt"], own, shown):
        assert after == before.replace(f"User: {a}\n", f"User: {b}\n")
    summary = read_json(run.eval_metrics_file)
    assert {"ranker_uid_only", "ranker_uid_only_swapped_index", "random_order"} <= set(summary["test"])
    assert summary["test"]["ranker_uid_only_swapped_index"]["users_shown_their_own_index"] == 0
    table = datasets.load_from_disk(str(run.eval_per_user))["test"]
    assert {"rank_uid_only_swapped_index", "rank_random_order"} <= set(table.column_names)
    assert sorted(table["rank_random_order"]) != sorted(table["rank_uid_only"])  # a seeded random order, not the model's


def test_candidate_permutations_write_each_row_under_k_orders(tmp_path, tiny_pipeline, copy_stages, tasks_flags):
    run = copy_stages(tiny_pipeline, tmp_path / "run", ("prepare", "retrieve", "preferences", "index"))
    run_stage("tasks", tasks_flags(run, "--candidate_permutations", "3"))
    rows, own = RunDir(run).task("next_item"), RunDir(tiny_pipeline).task("next_item")
    assert len(rows) == 3 * len(own) and RunDir(run).mixture()["candidate_permutations"] == 3
    for n in range(len(own)):
        group = rows.select(range(3 * n, 3 * n + 3))
        assert len({tuple(c) for c in group["candidates"]}) == 3 and len({frozenset(c) for c in group["candidates"]}) == 1
        assert len(set(group["target"])) == 1 and all(r["completion"] == LETTERS[r["candidates"].index(r["target"])] for r in group)
    assert rows.select(range(0, len(rows), 3))["prompt"] == own["prompt"]  # the first order is the row's own
    assert RunDir(run).mixture()["tasks"]["intent"]["rows"] == RunDir(tiny_pipeline).mixture()["tasks"]["intent"]["rows"]
    with pytest.raises(UlmrecError, match="candidate_permutations must be at least 1"):
        run_stage("tasks", tasks_flags(run, "--candidate_permutations", "0", "--overwrite"))
