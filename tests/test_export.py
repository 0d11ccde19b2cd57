import re

import datasets
import numpy as np
import pytest

from ulmrec_hf.common import RunArguments, UlmrecError, read_json
from ulmrec_hf.export import EXPORT_FILE, ExportArguments, main
from ulmrec_hf.ranker import load_ranker, score_prompts


@pytest.fixture(scope="module")
def exported(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    return main(RunArguments(run_dir=str(tiny_pipeline)), ExportArguments(output=str(out), dtype="float32"))


def test_the_export_loads_with_plain_transformers_and_scores_like_the_adapter(tiny_pipeline, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    info, mixture = read_json(exported / EXPORT_FILE), read_json(tiny_pipeline / "tasks" / "mixture.json")
    assert info["letter_token_ids"] == mixture["letter_token_ids"] and info["letters"][:3] == ["A", "B", "C"] and info["dtype"] == "float32"
    tokens = read_json(tiny_pipeline / "user_index" / "tokens.json")
    assert tokenizer.convert_tokens_to_ids(tokens[:3]) == [tokenizer(t, add_special_tokens=False).input_ids[0] for t in tokens[:3]]
    assert model.config.vocab_size == len(tokenizer) and tokenizer.padding_side == "left"
    assert not list(exported.glob("adapter_*"))  # a full model, no adapter
    prompts = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_test"))["prompt"][:8]
    adapter, adapter_tokenizer, config = load_ranker(tiny_pipeline / "ranker")
    expected = score_prompts(adapter, adapter_tokenizer, prompts, config["letter_token_ids"])
    np.testing.assert_allclose(score_prompts(model, tokenizer, prompts, info["letter_token_ids"]), expected, atol=1e-5, rtol=1e-5)
    check = info["validation_check"]
    assert check["users"] == len(datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_validation")))
    assert check["max_abs_score_difference"] < 1e-4 and check["top1_identical"] >= 0.9  # only near-ties can flip
    assert "{instruction}" in info["prompt_template"] and "next_item" in info["instructions"] and info["tie_rule"]


def test_the_export_card_says_what_it_is(tiny_pipeline, exported):
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported / "README.md")
    assert card.data.library_name == "transformers" and "merged" in card.data.tags
    assert "AutoModelForCausalLM.from_pretrained" in card.text and "vllm serve" in card.text
    assert re.search(r"same top-1 as the ranker as trained for [0-9.]+% of them", card.text)


def test_a_qlora_ranker_is_merged_into_bf16_and_the_agreement_recorded(qlora_run, tmp_path):
    out = main(RunArguments(run_dir=str(qlora_run)), ExportArguments(output=str(tmp_path / "export"), check_users=8))
    info = read_json(out / EXPORT_FILE)
    assert info["dtype"] == "bfloat16" and info["trained_as"]["quantization"] == "4bit-nf4"
    assert "4-bit NF4" in info["merge"] and "evaluate --merge_adapter" in info["merge"]
    check = info["validation_check"]
    assert check["users"] == 8 and 0.0 <= check["top1_identical"] <= 1.0 and "as trained" in check["compared_with"]


def test_export_refuses_a_folder_that_is_not_an_export(tiny_pipeline, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UlmrecError, match="holds no earlier export"):
        main(RunArguments(run_dir=str(tiny_pipeline)), ExportArguments(output=str(tmp_path)))
    assert (tmp_path / "notes.txt").exists()


def test_push_uploads_the_export_with_a_card_naming_its_repo(tiny_pipeline, exported):
    from huggingface_hub import ModelCard

    from ulmrec_hf.push import PushArguments
    from ulmrec_hf.push import main as push

    out = push(RunArguments(run_dir=str(tiny_pipeline)), PushArguments(dry_run=True, export_repo="someone/ulmrec-demo-merged",
                                                                      export_dir=str(exported), dataset_repo="someone/ulmrec-demo-data"))
    folder = out / "export"
    assert (folder / "model.safetensors").exists() and (folder / EXPORT_FILE).exists()
    card = ModelCard.load(folder / "README.md")
    assert 'from_pretrained("someone/ulmrec-demo-merged")' in card.text and card.data.datasets == ["someone/ulmrec-demo-data"]
    assert len(card.data.eval_results) == 6
