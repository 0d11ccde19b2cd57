"""Alignment tuning (paper §4.3): (Q)LoRA SFT on the task mixture, evaluated by the letter verbalizer.

TRL's `SFTTrainer` with completion-only loss. Index tokens are added to the tokenizer and their
embedding rows are trained (PEFT `trainable_token_indices`; the LM-head rows too when untied).
`VerbalizerSFTTrainer.prediction_step` scores next-item validation prompts by the answer letters
(a forward without labels, last prompt position, letter rows only), so the Trainer reports
validation NDCG@10 every `eval_steps` and keeps the best checkpoint by it.
QLoRA (NF4, double quantisation, bf16 compute) when CUDA and bitsandbytes are present, LoRA otherwise.
"""

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, SFTConfig

from .common import UlmrecError, mark_complete, read_json, require, write_json

logger = logging.getLogger(__name__)


@dataclass
class RankerArguments:
    run_dir: str = field(default="runs/demo", metadata={"help": "Run directory shared by all stages.", "aliases": ["--run"]})
    overwrite: bool = field(default=False, metadata={"help": "Redo a stage even if its output is complete."})
    quantization: str = field(default="auto", metadata={"help": "'auto': 4-bit QLoRA when CUDA + bitsandbytes exist; '4bit' or 'none' to force.", "choices": ["auto", "4bit", "none"]})
    train_index_embeddings: bool = field(default=True, metadata={"help": "Train the embedding rows of the added index tokens."})
    eval_before_training: bool = field(default=True, metadata={"help": "Score the untrained model first (the zero-shot baseline)."})
    lora_last_layers: int | None = field(default=None, metadata={"help": "LoRA on only the last N decoder layers: the backward stops there unless index-token rows are trained (default: all)."})


PAPER_DEFAULTS = {"learning_rate": 1e-4, "num_train_epochs": 1.0, "optim": "adamw_torch", "lora_r": 8, "lora_alpha": 32,
                  "lora_dropout": 0.05, "eval_steps": 100, "logging_steps": 10, "report_to": ["tensorboard"]}


def parser_defaults() -> dict:
    """The paper's settings; without a GPU, SFTConfig's bf16 and activation checkpointing are switched off."""
    import torch

    cpu = {} if torch.cuda.is_available() else {"use_cpu": True, "bf16": False, "gradient_checkpointing": False}
    return {**PAPER_DEFAULTS, **cpu}


def use_4bit(choice: str) -> bool:
    import importlib.util

    import torch

    available = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
    if choice == "4bit" and not importlib.util.find_spec("bitsandbytes"):
        raise UlmrecError("train: --quantization 4bit needs bitsandbytes (pip install -e .[cuda])")
    return choice == "4bit" or (choice == "auto" and available)


def disable_cpu_repack(model) -> None:
    """bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights at eval and silently zeroes LoRA gradients."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def add_index_tokens(tokenizer, tokens: list[str]) -> list[int]:
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, single_word=False, normalized=False) for t in tokens])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    for token, tid in zip(tokens, ids):
        if tokenizer(token, add_special_tokens=False).input_ids != [tid]:
            raise UlmrecError(f"train: index token {token} does not tokenize to one id")
    return ids


def build_model(model_args: ModelConfig, ranker: RankerArguments, tokenizer, new_ids: list[int], cpu: bool):
    import torch
    from transformers import AutoModelForCausalLM

    from accelerate import PartialState
    from trl import get_peft_config, get_quantization_config

    from .llm import resolve_model_path

    model_args.load_in_4bit = use_4bit(ranker.quantization)
    if model_args.load_in_4bit:
        model_args.use_bnb_nested_quant, model_args.bnb_4bit_quant_type = True, "nf4"
        model_args.dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "bfloat16"
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "float32"
    quant = get_quantization_config(model_args)
    kwargs = {"dtype": getattr(torch, dtype), "attn_implementation": model_args.attn_implementation or "sdpa"}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map="cpu" if cpu else {"": PartialState().local_process_index})
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_args.model_name_or_path), **kwargs)
    model.resize_token_embeddings(len(tokenizer))
    disable_cpu_repack(model)
    model_args.use_peft = True
    peft_config = get_peft_config(model_args)
    if ranker.lora_last_layers:
        n = model.config.num_hidden_layers
        if not 0 < ranker.lora_last_layers <= n:
            raise UlmrecError(f"train: --lora_last_layers must be in 1..{n} for this model, got {ranker.lora_last_layers}")
        peft_config.layers_to_transform = list(range(n - ranker.lora_last_layers, n))
    if ranker.train_index_embeddings and new_ids:
        tied = getattr(model.config, "tie_word_embeddings", False)
        peft_config.trainable_token_indices = {"embed_tokens": new_ids} if tied else {"embed_tokens": new_ids, "lm_head": new_ids}
    return model, peft_config, dtype, model_args.load_in_4bit


def make_trainer_class():
    import torch
    from trl import SFTTrainer

    from .ranker import left_pad, score_batch

    class VerbalizerSFTTrainer(SFTTrainer):
        """SFT on the mixture; evaluation = verbalizer ranking of next-item validation prompts."""

        def __init__(self, *args, letter_ids: list[int], **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False  # compute_loss returns a per-batch mean
            self.letter_ids = letter_ids
            self.letter_index = {tid: i for i, tid in enumerate(letter_ids)}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Causal-LM loss on completion tokens, with logits only at the positions that have labels.

            TRL's fused LM head multiplies by `lm_head.weight` directly, which bypasses PEFT's trainable
            index-token rows; the model's own head module applies them."""
            labels = inputs["labels"][:, 1:]
            positions = (labels != -100).any(0).nonzero().squeeze(-1)
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=positions)
            logits = outputs.logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels[:, positions].reshape(-1), ignore_index=-100)
            return (loss, outputs) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            labels = inputs["labels"]
            starts = (labels != -100).int().argmax(1)  # first completion token = the answer letter
            gold = torch.tensor([self.letter_index[int(labels[i, s])] for i, s in enumerate(starts.tolist())], device=labels.device)
            rows = [inputs["input_ids"][i, :s].tolist() for i, s in enumerate(starts.tolist())]
            ids, mask = left_pad(rows, self.processing_class.pad_token_id, labels.device)
            with torch.no_grad():
                scores = score_batch(model, ids, mask, self.letter_ids)
            return None, scores, gold

    return VerbalizerSFTTrainer


