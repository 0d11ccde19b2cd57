import shutil

import datasets
import numpy as np
import pytest
import torch

from ulmrec_hf.common import UlmrecError, read_json
from ulmrec_hf.ranker import compute_metrics, length_batches, load_ranker, naive_scores, score_prompts


def test_checkpoint_selection_ranks_a_tied_gold_by_the_documented_rule():
    from transformers import EvalPrediction

    scores = np.array([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 1.0, 0.0], [0.7, 0.7, 0.7, 0.7]])
    metrics = compute_metrics(EvalPrediction(predictions=scores, label_ids=np.array([2, 3, 2, 3])))
    assert metrics["mrr@10"] == pytest.approx((1 / 2 + 1 / 4 + 1 + 1 / 4) / 4)  # the tied gold shown last ranks 4th, not 1st
    assert metrics["tied_gold_users"] == 1


def test_bf16_model_gives_float32_letter_scores_without_collapsed_ties(tiny_llm):
    """The letter logits of a bf16 model: float32 products keep apart what float32 logits keep apart; a bf16 product
    (the old way) collapses them onto a few values."""
    from ulmrec_hf.llm import load_tokenizer
    from ulmrec_hf.ranker import last_hidden, letter_rows, load_base
    from ulmrec_hf.prompts import letter_ids

    tokenizer = load_tokenizer(tiny_llm)
    tokenizer.padding_side = "left"
    prompts = [f"### Instruction:\nPick one.\n### Input:\nCandidates: item {i}\n### Response:\n" for i in range(6)]
    ids = letter_ids(tokenizer, prompts[0], 20)
    fp32 = score_prompts(load_base(tiny_llm, "none", "float32", "cpu", len(tokenizer)), tokenizer, prompts, ids)
    bf16_model = load_base(tiny_llm, "none", "bfloat16", "cpu", len(tokenizer))
    bf16 = score_prompts(bf16_model, tokenizer, prompts, ids)
    assert bf16.dtype == np.float32
    distinct = lambda a: [len(set(row.tolist())) for row in a]  # noqa: E731
    assert distinct(fp32) == [20] * len(prompts) and distinct(bf16) == distinct(fp32)
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        bf16_rows = letter_rows(bf16_model, ids).to(torch.bfloat16)
        old = torch.nn.functional.linear(last_hidden(bf16_model, enc.input_ids, enc.attention_mask), bf16_rows).float().numpy()
    assert min(distinct(old)) < 20  # what the float32 rule prevents


def test_length_batches_cap_rows_and_padded_tokens():
    lengths = [10, 50, 30, 50, 20, 40]
    assert length_batches(lengths, 2) == [[3, 1], [5, 2], [4, 0]]  # longest first; equal lengths keep a stable order
    batches = length_batches(lengths, 8, max_batch_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len(b) * lengths[b[0]] <= 100 for b in batches)


def test_fast_scorer_matches_naive_ranking(tiny_pipeline):
    model, tokenizer, config = load_ranker(tiny_pipeline / "ranker")
    prompts = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_test"))["prompt"][:10]
    slow = naive_scores(model, tokenizer, prompts, config["letter_token_ids"])
    for kwargs in ({"batch_size": 4}, {"batch_size": 3, "reuse_prefix": True}, {"batch_size": 8, "max_batch_tokens": 1200}):
        np.testing.assert_allclose(score_prompts(model, tokenizer, prompts, config["letter_token_ids"], **kwargs), slow, atol=1e-4)
    single = score_prompts(model, tokenizer, prompts[:1], config["letter_token_ids"], reuse_prefix=True)  # prefix = all but the last token
    np.testing.assert_allclose(single, slow[:1], atol=1e-4)


def test_save_reload_gives_identical_scores(tiny_pipeline):
    check = read_json(tiny_pipeline / "ranker" / "train_metrics.json")["reload_check"]
    model, tokenizer, config = load_ranker(tiny_pipeline / "ranker")
    np.testing.assert_array_equal(score_prompts(model, tokenizer, check["prompts"], config["letter_token_ids"]),
                                  np.array(check["scores"], dtype=np.float32))


def test_save_reload_gives_identical_scores_on_the_4bit_path(qlora_run):
    check = read_json(qlora_run / "ranker" / "train_metrics.json")["reload_check"]
    model, tokenizer, config = load_ranker(qlora_run / "ranker")
    assert config["loaded_as"] == "as trained (4bit-nf4, bfloat16)"
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    np.testing.assert_array_equal(score_prompts(model, tokenizer, check["prompts"], config["letter_token_ids"]),
                                  np.array(check["scores"], dtype=np.float32))


def test_ranker_folders_written_before_small_adapters_still_load(tmp_path, tiny_pipeline):
    """ulmrec-hf 0.1 saved the resized embedding in the adapter; such folders load and score the same."""
    model, tokenizer, config = load_ranker(tiny_pipeline / "ranker")
    old = tmp_path / "old_ranker"
    shutil.copytree(tiny_pipeline / "ranker", old, ignore=shutil.ignore_patterns("checkpoints"))
    model.save_pretrained(old, save_embedding_layers=True)
    from safetensors.torch import load_file

    assert any(v.shape[0] == len(tokenizer) for v in load_file(str(old / "adapter_model.safetensors")).values())
    again, _, _ = load_ranker(old)
    prompts = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_test"))["prompt"][:4]
    np.testing.assert_array_equal(score_prompts(again, tokenizer, prompts, config["letter_token_ids"]),
                                  score_prompts(model, tokenizer, prompts, config["letter_token_ids"]))


def test_not_a_ranker_is_a_clear_error(tmp_path):
    with pytest.raises(UlmrecError, match="not a trained ranker"):
        load_ranker(tmp_path)


def test_zero_shot_rows_equal_a_fresh_resize(tiny_pipeline, tiny_llm):
    from transformers import AutoModelForCausalLM

    from ulmrec_hf.prompts import resize_embeddings
    from ulmrec_hf.ranker import load_zero_shot

    tokens = read_json(tiny_pipeline / "user_index" / "tokens.json")
    model, tokenizer, _ = load_zero_shot(tiny_llm, tokens, [0], device="cpu")
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llm)
    resize_embeddings(fresh, len(tokenizer))
    assert torch.equal(model.get_input_embeddings().weight, fresh.get_input_embeddings().weight)
