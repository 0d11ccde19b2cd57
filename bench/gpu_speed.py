"""GPU speed and memory of ulmrec's hot paths, every row side by side in one run (issue 14).

Rows (Llama-2-7B shape unless named; random weights built from the config: speed does not depend on them):
- ranking bf16: users/s of `score_prompts` at 20 candidates, against the arithmetic floor
  2 x params x tokens / measured bf16 matmul rate; with and without shared-prefix reuse, each with its peak memory.
- ranking 4-bit: the same on an NF4 base with double quantisation (what a QLoRA ranker is evaluated on).
- evaluation memory accounting: bf16 weights + the batch's key/value cache that prefix reuse keeps + activations,
  against the measured peaks above (the 35.8 GiB seen after QLoRA: the prefix cache grows with the whole batch).
- LoRA training bf16 and QLoRA training: tokens/s and peak memory, one LoRA step loop (q, k, v, o; r=8).
- SmolLM2-135M shape, the train stage's own `VerbalizerSFTTrainer`: samples/s on ~700-token prompts at batch 16
  (the speed measured on an H100 before) against larger and padding-free batches.
- LRURec on Beauty-shaped sequences (22,332 users, 12,086 items, mean length 8.9): seconds per epoch of the retrieve
  stage's loop at batch 64 and at larger batches.

`--tiny` runs every row at tiny shapes on the CPU (the test); `--rows a,b` picks rows. Writes
bench/results/gpu_speed[_tiny].json and prints one table.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
               tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=32000)
LETTERS = list(range(319, 339))
ROWS = ("rank_bf16", "rank_4bit", "train_bf16", "train_qlora", "smollm2_trainer", "lrurec")


class Probe:
    """Wall time and peak device memory of one row."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        else:
            self.peak_gib = None
        self.seconds = time.perf_counter() - self.start