def configure(training_args: SFTConfig, out: Path, cpu: bool) -> None:
    training_args.output_dir = str(out / "checkpoints")
    training_args.completion_only_loss = True
    training_args.eval_strategy = "steps" if training_args.eval_strategy == "no" else training_args.eval_strategy
    training_args.save_strategy = training_args.eval_strategy
    training_args.save_steps = training_args.eval_steps
    training_args.metric_for_best_model, training_args.greater_is_better = "ndcg@10", True
    training_args.load_best_model_at_end = True
    training_args.prediction_loss_only = False
    if cpu:
        training_args.bf16 = training_args.fp16 = False
        training_args.gradient_checkpointing = False
        training_args.use_cpu = True
    training_args.ddp_find_unused_parameters = False


def build_trainer(ranker: RankerArguments, training_args: SFTConfig, model_args: ModelConfig):
    """The configured `VerbalizerSFTTrainer` and what `main` needs to save next to the adapter."""
    import datasets
    import torch

    from .llm import load_tokenizer
    from .ranker import compute_metrics

    run = Path(ranker.run_dir)
    out, tasks_dir = run / "ranker", run / "tasks"
    require(tasks_dir, "tasks")
    mixture = read_json(tasks_dir / "mixture.json")
    model_args.model_name_or_path = model_args.model_name_or_path or mixture["args"]["model_name_or_path"]
    cpu = not torch.cuda.is_available()
    configure(training_args, out, cpu)
    tokenizer = load_tokenizer(model_args.model_name_or_path, padding_side="right")
    tokens = read_json(run / "user_index" / "tokens.json")
    new_ids = add_index_tokens(tokenizer, tokens) if tokens else []
    model, peft_config, dtype, four_bit = build_model(model_args, ranker, tokenizer, new_ids, cpu)
    eval_set = datasets.load_from_disk(str(tasks_dir / "next_item_validation"))
    trainer = make_trainer_class()(model=model, args=training_args, train_dataset=datasets.load_from_disk(str(tasks_dir / "train")),
                                   eval_dataset=eval_set, processing_class=tokenizer, peft_config=peft_config,
                                   compute_metrics=compute_metrics, letter_ids=mixture["letter_token_ids"])
    disable_cpu_repack(trainer.model)
    info = {"out": out, "mixture": mixture, "eval_set": eval_set, "tokens": tokens, "dtype": dtype, "four_bit": four_bit}
    return trainer, info


