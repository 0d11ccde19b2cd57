"""The letter verbalizer: scores of the candidate letters at the answer position (paper §4.3).

`score_prompts` is the serving path: users batched with left padding (sorted by length), one forward
through the decoder only, the last position only, and a projection onto just the letter rows of the
LM head. `naive_scores` is LlamaRec's way (batch 1, full-vocabulary logits everywhere) for comparison.
"""

import logging
from pathlib import Path

import numpy as np

from .common import UlmrecError, read_json

logger = logging.getLogger(__name__)


def base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def letter_rows(model, letter_ids: list[int]):
    """The LM-head rows of the answer letters (letters are never added tokens, so base rows are exact)."""
    head = base_model(model).get_output_embeddings()
    layer = getattr(head, "base_layer", head)
    weight = layer.weight
    if weight.dim() != 2 or weight.shape[0] < max(letter_ids) + 1:  # e.g. a 4-bit packed head
        return None
    return weight[letter_ids]


def last_hidden(model, input_ids, attention_mask):
    """Final-norm hidden state at the last position of each left-padded row."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    decoder = base_model(model).get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    return out.last_hidden_state[:, -1]


def score_batch(model, input_ids, attention_mask, letter_ids: list[int]):
    import torch

    rows = letter_rows(model, letter_ids)
    if rows is None:  # fall back to the full head at the last position only
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, logits_to_keep=1).logits[:, -1]
        return logits[:, letter_ids].float()
    hidden = last_hidden(model, input_ids, attention_mask)
    return torch.nn.functional.linear(hidden.to(rows.dtype), rows).float()


def score_prompts(model, tokenizer, prompts: list[str], letter_ids: list[int], batch_size: int = 8, progress: str | None = None) -> np.ndarray:
    """(n_prompts, n_letters) verbalizer scores, batched by length with left padding."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    prompts = list(prompts)
    lengths = [len(ids) for ids in tokenizer(prompts).input_ids]
    order = np.argsort(lengths, kind="stable")[::-1]
    out = np.zeros((len(prompts), len(letter_ids)), dtype=np.float32)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(prompts), batch_size), desc=progress, disable=progress is None, leave=False):
                idx = order[start:start + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
                out[idx] = score_batch(model, enc["input_ids"], enc["attention_mask"], letter_ids).cpu().numpy()
    finally:
        tokenizer.padding_side = side
    return out


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


def ranks_from_scores(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """1-based rank of the gold column in each row (ties counted pessimistically)."""
    gold_scores = scores[np.arange(len(gold)), gold]
    return 1 + (scores > gold_scores[:, None]).sum(1)


def compute_metrics(eval_pred) -> dict:
    from .metrics import metrics_from_ranks

    scores, gold = eval_pred.predictions, eval_pred.label_ids
    return metrics_from_ranks(ranks_from_scores(np.asarray(scores), np.asarray(gold).astype(int)).tolist(), ks=(1, 5, 10))


def load_ranker(ranker_dir: Path, device: str | None = None):
    """(model, tokenizer, config) of a trained ranker folder (PEFT adapter + tokenizer + ranker_config.json)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .llm import load_causal_lm

    ranker_dir = Path(ranker_dir)
    if not (ranker_dir / "ranker_config.json").exists():
        raise UlmrecError(f"{ranker_dir}: not a trained ranker (no ranker_config.json); run `ulmrec train` first")
    config = read_json(ranker_dir / "ranker_config.json")
    tokenizer = AutoTokenizer.from_pretrained(ranker_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = load_causal_lm(config["base_model"], dtype=config.get("dtype", "float32"), device=device)
    base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, ranker_dir).to(device).eval()
    return model, tokenizer, config
