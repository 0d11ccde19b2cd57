import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import tiny_train_flags
from ulmrec_hf.common import UlmrecError, read_json
from ulmrec_hf.ranker import load_ranker, naive_scores, score_prompts
from ulmrec_hf.tasks import PromptBuilder, TaskArguments, enabled_tasks, letter_ids
from ulmrec_hf.train import add_index_tokens


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_index_tokens_and_letters_are_single_ids(tiny_pipeline, tiny_llm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    tokens = read_json(tiny_pipeline / "user_index" / "tokens.json")
    ids = add_index_tokens(tokenizer, tokens)
    assert len(set(ids)) == len(tokens) and min(ids) >= 49152
    index = datasets.load_from_disk(str(tiny_pipeline / "user_index" / "index"))["index"][0]
    assert len(tokenizer(index, add_special_tokens=False).input_ids) == 3
    prompt = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_test"))[0]["prompt"]
    letters = letter_ids(tokenizer, prompt, 20)
    assert len(set(letters)) == 20
    assert letters == read_json(tiny_pipeline / "tasks" / "mixture.json")["letter_token_ids"]


def test_collated_labels_are_the_completion_and_scoring_ids_match(tiny_pipeline, tiny_llm):
    from ulmrec_hf.cli import make_parser
    from ulmrec_hf.train import build_trainer

    ranker, training_args, model_args = make_parser("train").parse_args_and_config(tiny_train_flags(tiny_pipeline, tiny_llm) + ["--run_dir", str(tiny_pipeline)])
    trainer, _ = build_trainer(ranker, training_args, model_args)
    tokenizer = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    rows = trainer.train_dataset
    for i in range(batch["input_ids"].shape[0]):
        labelled = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert labelled[-1] == tokenizer.eos_token_id
        # the labelled span is exactly the end of the sequence: completion + EOS
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert ids[-len(labelled):] == labelled
    eval_batch = next(iter(trainer.get_eval_dataloader()))
    eval_rows = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_validation"))
    letters = read_json(tiny_pipeline / "tasks" / "mixture.json")["letter_token_ids"]
    for i in range(eval_batch["input_ids"].shape[0]):
        labels = eval_batch["labels"][i]
        first = int(labels[labels != -100][0])
        assert first == letters[eval_rows[i]["target_position"]]  # scoring ids == training-target ids
    assert len(rows) > 0


def test_long_history_drops_oldest_items_never_candidates(tiny_llm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    titles = {i: f"Very long product title number {i} with many extra descriptive words for testing" for i in range(1, 61)}
    args = TaskArguments(max_length=420, history_len=20, title_max_tokens=8)
    builder = PromptBuilder(tokenizer, titles, args)
    cands = list(range(41, 61))
    prompt = builder.prompt("next_item", {"user": "<a_1><b_2>", "candidates": builder.candidate_block(cands)}, builder.history_lines(list(range(1, 41))))
    assert len(tokenizer(prompt).input_ids) + 8 <= 420
    for i, c in enumerate(cands):
        assert f"({chr(65 + i)}) {builder.titles[c]}" in prompt
    assert prompt.endswith("### Response:\n")
    kept = [i for i in range(1, 41) if f"- {builder.titles[i]}\n" in prompt]
    assert kept and kept == list(range(41 - len(kept), 41)) and len(kept) < 20  # newest kept, oldest dropped
    assert all(len(tokenizer(t, add_special_tokens=False).input_ids) <= 8 for t in builder.titles.values())
    with pytest.raises(UlmrecError, match="without any history"):
        PromptBuilder(tokenizer, titles, TaskArguments(max_length=150, title_max_tokens=8)).prompt(
            "next_item", {"candidates": builder.candidate_block(cands)}, builder.history_lines([1, 2]))


def test_rating_task_is_skipped_without_ratings():
    tasks, skipped = enabled_tasks(TaskArguments(), has_ratings=False, has_index=True, has_prefs=True)
    assert "rating" not in tasks and skipped == {"rating": "the data set has no ratings"}
    tasks, skipped = enabled_tasks(TaskArguments(use_intent=False), has_ratings=True, has_index=False, has_prefs=True)
    assert set(skipped) == {"intent", "index_to_preference", "preference_to_index", "history_to_index"}


def test_interleaving_follows_probabilities(tmp_path, tiny_pipeline, tiny_llm):
    from ulmrec_hf.cli import run_stage

    for name in ("data", "retriever", "preferences", "user_index"):
        shutil.copytree(tiny_pipeline / name, tmp_path / name)
    flags = ["--run_dir", str(tmp_path), "--model_name_or_path", tiny_llm, "--max_length", "768", "--history_len", "3",
             "--p_next_item", "0.3", "--p_intent", "0.5", "--p_rating", "0.2", "--use_index_to_preference", "false",
             "--use_preference_to_index", "false", "--use_history_to_index", "false", "--max_eval_users", "10"]
    run_stage("tasks", flags)
    mix = datasets.load_from_disk(str(tmp_path / "tasks" / "train"))["task"]
    for task, p in (("next_item", 0.3), ("intent", 0.5), ("rating", 0.2)):
        assert abs(mix.count(task) / len(mix) - p) < 0.06, (task, mix.count(task) / len(mix))
    assert read_json(tmp_path / "tasks" / "mixture.json")["skipped"]["history_to_index"] == "disabled by the recipe"


def test_eval_seed_fixes_test_users_across_training_seeds(tmp_path, tiny_pipeline, tiny_llm):
    from ulmrec_hf.cli import run_stage

    flags = ["--model_name_or_path", tiny_llm, "--max_length", "768", "--history_len", "3", "--max_eval_users", "40",
             "--max_validation_users", "20", "--max_train_samples", "30", "--eval_seed", "7"]
    made = {}
    for seed in (1, 2):
        run = tmp_path / f"seed{seed}"
        for name in ("data", "retriever", "preferences", "user_index"):
            shutil.copytree(tiny_pipeline / name, run / name)
        run_stage("tasks", ["--run_dir", str(run), "--seed", str(seed), *flags])
        made[seed] = {split: datasets.load_from_disk(str(run / "tasks" / split)) for split in ("train", "next_item_test")}
        meta = read_json(run / "tasks" / "eval_meta.json")
        assert meta["test"]["users"] == 40 and meta["validation"]["users"] == 20 and meta["eval_seed"] == 7
    a, b = made[1]["next_item_test"], made[2]["next_item_test"]
    assert a["user_id"] == b["user_id"] and a["prompt"] == b["prompt"]  # same users, same candidate order
    assert len(made[1]["train"]) <= 30
    users = [set(made[s]["train"]["user_id"]) for s in (1, 2)]
    assert len(users[0]) <= 30 and users[0] != users[1]  # a seeded sample of training users per training seed


def test_save_reload_gives_identical_scores(tiny_pipeline):
    check = read_json(tiny_pipeline / "ranker" / "train_metrics.json")["reload_check"]
    model, tokenizer, config = load_ranker(tiny_pipeline / "ranker")
    again = score_prompts(model, tokenizer, check["prompts"], config["letter_token_ids"])
    np.testing.assert_allclose(again, np.array(check["scores"]), atol=1e-5)


def test_fast_scorer_matches_naive_ranking(tiny_pipeline):
    model, tokenizer, config = load_ranker(tiny_pipeline / "ranker")
    prompts = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_test"))["prompt"][:10]
    fast = score_prompts(model, tokenizer, prompts, config["letter_token_ids"], batch_size=4)
    slow = naive_scores(model, tokenizer, prompts, config["letter_token_ids"])
    np.testing.assert_allclose(fast, slow, atol=1e-4)
    without_prefix = score_prompts(model, tokenizer, prompts, config["letter_token_ids"], batch_size=3, reuse_prefix=False)
    np.testing.assert_allclose(without_prefix, slow, atol=1e-4)
    single = score_prompts(model, tokenizer, prompts[:1], config["letter_token_ids"])  # the "prefix" is all but the last token
    np.testing.assert_allclose(single, slow[:1], atol=1e-4)
    assert (np.argsort(-fast, 1) == np.argsort(-slow, 1)).all()


def test_new_token_rows_are_trained_and_saved(tiny_pipeline):
    metrics = read_json(tiny_pipeline / "ranker" / "train_metrics.json")
    rows = metrics["index_token_rows"]
    assert rows["rows"] == len(read_json(tiny_pipeline / "user_index" / "tokens.json"))
    assert rows["max_abs_change"] > 0 and rows["rows_changed"] > 0
    weights = load_file(str(tiny_pipeline / "ranker" / "adapter_model.safetensors"))
    assert any("trainable_tokens" in k for k in weights)
    assert metrics["untrained"]["untrained_ndcg@10"] >= 0 and "eval_ndcg@10" in metrics["best"]
    card = (tiny_pipeline / "ranker" / "README.md").read_text()
    assert "base_model:" in card and "next_item" in card and "shuffled" in card


def test_qlora_path_runs_on_cpu(tmp_path, tiny_pipeline, tiny_llm):
    pytest.importorskip("bitsandbytes")
    from ulmrec_hf.cli import run_stage

    for name in ("data", "retriever", "preferences", "user_index", "tasks"):
        shutil.copytree(tiny_pipeline / name, tmp_path / name)
    run_stage("train", tiny_train_flags(tmp_path, tiny_llm) + ["--quantization", "4bit", "--max_steps", "2", "--eval_before_training", "false"])
    config = read_json(tmp_path / "ranker" / "ranker_config.json")
    assert config["quantization"] == "4bit-nf4"
    lora_b = [v for k, v in load_file(str(tmp_path / "ranker" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)  # LoRA B starts at 0: non-zero means real gradients


@pytest.mark.slow
def test_two_process_ddp_training(tmp_path, tiny_pipeline, tiny_llm):
    for name in ("data", "retriever", "preferences", "user_index", "tasks"):
        shutil.copytree(tiny_pipeline / name, tmp_path / name)
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--main_process_port", str(free_port()),
           "--dynamo_backend", "no", "-m", "ulmrec_hf.cli", "train", *tiny_train_flags(tmp_path, tiny_llm), "--eval_before_training", "false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_json(tmp_path / "ranker" / "train_metrics.json")
    assert set(metrics["best"]) >= {"eval_ndcg@10", "eval_recall@10", "eval_mrr@10"}
    assert metrics["world_size"] == 2


def test_lora_last_layers_limits_the_adapter(tiny_llm):
    from peft import get_peft_model
    from trl import ModelConfig

    from ulmrec_hf.llm import load_tokenizer
    from ulmrec_hf.train import RankerArguments, build_model

    tokenizer = load_tokenizer(tiny_llm)
    args = ModelConfig(model_name_or_path=tiny_llm, lora_target_modules=["q_proj", "v_proj"])
    model, peft_config, _, _ = build_model(args, RankerArguments(quantization="none", lora_last_layers=1), tokenizer, [], cpu=True)
    names = [n for n, p in get_peft_model(model, peft_config).named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)  # the tiny model has 2 layers
    with pytest.raises(UlmrecError, match="lora_last_layers"):
        build_model(args, RankerArguments(quantization="none", lora_last_layers=3), tokenizer, [], cpu=True)
