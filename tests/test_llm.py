from ulmrec_hf.llm import cache_root, load_tokenizer, resolve_model_path


def test_hub_ids_and_paths_pass_through(tmp_path):
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_the_smollm2_alias_is_a_cached_plain_checkpoint(monkeypatch, tmp_path):
    path = resolve_model_path("smollm2")
    assert path.startswith(str(cache_root())) and path.endswith("smollm2-135m-instruct")
    tokenizer = load_tokenizer("SmolLM2")
    assert len(tokenizer) == 49152 and tokenizer.padding_side == "left" and tokenizer.pad_token is not None
