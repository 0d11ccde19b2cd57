"""The letter verbalizer: scores of the candidate letters at the answer position (paper §4.3), and loading rankers.

`score_prompts` is the serving path: prompts sorted by length and batched with left padding, one forward through the
decoder only, the last position only, and a projection onto just the letter rows of the LM head. `naive_scores` is
LlamaRec's way (batch 1, full-vocabulary logits everywhere), kept to check the fast path against.

`load_base` is the one way a ranker's base is loaded, for training (`train.build_model`) and for scoring
(`load_ranker`): the quantisation config, dtype, attention implementation, device placement and the deterministic
resize for the index tokens. `load_ranker` rebuilds the model exactly as it was trained and selected: the same base
precision (4-bit NF4 with double quantisation when the adapter was trained with QLoRA, as `ranker_config.json`
records), then the adapter. Merging into a bf16 base is an explicit option (`merge=True`).
"""

import logging
from pathlib import Path

import numpy as np

from .common import UlmrecError, left_pad
from .layout import RankerFolder

logger = logging.getLogger(__name__)


def base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def letter_rows(model, letter_ids: list[int]):
    """The LM-head rows of the answer letters in float32 (letters are never added tokens, so base rows are exact); a
    bitsandbytes 4-bit head is dequantised first."""
    head = base_model(model).get_output_embeddings()
    weight = getattr(head, "base_layer", head).weight
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes as bnb

        weight = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if weight.dim() != 2 or weight.shape[0] < max(letter_ids) + 1:
        raise UlmrecError(f"the LM head of {type(base_model(model)).__name__} has no row per token (shape {tuple(weight.shape)}); "
                          "the verbalizer needs the answer letters' rows")
    return weight[letter_ids].float()


def last_hidden(model, input_ids, attention_mask, prefix=None):
    """Final-norm hidden state at the last position of each left-padded row.

    `prefix` = (cache, length): the key/values of a token prefix shared by every row, computed once. The decoder then
    keeps the whole batch's key/values in that cache until the batch ends, which costs memory on long prompts."""
    import copy

    import torch

    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    decoder = base_model(model).get_decoder()
    kwargs = {"use_cache": False}
    if prefix is not None:
        cache, length = copy.deepcopy(prefix[0]), prefix[1]
        cache.batch_repeat_interleave(input_ids.shape[0])
        attention_mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], length), attention_mask], 1)
        kwargs = {"use_cache": True, cache_argument(decoder): cache}
        positions = positions + length
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **kwargs)
    return out.last_hidden_state[:, -1]


def cache_argument(decoder) -> str:
    """transformers >= 5.2x calls the KV cache `cache`; earlier 5.x releases `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def score_batch(model, input_ids, attention_mask, letter_ids: list[int], prefix=None):
    """(rows, letters) float32 letter logits: the final hidden state and the head's letter rows are both taken to
    float32 before the product, whatever the model's dtype (in bf16, 20 letter logits collapse onto a few values)."""
    import torch

    rows = letter_rows(model, letter_ids)
    hidden = last_hidden(model, input_ids, attention_mask, prefix)
    return torch.nn.functional.linear(hidden.float(), rows)


def shared_prefix(model, token_lists: list[list[int]], min_tokens: int = 8):
    """(cache, length) of the longest token prefix all prompts share (the instruction header), or None when short."""
    import torch

    first, length = token_lists[0], min(len(t) for t in token_lists) - 1
    for ids in token_lists[1:]:
        length = next((i for i in range(length) if ids[i] != first[i]), length)
    if length < min_tokens:
        return None
    device = next(model.parameters()).device
    out = base_model(model).get_decoder()(input_ids=torch.tensor([first[:length]], device=device), use_cache=True)
    return (out.cache if hasattr(out, "cache") else out.past_key_values), length


