"""GPU speed of the ranker at the paper's scale: a Llama-2-7B-shaped model built from its config
(random bf16 weights; speed does not depend on the values).

Measures ranking users/s at 20 candidates with ~600-token prompts (our scorer: batched, last position,
letter rows only), LoRA training tokens/s, and compares with the paper's 0.615 s/user and with the
arithmetic floor 2 x params x tokens / measured bf16 matmul rate. Target: >= 30 users/s on one H100.
`--tiny` runs the same code on a tiny config (CPU test). Writes bench/results/gpu_speed[_tiny].json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=32000)


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device, dtype, n: int) -> float:
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def ranking(model, device, batch: int, tokens: int, rounds: int) -> float:
    import torch

    from ulmrec_hf.ranker import score_batch

    letters = list(range(319, 339))
    ids = torch.randint(100, 30000, (batch, tokens), device=device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        score_batch(model, ids, mask, letters)
        sync(device)
        start = time.perf_counter()
        for _ in range(rounds):
            score_batch(model, ids, mask, letters)
        sync(device)
    return batch * rounds / (time.perf_counter() - start)


def lora_training(model, device, batch: int, tokens: int, steps: int) -> float:
    import torch
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    peft.gradient_checkpointing_enable() if device == "cuda" else None
    peft.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(100, 30000, (batch, tokens), device=device)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    for step in range(steps + 1):
        if step == 1:
            sync(device)
            start = time.perf_counter()
        positions = torch.arange(tokens - 3, tokens - 1, device=device)
        logits = peft(input_ids=ids, logits_to_keep=positions).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels[:, 1:][:, positions].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    sync(device)
    return batch * tokens * steps / (time.perf_counter() - start)


def main() -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default=None, help="Result file (default: bench/results/gpu_speed[_tiny].json).")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.tiny and device == "cpu":
        print("no GPU: run with --tiny for the CPU check")
        return 2
    dtype = torch.bfloat16
    shape = TINY if args.tiny else LLAMA2_7B
    config = LlamaConfig(**shape, max_position_embeddings=4096, attn_implementation="sdpa")
    start = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    tflops = matmul_tflops(device, dtype, 256 if args.tiny else 8192)
    batch = 4 if args.tiny else args.batch
    users_s = ranking(model, device, batch, args.tokens, 2 if args.tiny else 10)
    floor_users_s = tflops * 1e12 / (2 * params * args.tokens)
    train_tok_s = lora_training(model, device, 2 if args.tiny else 4, args.tokens, 2 if args.tiny else 5)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    result = {"device": name, "shape": "tiny" if args.tiny else "llama-2-7b", "params": params, "dtype": "bfloat16", "prompt_tokens": args.tokens,
              "candidates": 20, "build_s": round(build_s, 1), "matmul_tflops": round(tflops, 2), "ranking_users_per_s": round(users_s, 2),
              "arithmetic_floor_users_per_s": round(floor_users_s, 2), "fraction_of_floor": round(users_s / floor_users_s, 3),
              "paper_users_per_s": round(1 / 0.615, 3), "speedup_vs_paper": round(users_s * 0.615, 1),
              "lora_training_tokens_per_s": round(train_tok_s, 1), "target_users_per_s": 30,
              "note": "bf16 LoRA (no 4-bit): a random-weight model cannot be quantised without a saved checkpoint"}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / ("gpu_speed_tiny.json" if args.tiny else "gpu_speed.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| device | shape | users/s | floor users/s | x paper | LoRA tokens/s |\n|---|---|---|---|---|---|")
    print(f"| {name} | {result['shape']} | {result['ranking_users_per_s']} | {result['arithmetic_floor_users_per_s']} | "
          f"{result['speedup_vs_paper']} | {result['lora_training_tokens_per_s']} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
