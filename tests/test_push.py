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
    assert card.data.base_model is None and card.data.base_model_local == config["base_model"] and card.data.library_name == "peft"
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


def test_the_card_names_the_repos_and_carries_the_test_results(tiny_pipeline):
    """What ModelCard.validate checks on the Hub (it needs the network), checked locally: the metadata parses back
    through huggingface_hub's own model-index parser, ids are valid repo ids, and the numbers are evaluate's."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    out = main(RunArguments(run_dir=str(tiny_pipeline)), PushArguments(dry_run=True, model_repo="someone/ulmrec-demo",
                                                                      dataset_repo="someone/ulmrec-demo-data"))
    card = ModelCard.load(out / "model" / "README.md")
    data = card.data.to_dict()
    assert data["datasets"] == ["someone/ulmrec-demo-data"] and "base_model" not in data
    assert 'snapshot_download("someone/ulmrec-demo")' in card.text and "(https://huggingface.co/datasets/someone/ulmrec-demo-data)" in card.text
    name, results = model_index_to_eval_results(data["model-index"])
    test = read_json(tiny_pipeline / "eval" / "metrics.json")["test"]["ranker"]
    assert name == "ulmrec-demo" and {(r.metric_config, r.metric_type): r.metric_value for r in results} == {
        (part, f"{m}@10"): round(test[part][f"{m}@10"], 4) for part in ("rank", "overall") for m in ("ndcg", "recall", "mrr")}
    assert all(r.dataset_split == "test" and r.dataset_type == "someone/ulmrec-demo-data" and r.task_type == "text-ranking" for r in results)
    assert ModelCard(str(card)).data.to_dict() == data  # a round trip through the YAML parser changes nothing
    assert "## Test" in card.text and "this ranker" in card.text


def test_base_model_is_a_hub_id_or_recorded_as_a_local_path(tmp_path):
    from huggingface_hub.utils import validate_repo_id

    from ulmrec_hf.cards import base_model_fields

    alias, note = base_model_fields("smollm2")
    assert alias == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"} and "GGUF" in note
    validate_repo_id(alias["base_model"])
    assert base_model_fields("meta-llama/Llama-2-7b-hf") == ({"base_model": "meta-llama/Llama-2-7b-hf"}, None)
    cached = tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    assert base_model_fields(str(cached))[0] == {"base_model": "meta-llama/Llama-2-7b-hf"}
    local, note = base_model_fields(str(tmp_path))
    assert local == {"base_model_local": str(tmp_path)} and "cannot link" in note