def main(ranker: RankerArguments, training_args: SFTConfig, model_args: ModelConfig) -> Path:
    out = Path(ranker.run_dir) / "ranker"
    if (out / "_COMPLETE").exists() and not ranker.overwrite:
        logger.info("train: %s is complete; skipping (use --overwrite to redo)", out)
        return out
    if ranker.overwrite and out.exists():
        shutil.rmtree(out)
    trainer, info = build_trainer(ranker, training_args, model_args)
    mixture, eval_set, tokenizer = info["mixture"], info["eval_set"], trainer.processing_class
    letter_ids = mixture["letter_token_ids"]
    resume = any(Path(training_args.output_dir).glob("checkpoint-*"))
    untrained = trainer.evaluate(metric_key_prefix="untrained") if ranker.eval_before_training and not resume else None
    trainer.train(resume_from_checkpoint=resume or None)
    best = trainer.evaluate()
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return out
    tokenizer.save_pretrained(str(out))
    checks = {"index_token_rows": token_row_change(trainer.model), "reload_check": reload_scores(trainer.model, tokenizer, eval_set, letter_ids)}
    config = {"base_model": model_args.model_name_or_path, "dtype": info["dtype"], "quantization": "4bit-nf4" if info["four_bit"] else "none",
              "letter_token_ids": letter_ids, "index_tokens": len(info["tokens"]), "candidate_order": mixture["candidate_order"],
              "best_checkpoint": trainer.state.best_model_checkpoint, "best_validation_ndcg@10": trainer.state.best_metric}
    write_json(out / "ranker_config.json", config)
    metrics = {"untrained": untrained, "best": best, "candidate_order": mixture["candidate_order"], **checks,
               "train_samples": len(trainer.train_dataset), "steps": trainer.state.global_step, "world_size": trainer.args.world_size,
               "log_history": trainer.state.log_history}
    write_json(out / "train_metrics.json", metrics)
    (out / "README.md").write_text(model_card(config, mixture, metrics, training_args, model_args))
    mark_complete(out)
    logger.info("train: best validation NDCG@10 %.4f (untrained %s) -> %s", best.get("eval_ndcg@10", float("nan")),
                f"{untrained['untrained_ndcg@10']:.4f}" if untrained else "n/a", out)
    return out


def token_row_change(model) -> dict | None:
    """How far training moved the added index-token rows (PEFT keeps their initial values)."""
    for module in model.modules():
        if hasattr(module, "trainable_tokens_delta") and hasattr(module, "trainable_tokens_original"):
            name = next(iter(module.trainable_tokens_delta))
            delta = (module.trainable_tokens_delta[name] - module.trainable_tokens_original[name]).detach().abs()
            return {"rows": int(delta.shape[0]), "max_abs_change": float(delta.max()), "rows_changed": int((delta.amax(1) > 0).sum())}
    return None


def reload_scores(model, tokenizer, eval_set, letter_ids: list[int], n: int = 4) -> dict:
    """Verbalizer scores of a few validation prompts from the in-memory model, to compare after a reload."""
    from .ranker import score_prompts

    prompts = list(eval_set["prompt"][:n])
    return {"prompts": prompts, "scores": score_prompts(model, tokenizer, prompts, letter_ids).tolist()}


def model_card(config: dict, mixture: dict, metrics: dict, training_args, model_args) -> str:
    tasks = "\n".join(f"| {t} | {v['probability']} | {v['in_mixture']} |" for t, v in mixture["tasks"].items())
    skipped = "; ".join(f"{t}: {why}" for t, why in mixture["skipped"].items()) or "none"
    best = metrics["best"]
    untrained = metrics["untrained"] or {}
    return f"""---
base_model: {config['base_model']}
library_name: peft
tags:
- ulmrec
- recommendation
- lora
- trl
---
# ULMRec ranker (LoRA adapter)

A ULMRec ranker trained with [ulmrec-hf](https://github.com/) on top of `{config['base_model']}`
(quantization: {config['quantization']}). It ranks 20 lettered candidates by the logits of the answer letters.

## Training
- Tasks and proportions:

| task | probability | samples |
|---|---|---|
{tasks}

- Skipped tasks: {skipped}.
- Candidate order: **{config['candidate_order']}** (the same in training and evaluation).
- LoRA r={model_args.lora_r}, alpha={model_args.lora_alpha}, dropout={model_args.lora_dropout}; lr {training_args.learning_rate},
  {training_args.num_train_epochs} epoch(s), {metrics['train_samples']} samples, {metrics['steps']} steps. Index-token rows: {config['index_tokens']} tokens.

## Validation (verbalizer, users whose ground truth is among the candidates)
| model | NDCG@10 | Recall@10 | MRR@10 |
|---|---|---|---|
| untrained | {untrained.get('untrained_ndcg@10', float('nan')):.4f} | {untrained.get('untrained_recall@10', float('nan')):.4f} | {untrained.get('untrained_mrr@10', float('nan')):.4f} |
| this adapter | {best.get('eval_ndcg@10', float('nan')):.4f} | {best.get('eval_recall@10', float('nan')):.4f} | {best.get('eval_mrr@10', float('nan')):.4f} |

## Use
```python
from ulmrec_hf.ranker import load_ranker, score_prompts
model, tokenizer, config = load_ranker("PATH_OR_REPO")
```
"""
