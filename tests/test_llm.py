from ulmrec_hf.llm import cache_root, load_tokenizer, resolve_model_path


def test_hub_ids_and_paths_pass_through(tmp_path):
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_the_smollm2_alias_is_a_cached_plain_checkpoint(monkeypatch, tmp_path):
    """Converted once into the ulmrec cache (here a temporary one: the test writes nothing under ~/.cache)."""
    monkeypatch.setenv("ULMREC_CACHE", str(tmp_path / "ulmrec"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path = resolve_model_path("smollm2")
    assert cache_root() == tmp_path / "ulmrec" and path.startswith(str(tmp_path / "ulmrec")) and path.endswith("smollm2-135m-instruct")
    tokenizer = load_tokenizer("SmolLM2")
    assert len(tokenizer) == 49152 and tokenizer.padding_side == "left" and tokenizer.pad_token is not None


def test_a_tokenizer_that_loads_empty_is_an_error(tmp_path):
    import pytest
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from ulmrec_hf.common import UlmrecError

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab={}, unk_token="<unk>"))).save_pretrained(tmp_path)
    with pytest.raises(UlmrecError, match=f"{tmp_path}: the tokenizer loaded with 0 tokens"):
        load_tokenizer(str(tmp_path))


def test_a_sentencepiece_tokenizer_model_loads(tmp_path):
    """A Llama-style folder with only `tokenizer.model` (SentencePiece) loads with its vocabulary (sentencepiece and
    protobuf are dependencies)."""
    import itertools
    import json

    import sentencepiece as spm

    syllables = ["ka", "lo", "mi", "re", "su", "ta", "ne", "po", "vi", "du", "ge", "zo"]
    words = ["".join(p) for p in itertools.product(syllables, repeat=3)]
    (tmp_path / "text.txt").write_text("\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 5)))
    folder = tmp_path / "llama"
    folder.mkdir()
    spm.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=200,
                                   bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tokenizer = load_tokenizer(str(folder))
    assert len(tokenizer) == 200 and tokenizer.decode(tokenizer("kalomi suta", add_special_tokens=False).input_ids) == "kalomi suta"