def matmul_tflops(device, n: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    with Probe(device) as p:
        for _ in range(10):
            a @ a
    return 2 * n**3 * 10 / p.seconds / 1e12


def llama(shape: dict, device: str, dtype=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype or torch.bfloat16).eval()


def quantised(shape: dict, device: str, folder: Path):
    """The same shape with an NF4 base (double quantisation, bf16 compute): saved once, loaded with bitsandbytes."""
    from ulmrec_hf.ranker import load_base

    if not (folder / "config.json").exists():
        llama(shape, "cpu").save_pretrained(folder)
    return load_base(str(folder), "4bit-nf4", "bfloat16", device, shape["vocab_size"])


def ranking(model, device: str, users: int, tokens: int, batch: int, reuse_prefix: bool) -> dict:
    """users/s and peak memory of `score_prompts` on same-length prompts sharing a 40-token header."""
    import torch

    from ulmrec_hf.ranker import length_batches, score_batch, shared_prefix

    rng = torch.Generator().manual_seed(0)
    header = torch.randint(100, 30000, (40,), generator=rng).tolist()
    rows = [header + torch.randint(100, 30000, (tokens - 40,), generator=rng).tolist() for _ in range(users)]
    with torch.inference_mode():
        prefix = shared_prefix(model, rows) if reuse_prefix else None
        skip = prefix[1] if prefix else 0
        batches = length_batches([len(r) for r in rows], batch)
        ids = torch.tensor([rows[i][skip:] for i in batches[0]], device=device)
        score_batch(model, ids, torch.ones_like(ids), LETTERS, prefix)  # warm-up
        with Probe(device) as p:
            for idx in batches:
                ids = torch.tensor([rows[i][skip:] for i in idx], device=device)
                score_batch(model, ids, torch.ones_like(ids), LETTERS, prefix)
    return {"users_per_s": round(users / p.seconds, 2), "peak_gib": p.peak_gib}


def lora_step_rate(model, device: str, batch: int, tokens: int, steps: int) -> dict:
    """tokens/s of LoRA (r=8 on q, k, v, o) steps with the loss at the answer position only, and peak memory."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    if device == "cuda":
        peft.gradient_checkpointing_enable()
    peft.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(100, 30000, (batch, tokens), device=device)
    positions = torch.arange(tokens - 3, tokens - 1, device=device)
    target = ids[:, 1:][:, positions]

    def step():
        logits = peft(input_ids=ids, logits_to_keep=positions).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()

    step()
    with Probe(device) as p:
        for _ in range(steps):
            step()
    peft.unload()
    return {"tokens_per_s": round(batch * tokens * steps / p.seconds, 1), "peak_gib": p.peak_gib, "batch": batch, "tokens": tokens}


def memory_accounting(shape: dict, batch: int, tokens: int) -> dict:
    """GiB of bf16 weights, and of the key/value cache the decoder keeps for a whole batch when a prefix cache is passed."""
    params = (shape["vocab_size"] * shape["hidden_size"] * 2 + shape["num_hidden_layers"]
              * (4 * shape["hidden_size"] ** 2 + 3 * shape["hidden_size"] * shape["intermediate_size"]))
    kv_width = shape["hidden_size"] * shape["num_key_value_heads"] // shape["num_attention_heads"]
    kv = 2 * shape["num_hidden_layers"] * batch * tokens * kv_width * 2
    return {"bf16_weights_gib": round(params * 2 / 2**30, 4), "batch_kv_cache_gib_with_prefix_reuse": round(kv / 2**30, 4),
            "batch": batch, "tokens": tokens}


def synthetic_tasks(tokenizer, rows: int, tokens: int, title_words: int, seed: int = 0):
    """Next-item prompt/completion rows of about `tokens` tokens (20 lettered candidates, titles of random words)."""
    import datasets

    from ulmrec_hf.prompts import LETTERS as LETTER_NAMES
    from ulmrec_hf.prompts import PromptBuilder

    rng = random.Random(seed)
    words = ["serum", "matte", "vegan", "glow", "repair", "hydrating", "tint", "shine", "organic", "travel", "classic", "silk"]
    titles = {i: " ".join(rng.choices(words, k=title_words)) for i in range(1, 400)}
    builder = PromptBuilder(tokenizer, titles, max_length=tokens, history_len=20, title_max_tokens=24)
    out = []
    for _ in range(rows):
        items = rng.sample(sorted(titles), 40)
        target = rng.randrange(20)
        prompt = builder.prompt("next_item", {"candidates": builder.candidate_block(items[20:])}, builder.history_lines(items[:20]))
        out.append({"prompt": prompt, "completion": LETTER_NAMES[target], "target_position": target})
    return datasets.Dataset.from_list(out)


def smollm2_trainer(shape: dict, tokenizer_name: str, device: str, variants: dict, rows: int, tokens: int, title_words: int) -> dict:
    """samples/s of the train stage's own trainer (completion-only loss at answer positions, bf16) per batch variant."""
    from ulmrec_hf.llm import load_tokenizer
    from ulmrec_hf.prompts import letter_ids
    from ulmrec_hf.ranker import compute_metrics
    from ulmrec_hf.train import RankerTrainingConfig, make_trainer_class

    tokenizer = load_tokenizer(tokenizer_name, padding_side="right")
    data = synthetic_tasks(tokenizer, rows, tokens, title_words)
    letters = letter_ids(tokenizer, data[0]["prompt"], 20)
    results = {}
    for name, options in variants.items():
        from peft import LoraConfig

        model = llama({**shape, "vocab_size": len(tokenizer)}, device)
        args = RankerTrainingConfig(output_dir=tempfile.mkdtemp(), eval_strategy="no", load_best_model_at_end=False, report_to="none",
                                    save_strategy="no", max_steps=options["steps"], logging_steps=1000, bf16=device == "cuda",
                                    use_cpu=device == "cpu", dataloader_num_workers=0, **{k: v for k, v in options.items() if k != "steps"})
        trainer = make_trainer_class()(model=model, args=args, train_dataset=data, processing_class=tokenizer, letter_ids=letters,
                                       peft_config=LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]), compute_metrics=compute_metrics)
        with Probe(device) as p:
            out = trainer.train()
        results[name] = {"samples_per_s": round(out.metrics["train_samples_per_second"], 2), "peak_gib": p.peak_gib,
                         **{k: v for k, v in options.items()}}
        del trainer, model
    base = next(iter(results.values()))["samples_per_s"]
    for r in results.values():
        r["speedup"] = round(r["samples_per_s"] / base, 2)
    return results


def beauty_shaped(users: int, items: int, seed: int = 0) -> list[list[int]]:
    """Sequences with Beauty's length profile (5-core, mean 8.9, long tail) and popularity skew."""
    rng = random.Random(seed)
    weights = [1 / (i + 10) for i in range(items)]
    return [rng.choices(range(1, items + 1), weights=weights, k=min(200, 5 + int(rng.expovariate(1 / 3.9)))) for _ in range(users)]


