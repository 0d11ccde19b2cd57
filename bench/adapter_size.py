"""What a ranker adapter holds, for the paper's setting: Llama-2-7B's shape, LoRA r=8 on q and v (the authors' released adapter), and the
rows of 4 x 256 = 1,024 added index tokens, against what PEFT saved by default (full copies of the resized embedding
and head).

The model is built from Llama-2-7B's config on the meta device (shapes only, no memory), wrapped by PEFT exactly as
`ulmrec train` wraps it, and PEFT's own `get_peft_model_state_dict` lists the tensors a save writes; their sizes are
summed at the dtype they are stored in. The SmolLM2 row does the same for the demo's shape and, when `runs/demo`
exists, reads the size of the adapter `make demo` wrote.

Usage: python bench/adapter_size.py
"""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, tie_word_embeddings=False)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, tie_word_embeddings=True)


def saved_bytes(shape: dict, index_tokens: int, targets: list[str], dtype=torch.bfloat16) -> dict:
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
        model.resize_token_embeddings(shape["vocab_size"] + index_tokens, mean_resizing=False)
    new_ids = list(range(shape["vocab_size"], shape["vocab_size"] + index_tokens))
    rows = {"embed_tokens": new_ids} if shape["tie_word_embeddings"] else {"embed_tokens": new_ids, "lm_head": new_ids}
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM", trainable_token_indices=rows)
    peft_model = get_peft_model(model, lora)
    out = {}
    for save_embeddings in (False, True):
        state = get_peft_model_state_dict(peft_model, save_embedding_layers=save_embeddings)
        out["with_embedding_copies" if save_embeddings else "adapter"] = {
            "bytes": sum(t.numel() * t.element_size() for t in state.values()), "tensors": len(state),
            "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in state.values()}),
            "largest": max(([*t.shape] for t in state.values()), key=lambda s: torch.Size(s).numel())}
    by_kind = {"lora": 0, "index_token_rows": 0}
    for name, t in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items():
        by_kind["lora" if "lora_" in name else "index_token_rows"] += t.numel() * t.element_size()
    out["adapter"]["by_kind"] = by_kind
    return out


def main() -> int:
    rows = {
        "llama2-7b (paper: 1,024 index tokens, LoRA on q,v)": {"shape": LLAMA2_7B, "index_tokens": 1024, "targets": ["q_proj", "v_proj"]},
        "smollm2-135m (demo: 4 x 32 = 128 index tokens, LoRA on q,v)": {"shape": SMOLLM2_135M, "index_tokens": 128, "targets": ["q_proj", "v_proj"]},
    }
    results = {}
    for name, spec in rows.items():
        results[name] = {"index_tokens": spec["index_tokens"], "lora_targets": spec["targets"], "base_dtype": "bfloat16",
                         **saved_bytes(spec["shape"], spec["index_tokens"], spec["targets"])}
    from ulmrec_hf.layout import RunDir

    demo = RunDir(ROOT / "runs" / "demo").ranker_files.adapter
    if demo.exists():
        results["smollm2-135m (demo: 4 x 32 = 128 index tokens, LoRA on q,v)"]["measured_demo_adapter_bytes"] = demo.stat().st_size
    print("| shape | adapter (LoRA + index rows) | of which index rows | with PEFT's embedding copies | ratio |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        small, big = r["adapter"]["bytes"], r["with_embedding_copies"]["bytes"]
        print(f"| {name} | {small / 1e6:.1f} MB | {r['adapter']['by_kind']['index_token_rows'] / 1e6:.1f} MB | {big / 1e6:.1f} MB | {big / small:.0f}x |")
        if "measured_demo_adapter_bytes" in r:
            print(f"|   measured: runs/demo/ranker/adapter_model.safetensors | {r['measured_demo_adapter_bytes'] / 1e6:.2f} MB | | | |")
    out = ROOT / "bench" / "results" / "adapter_size.json"
    out.write_text(json.dumps({"note": "bytes of the tensors PEFT saves, computed on the meta device (shapes only); PEFT keeps "
                                       "trainable weights in float32 (autocast_adapter_dtype), so they are saved in float32",
                               "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