def length_batches(lengths: list[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices longest first, in batches of at most `batch_size` rows and (when set) `max_batch_tokens` padded tokens."""
    order = np.argsort(lengths, kind="stable")[::-1].tolist()
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) == batch_size or (max_batch_tokens and (len(current) + 1) * width > max_batch_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def score_prompts(model, tokenizer, prompts: list[str], letter_ids: list[int], batch_size: int = 8, progress: str | None = None,
                  reuse_prefix: bool = False, max_batch_tokens: int | None = None) -> np.ndarray:
    """(n_prompts, n_letters) verbalizer scores, batched by length with left padding."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    token_lists = tokenizer(list(prompts)).input_ids
    out = np.zeros((len(token_lists), len(letter_ids)), dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        prefix = shared_prefix(model, token_lists) if reuse_prefix and token_lists else None
        skip = prefix[1] if prefix else 0
        batches = length_batches([len(t) for t in token_lists], batch_size, max_batch_tokens)
        for idx in tqdm(batches, desc=progress, disable=progress is None, leave=False):
            ids, mask = left_pad([token_lists[i][skip:] for i in idx], tokenizer.pad_token_id, device)
            out[idx] = score_batch(model, ids, mask, letter_ids, prefix).cpu().numpy()
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (a candidate's letter log-probability among the letters)."""
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def check_permutations(k: int) -> None:
    if k < 1:
        raise UlmrecError(f"eval_permutations must be at least 1 (1: the protocol's order alone), got {k}")


def permutation_average(first: np.ndarray, prompts: list[str], keys: list[str], k: int, score) -> np.ndarray:
    """Scores over k candidate orders (permutation self-consistency): `first` holds the letter logits of the prompts as
    shown; order j >= 1 of row r is `permutation(n, f"{keys[r]}-perm{j}")`, scored by `score(prompts, j)`. Each
    candidate's score is the mean of its letter log-probabilities (log-softmax over the letters) over the k orders,
    float32. k = 1 returns `first` unchanged."""
    from .prompts import permuted_prompt, permutation

    check_permutations(k)
    if k == 1:
        return first
    n = first.shape[1]
    total = log_softmax(first)
    for j in range(1, k):
        orders = [permutation(n, f"{key}-perm{j}") for key in keys]
        shown = log_softmax(score([permuted_prompt(p, o) for p, o in zip(prompts, orders)], j))
        for row, order in enumerate(orders):
            total[row, order] += shown[row]  # position i showed candidate order[i]
    return (total / k).astype(np.float32)


def naive_scores(model, tokenizer, prompts: list[str], letter_ids: list[int]) -> np.ndarray:
    """LlamaRec's scoring: one user at a time, full-vocabulary logits at every position, last row."""
    import torch

    device = next(model.parameters()).device
    out = np.zeros((len(prompts), len(letter_ids)), dtype=np.float32)
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            enc = tokenizer(prompt, return_tensors="pt").to(device)
            logits = model(**enc).logits
            out[i] = logits[0, -1, letter_ids].float().cpu().numpy()
    return out


def compute_metrics(eval_pred) -> dict:
    """Validation metrics for checkpoint selection, under the one tie rule (`metrics.TIE_RULE`)."""
    from .metrics import score_metrics

    out = score_metrics(eval_pred.predictions, eval_pred.label_ids, ks=(1, 5, 10))
    return {**out["rank"], "tied_gold_users": out["tied_gold_users"]}


def disable_cpu_repack(model) -> None:
    """bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights at eval and silently zeroes LoRA gradients; scoring must
    run the same kernels as training's validation did, so loading disables it too."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


QUANT_TYPES = ("nf4", "fp4")


def quantization_name(load_in_4bit: bool, quant_type: str = "nf4") -> str:
    """How `ranker_config.json` names a base's precision: `none` or `4bit-<type>` (QLoRA: `4bit-nf4`)."""
    return f"4bit-{quant_type}" if load_in_4bit else "none"


def quantization_config(quantization: str, dtype: str, nested: bool = True, storage: str | None = None):
    """The BitsAndBytesConfig of a ranker's base (None for a full-precision one); `storage` is the dtype that holds the
    packed 4-bit weights (FSDP needs the model's dtype there; bitsandbytes' default is uint8)."""
    if quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    kind = quantization.removeprefix("4bit-")
    if not quantization.startswith("4bit-") or kind not in QUANT_TYPES:
        raise UlmrecError(f"unknown ranker quantization {quantization!r} (known: none, " + ", ".join(f"4bit-{t}" for t in QUANT_TYPES) + ")")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=nested,
                              bnb_4bit_compute_dtype=getattr(torch, dtype), **({"bnb_4bit_quant_storage": storage} if storage else {}))


def load_base(name: str, quantization: str, dtype: str, device, vocab_size: int, nested: bool = True, storage: str | None = None,
              revision: str | None = None, attn_implementation: str | None = None):
    """A ranker's base, for training and for scoring alike: its precision, attention implementation and index-token rows
    (rebuilt deterministically).

    `device`: where the weights go (a 4-bit base is loaded there); None leaves a full-precision base where
    `from_pretrained` puts it, for the Trainer to place."""
    from .llm import load_causal_lm
    from .prompts import resize_embeddings

    quant = quantization_config(quantization, dtype, nested, storage)
    placement = {"quantization_config": quant, "device_map": {"": device if device is not None else "cpu"}} if quant else {"device": device}
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}  # else transformers' default
    base = load_causal_lm(name, dtype=dtype, revision=revision or "main", **attention, **placement)
    resize_embeddings(base, vocab_size)
    disable_cpu_repack(base)
    return base


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_ranker(ranker_dir: Path, device: str | None = None, merge: bool = False, merge_dtype: str = "bfloat16"):
    """(model, tokenizer, config) of a trained ranker folder (PEFT adapter + tokenizer + ranker_config.json).

    `merge=True` loads the base in `merge_dtype` (bf16 by default, whatever it was trained on) and merges the adapter
    (LoRA and index-token rows) into it: faster on GPUs, but a different model from the one validation selected when
    training used 4-bit; `evaluate --merge_adapter` and `export` record how far the two agree."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    ranker_dir, files = Path(ranker_dir), RankerFolder(ranker_dir)
    if not files.is_ranker():
        raise UlmrecError(f"{ranker_dir}: not a trained ranker (no {files.config.name}); run `ulmrec train` first")
    config = files.read_config()
    tokenizer = AutoTokenizer.from_pretrained(ranker_dir)
    tokenizer.padding_side = "left"
    device = device or default_device()
    quantization, dtype = ("none", merge_dtype) if merge else (config.get("quantization", "none"), config.get("dtype", "float32"))
    base = load_base(config["base_model"], quantization, dtype, device, len(tokenizer), config.get("double_quantization", True),
                     None if merge else config.get("quant_storage"), config.get("model_revision"), scoring_attention(config, device))
    text_init(base, files)
    model = PeftModel.from_pretrained(base, ranker_dir)
    if merge:
        model = model.merge_and_unload()
    config = {**config, "loaded_as": f"merged-{dtype}" if merge else f"as trained ({quantization}, {dtype})"}
    return model.eval(), tokenizer, config


def text_init(base, files: RankerFolder) -> None:
    """The index tokens' first rows when training took them from text (`index_token_init: text`), as it saved them."""
    if files.index_token_init.exists():
        from safetensors.torch import load_file

        from .prompts import set_rows

        saved = load_file(str(files.index_token_init))
        set_rows(base, saved["token_ids"].tolist(), saved["rows"])


def scoring_attention(config: dict, device) -> str | None:
    """The attention a ranker was trained with, unless it cannot run here (flash attention off CUDA or not installed):
    then transformers' default, which computes the same attention."""
    import importlib.util

    recorded = config.get("attn_implementation")
    if recorded and recorded.startswith("flash_attention") and (not str(device).startswith("cuda") or importlib.util.find_spec("flash_attn") is None):
        logger.info("ranker trained with %s, which cannot run on %s; scoring with transformers' default attention", recorded, device)
        return None
    return recorded


def load_zero_shot(name: str, index_tokens: list[str], letter_token_ids: list[int], dtype: str = "float32", device: str | None = None):
    """(model, tokenizer, config) of a base LLM without any adapter: the zero-shot verbalizer.

    Index tokens, if the prompts have them, are added with the same untrained rows a ranker starts from."""
    from .llm import load_tokenizer
    from .prompts import add_index_tokens

    tokenizer = load_tokenizer(name)
    if index_tokens:
        add_index_tokens(tokenizer, index_tokens)
    model = load_base(name, "none", dtype, device or default_device(), len(tokenizer))
    config = {"base_model": name, "dtype": dtype, "quantization": "none", "letter_token_ids": letter_token_ids,
              "ranker": "zero-shot (no adapter)", "loaded_as": f"base model ({dtype})"}
    return model.eval(), tokenizer, config