def lrurec_epoch(users: int, items: int, batches: list[int]) -> dict:
    """Seconds per epoch of the retrieve stage's loop: half the difference between the loop times of a 3-epoch and a
    1-epoch run, so setup and the end-of-run validation cancel out."""
    from ulmrec_hf.layout import RunDir
    from ulmrec_hf.retrieve import RetrieveArguments, train

    sequences = beauty_shaped(users, items)
    out = {}
    for batch in batches:  # the mean over a 3-epoch run's own clock (one final validation included): a difference of two
        run = RunDir(tempfile.mkdtemp())  # runs' totals can come out <= 0 at tiny sizes
        args = RetrieveArguments(batch_size=batch, lr=1e-3 * (batch / 64) ** 0.5, max_epochs=3, eval_every_steps=10**9)
        state, _ = train(args, run, sequences, items)
        out[f"batch_{batch}"] = {"s_per_epoch": round(state["train_time_s"] / 3, 4), "lr": args.lr, "steps_per_epoch": users // batch}
    return out


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="Tiny shapes on whatever device there is (the CPU test).")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokenizer", default="smollm2", help="Tokenizer of the SmolLM2 row (a path or the smollm2 alias).")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.tiny and device == "cpu":
        print("no GPU: run with --tiny for the CPU check")
        return 2
    rows, tiny = set(args.rows.split(",")), args.tiny
    shape, tokens = (TINY, 64) if tiny else (LLAMA2_7B, args.tokens)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "CPU", "shape": "tiny" if tiny else "llama-2-7b",
              "tokens": tokens, "torch": torch.__version__}
    tflops = matmul_tflops(device, 256 if tiny else 8192)
    result["matmul_tflops"] = round(tflops, 1)
    users, batch = (8, 4) if tiny else (256, args.batch)
    if "rank_bf16" in rows or "train_bf16" in rows:
        model = llama(shape, device)
        params = sum(p.numel() for p in model.parameters())
        floor = tflops * 1e12 / (2 * params * tokens)
        if "rank_bf16" in rows:
            rank = {"prefix_reuse_off": ranking(model, device, users, tokens, batch, False), "prefix_reuse_on": ranking(model, device, users, tokens, batch, True)}
            for r in rank.values():
                r["fraction_of_floor"] = round(r["users_per_s"] / floor, 3)
            result["rank_bf16"] = {"params": params, "floor_users_per_s": round(floor, 1), **rank,
                                   "memory_accounting": memory_accounting(shape, batch, tokens)}
        if "train_bf16" in rows:
            result["train_bf16"] = lora_step_rate(model, device, 2 if tiny else 4, tokens if tiny else 1024, 2 if tiny else 5)
        del model
    if rows & {"rank_4bit", "train_qlora"}:
        folder = Path(tempfile.gettempdir()) / f"ulmrec-gpu-speed-{'tiny' if tiny else '7b'}"
        model = quantised(shape, device, folder)
        if "rank_4bit" in rows:
            result["rank_4bit"] = ranking(model, device, users, tokens, batch, False)
        if "train_qlora" in rows:
            result["train_qlora"] = lora_step_rate(model, device, 2 if tiny else 4, tokens if tiny else 1024, 2 if tiny else 5)
        del model
    if "smollm2_trainer" in rows:
        small = TINY if tiny else SMOLLM2
        variants = {"batch16_padded": {"per_device_train_batch_size": 16, "steps": 2 if tiny else 20},
                    "batch64_padded": {"per_device_train_batch_size": 64, "steps": 2 if tiny else 10},
                    "batch64_padding_free": {"per_device_train_batch_size": 64, "padding_free": True, "steps": 2 if tiny else 10}}
        if tiny:
            variants = {k: {**v, "per_device_train_batch_size": 2} for k, v in variants.items()}
        result["smollm2_trainer"] = smollm2_trainer(small, args.tokenizer, device, variants, *((24, 512, 3) if tiny else (700, 700, 14)))
    if "lrurec" in rows:
        result["lrurec"] = lrurec_epoch(*((300, 200) if tiny else (22332, 12086)), [32, 64] if tiny else [64, 256, 1024])
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / ("gpu_speed_tiny.json" if tiny else "gpu_speed.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {out}")
    return 0


def table(result: dict) -> str:
    lines = [f"device: {result['device']}, shape {result['shape']}, {result['tokens']} prompt tokens, bf16 matmul {result['matmul_tflops']} TFLOP/s",
             "| row | rate | peak GiB | note |", "|---|---|---|---|"]
    gib = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    if "rank_bf16" in result:
        r = result["rank_bf16"]
        for k in ("prefix_reuse_off", "prefix_reuse_on"):
            lines.append(f"| ranking bf16, {k} | {r[k]['users_per_s']} users/s | {gib(r[k]['peak_gib'])} | {r[k]['fraction_of_floor']:.0%} of the floor ({r['floor_users_per_s']}) |")
        m = r["memory_accounting"]
        lines.append(f"| evaluation memory | | | weights {m['bf16_weights_gib']} GiB + batch KV cache with prefix reuse {m['batch_kv_cache_gib_with_prefix_reuse']} GiB |")
    if "rank_4bit" in result:
        lines.append(f"| ranking 4-bit NF4 | {result['rank_4bit']['users_per_s']} users/s | {gib(result['rank_4bit']['peak_gib'])} | |")
    for k in ("train_bf16", "train_qlora"):
        if k in result:
            lines.append(f"| {k} | {result[k]['tokens_per_s']} tokens/s | {gib(result[k]['peak_gib'])} | batch {result[k]['batch']} x {result[k]['tokens']} |")
    for name, r in result.get("smollm2_trainer", {}).items():
        lines.append(f"| SmolLM2 trainer, {name} | {r['samples_per_s']} samples/s | {gib(r['peak_gib'])} | {r['speedup']}x |")
    for name, r in result.get("lrurec", {}).items():
        lines.append(f"| LRURec epoch, {name} | {r['s_per_epoch']} s/epoch | | lr {r['lr']:.2g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
