import datasets
import pytest
import torch

from ulmrec_hf.common import UlmrecError, read_json
from ulmrec_hf.llm import load_tokenizer
from ulmrec_hf.prompts import PromptBuilder, add_index_tokens, letter_ids, resize_embeddings, tokenizer_fingerprint


def test_long_history_drops_oldest_items_never_candidates(tiny_llm):
    tokenizer = load_tokenizer(tiny_llm)
    titles = {i: f"Very long product title number {i} with many extra descriptive words for testing" for i in range(1, 61)}
    builder = PromptBuilder(tokenizer, titles, max_length=420, history_len=20, title_max_tokens=8)
    cands = list(range(41, 61))
    prompt = builder.prompt("next_item", {"user": "<a_1><b_2>", "candidates": builder.candidate_block(cands)}, builder.history_lines(list(range(1, 41))))
    assert len(tokenizer(prompt).input_ids) + 8 <= 420
    for i, c in enumerate(cands):
        assert f"({chr(65 + i)}) {builder.titles[c]}" in prompt
    assert prompt.endswith("### Response:\n")
    kept = [i for i in range(1, 41) if f"- {builder.titles[i]}\n" in prompt]
    assert kept and kept == list(range(41 - len(kept), 41)) and len(kept) < 20  # the newest kept, the oldest dropped
    budget_left = 420 - 8 - len(tokenizer(prompt).input_ids)
    assert budget_left < builder.count(f"- {builder.titles[41 - len(kept) - 1]}") + 2  # as many as fit, not fewer
    assert all(len(tokenizer(t, add_special_tokens=False).input_ids) <= 8 for t in builder.titles.values())
    with pytest.raises(UlmrecError, match="without any history"):
        PromptBuilder(tokenizer, titles, max_length=150, history_len=20, title_max_tokens=8).prompt(
            "next_item", {"candidates": builder.candidate_block(cands)}, builder.history_lines([1, 2]))


def test_index_tokens_and_letters_are_single_ids(tiny_pipeline, tiny_llm):
    tokenizer = load_tokenizer(tiny_llm)
    base = tokenizer_fingerprint(tokenizer)
    tokens = read_json(tiny_pipeline / "user_index" / "tokens.json")
    ids = add_index_tokens(tokenizer, tokens)
    assert len(set(ids)) == len(tokens) and min(ids) >= 49152 and tokenizer_fingerprint(tokenizer) != base
    index = datasets.load_from_disk(str(tiny_pipeline / "user_index" / "index"))["index"][0]
    assert len(tokenizer(index, add_special_tokens=False).input_ids) == 3
    prompt = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_test"))[0]["prompt"]
    letters = letter_ids(tokenizer, prompt, 20)
    assert len(set(letters)) == 20
    assert letters == read_json(tiny_pipeline / "tasks" / "mixture.json")["letter_token_ids"]


@pytest.mark.parametrize("tied", [True, False])
def test_resized_rows_are_the_same_every_time(tied, tiny_llm, tiny_llm_untied):
    from transformers import AutoModelForCausalLM

    path = tiny_llm if tied else tiny_llm_untied
    models = [AutoModelForCausalLM.from_pretrained(path) for _ in range(2)]
    old = models[0].get_input_embeddings().weight.shape[0]
    for m in models:
        resize_embeddings(m, old + 48)
    a, b = (m.get_input_embeddings().weight for m in models)
    assert torch.equal(a, b) and a.shape[0] == old + 48
    assert not torch.equal(a[old], a[old + 1])  # distinct rows, not one repeated vector
    heads = [m.get_output_embeddings().weight for m in models]
    assert torch.equal(heads[0], heads[1]) and heads[0].shape[0] == old + 48
    assert (heads[0].data_ptr() == a.data_ptr()) == tied
