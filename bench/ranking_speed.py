"""Ranking and training speed of SmolLM2-135M on CPU, candidates side by side in one run.

Scoring: LlamaRec's naive scorer (batch 1, full-vocabulary logits at every position) against ours
(length-sorted batches with left padding, decoder only, last position only, the 20 letter rows only),
on the same prompts; rankings must be identical. bf16 is reported separately with its rank agreement.
Training: samples/s of a LoRA step with the full-vocabulary loss against logits at answer positions only.
Prompts: real Beauty titles, 20 history items and 20 candidates (the paper's shape).
Writes bench/results/ranking_speed.json.
"""

import json
import random
import string
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEAUTY = ROOT.parent / "shared" / "data" / "amazon-beauty-ulmrec" / "dataset.json"
N_USERS, BATCH = 32, 8


def prompts_and_letters(tokenizer, n: int):
    from ulmrec_hf.prompts import PromptBuilder, letter_ids

    if BEAUTY.exists():
        meta = json.loads(BEAUTY.read_text())["meta"]
        titles = {int(k): v for k, v in meta.items() if v}
    else:
        titles = {i: f"Product {i} " + " ".join(random.Random(i).choices(string.ascii_lowercase, k=12)) for i in range(1, 2000)}
    builder = PromptBuilder(tokenizer, titles, max_length=2048, history_len=20, title_max_tokens=32)
    rng, ids = random.Random(0), sorted(titles)
    prompts = []
    for u in range(n):
        items = rng.sample(ids, 40)
        user = "".join(f"<{c}_{rng.randrange(256)}>" for c in "abcd")
        prompts.append(builder.prompt("next_item", {"user": user, "candidates": builder.candidate_block(items[20:])}, builder.history_lines(items[:20])))
    return prompts, letter_ids(tokenizer, prompts[0], 20)


def flops(model, lengths: list[int], full_head: bool) -> float:
    """Matmul FLOPs of scoring: decoder linears 2*T*params, causal attention 2*layers*T^2*d, and the LM head
    (all positions x full vocabulary for the naive scorer, 20 rows at one position otherwise)."""
    cfg = model.config
    d, vocab = cfg.hidden_size, cfg.vocab_size
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    return sum(2 * t * body + 2 * cfg.num_hidden_layers * t * t * d + 2 * d * (t * vocab if full_head else 20) for t in lengths)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def agreement(a, b) -> dict:
    import numpy as np

    oa, ob = np.argsort(-a, 1, kind="stable"), np.argsort(-b, 1, kind="stable")
    return {"same_top1": float((oa[:, 0] == ob[:, 0]).mean()), "same_top10_order": float((oa[:, :10] == ob[:, :10]).all(1).mean())}


def profile(model, tokenizer, prompts, letters) -> list[dict]:
    from torch.profiler import profile as torch_profile

    from ulmrec_hf.ranker import score_prompts

    with torch_profile() as prof:
        score_prompts(model, tokenizer, prompts[:BATCH], letters, BATCH)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3)} for e in rows]


