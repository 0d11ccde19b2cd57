import datasets
import numpy as np
import pytest

from ulmrec_hf.common import RunArguments, UlmrecError, read_json
from ulmrec_hf.push import PushArguments, main
from ulmrec_hf.ranker import load_ranker, score_prompts


def test_push_dry_run_folders_reload(tiny_pipeline, capsys):
    from huggingface_hub import DatasetCard, ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ulmrec_hf.prompts import resize_embeddings

    out = main(RunArguments(run_dir=str(tiny_pipeline)), PushArguments(dry_run=True))
    model_dir, data_dir = out / "model", out / "dataset"
    size = (model_dir / "adapter_model.safetensors").stat().st_size
    assert f"adapter {size / 1e6:.2f} MB" in capsys.readouterr().out
    config = read_json(model_dir / "ranker_config.json")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(config["base_model"])
    resize_embeddings(base, len(tokenizer))
    model = PeftModel.from_pretrained(base, model_dir).eval()  # plain PEFT, from the pushed folder alone
    prompts = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_test"))["prompt"][:4]
    reference, ref_tok, _ = load_ranker(tiny_pipeline / "ranker")
    np.testing.assert_allclose(score_prompts(model, tokenizer, prompts, config["letter_token_ids"]),
                               score_prompts(reference, ref_tok, prompts, config["letter_token_ids"]), atol=1e-6)
    card = ModelCard.load(model_dir / "README.md")
    assert card.data.base_model == config["base_model"] and card.data.library_name == "peft"
    dataset_card = DatasetCard.load(data_dir / "README.md")
    assert {c["config_name"] for c in dataset_card.data.configs} == {"users", "items", "user_index", "preferences"}
    assert "## User index" in dataset_card.text and "## Preferences" in dataset_card.text
    assert len(datasets.load_dataset(str(data_dir), "users", split="train")) == 200
    assert len(datasets.load_dataset(str(data_dir), "user_index", split="train")) == 200
    assert len(datasets.load_dataset(str(data_dir), "preferences", split="train")) == 200
    assert (data_dir / "user_index" / "rqvae" / "config.json").exists()


def test_push_without_token_is_one_clear_error(tiny_pipeline, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UlmrecError, match="no Hugging Face token"):
        main(RunArguments(run_dir=str(tiny_pipeline)), PushArguments(model_repo="someone/ulmrec-test"))