def train_speed(model, tokenizer, prompts, letters, answer_only: bool, last_layers: int | None = None, steps: int = 3) -> float:
    """Samples/s of LoRA (q, v; optionally only the last layers) steps on prompt + letter, loss on the letter."""
    import torch
    from peft import LoraConfig, get_peft_model

    n = model.config.num_hidden_layers
    layers = list(range(n - last_layers, n)) if last_layers else None
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], layers_to_transform=layers))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    tokenizer.padding_side = "right"
    texts = [p + "A" for p in prompts]
    times = []
    for step in range(steps + 1):
        enc = tokenizer(texts[step * 4:(step + 1) * 4], return_tensors="pt", padding=True)
        labels = torch.full_like(enc["input_ids"], -100)
        last = enc["attention_mask"].sum(1) - 1
        labels[torch.arange(4), last] = enc["input_ids"][torch.arange(4), last]
        start = time.perf_counter()
        if answer_only:
            shifted = labels[:, 1:]
            positions = (shifted != -100).any(0).nonzero().squeeze(-1)
            logits = peft(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], logits_to_keep=positions).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), shifted[:, positions].reshape(-1), ignore_index=-100)
        else:
            loss = peft(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    peft.unload()
    return 4 * len(times) / sum(times)


def main() -> int:
    import torch

    from ulmrec_hf.llm import load_causal_lm, load_tokenizer
    from ulmrec_hf.ranker import naive_scores, score_prompts

    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2")
    model = load_causal_lm("smollm2").eval()
    prompts, letters = prompts_and_letters(tokenizer, N_USERS)
    lengths = [len(tokenizer(p).input_ids) for p in prompts]
    naive, t_naive = timed(lambda: naive_scores(model, tokenizer, prompts, letters))
    fast, t_fast = timed(lambda: score_prompts(model, tokenizer, prompts, letters, BATCH, reuse_prefix=True))
    no_prefix, t_no_prefix = timed(lambda: score_prompts(model, tokenizer, prompts, letters, BATCH))
    same = agreement(naive, fast)
    assert same["same_top10_order"] == 1.0 and same["same_top1"] == 1.0, f"rankings differ: {same}"
    assert agreement(naive, no_prefix)["same_top10_order"] == 1.0
    ops = profile(model, tokenizer, prompts, letters)
    bf16_model = load_causal_lm("smollm2", dtype="bfloat16").eval()
    fast_bf16, t_bf16 = timed(lambda: score_prompts(bf16_model, tokenizer, prompts, letters, BATCH))
    train = {"fp32_full_vocab_loss": train_speed(load_causal_lm("smollm2"), tokenizer, prompts, letters, answer_only=False),
             "fp32_answer_positions_only": train_speed(load_causal_lm("smollm2"), tokenizer, prompts, letters, answer_only=True),
             "bf16_answer_positions_only": train_speed(load_causal_lm("smollm2", dtype="bfloat16"), tokenizer, prompts, letters, answer_only=True),
             "bf16_answer_positions_only_lora_last_8_layers": train_speed(load_causal_lm("smollm2", dtype="bfloat16"), tokenizer, prompts, letters,
                                                                          answer_only=True, last_layers=8)}
    result = {
        "device": "CPU, 2 cores", "model": "SmolLM2-135M-Instruct", "users": N_USERS, "prompt_tokens_mean": round(sum(lengths) / len(lengths), 1),
        "scoring_users_per_s": {"naive_fp32": round(N_USERS / t_naive, 3), "optimized_fp32": round(N_USERS / t_fast, 3),
                                "optimized_fp32_without_prefix_reuse": round(N_USERS / t_no_prefix, 3),
                                "optimized_bf16": round(N_USERS / t_bf16, 3)},
        "speedup_fp32": round(t_naive / t_fast, 2), "speedup_bf16_vs_naive": round(t_naive / t_bf16, 2),
        "flop_ratio_naive_over_optimized": round(flops(model, lengths, True) / flops(model, lengths, False), 2),
        "rankings_identical_fp32": True, "bf16_agreement_with_fp32": agreement(fast, fast_bf16),
        "profile_optimized_top_ops": ops, "training_samples_per_s": {k: round(v, 3) for k, v in train.items()},
        "paper_llama2_7b_s_per_user": 0.615,
    }
    out = ROOT / "bench" / "results" / "ranking_speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    s = result["scoring_users_per_s"]
    print(f"| scorer | users/s | ratio |\n|---|---|---|\n| naive fp32 (LlamaRec) | {s['naive_fp32']} | 1.00 |\n"
          f"| optimized fp32, no prefix reuse | {s['optimized_fp32_without_prefix_reuse']} | {round(t_naive / t_no_prefix, 2)} |\n"
          f"| optimized fp32 | {s['optimized_fp32']} | {result['speedup_fp32']} |\n| optimized bf16 | {s['optimized_bf16']} | {result['speedup_bf16_vs_naive']} |")
    print(f"bf16 agreement: {result['bf16_agreement_with_fp32']}; prompt tokens ~{result['prompt_tokens_mean']}; "
          f"naive/optimized matmul FLOPs: {result['flop_ratio_naive_over_optimized']} (the fp32 speed-up this work allows)")
    print("| training | samples/s |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in result["training_samples_per_s"].items()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
