"""Training stage (paper §4.2-4.3): (Q)LoRA SFT of the base LLM on the task mixture with TRL's SFTTrainer.

- Loss on the completion only (the answer and EOS), computed from logits at labelled positions only.
- The added index tokens' embedding rows are trained (PEFT `trainable_token_indices`) and saved as those rows only:
  the adapter and every checkpoint hold the LoRA matrices and the index-token rows, never the base's embedding.
- `VerbalizerSFTTrainer.prediction_step` scores next-item validation prompts by the answer letters, so the Trainer
  reports validation NDCG@10 every `eval_steps` and keeps the best checkpoint by it.

Defaults are the paper's (LoRA r=8, alpha 32, dropout 0.05, lr 1e-4, 1 epoch, AdamW). Unset options are derived and
logged, never replaced when given: `model_name_or_path` from the tasks stage; `load_in_4bit` (QLoRA, NF4 with double
quantisation) when CUDA and bitsandbytes are present; `dtype` bfloat16 with CUDA or 4-bit, else float32; `bf16` and
activation checkpointing on with CUDA only; `use_cpu` without CUDA; `save_steps` = `eval_steps`; under FSDP with 4-bit,
`bnb_4bit_quant_storage` = `dtype` (FSDP shards the 4-bit weights with the rest). Contradictions are errors, and so is
FSDP or DeepSpeed without CUDA (accelerate would train unsharded copies).
"""

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, SFTConfig

from .common import StageArguments, UlmrecError, settings_of, write_json
from .cards import model_card
from .layout import RankerFolder, RunDir
from .metrics import TIE_RULE

logger = logging.getLogger(__name__)
METRICS = ("mrr@1", "mrr@5", "mrr@10", "ndcg@1", "ndcg@5", "ndcg@10", "recall@1", "recall@5", "recall@10")
# SFTConfig fields that change the adapter (the rest only change logging, saving or speed)
TRAINING_SETTINGS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "optim", "adam_beta1", "adam_beta2",
                     "adam_epsilon", "max_grad_norm", "bf16", "fp16", "max_length", "eval_steps", "seed", "data_seed",
                     "padding_free", "completion_only_loss", "metric_for_best_model", "load_best_model_at_end", "neftune_noise_alpha")


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class RankerArguments:
    _argument_group_name = "ranker"
    _operational = ("allow_worse_than_untrained",)  # decides whether the stage may finish, not what it trains
    train_index_embeddings: bool = field(default=True, metadata={"help": "Train the embedding rows of the added index tokens."})
    eval_before_training: bool = field(default=True, metadata={"help": "Score the untrained model on validation first (the zero-shot baseline the kept adapter must beat)."})
    allow_worse_than_untrained: bool = field(default=False, metadata={"help": "Finish even when the kept adapter ranks validation worse than the untrained model (recorded in the model card); otherwise the stage stops with an error, its adapter saved."})
    lora_last_layers: int | None = field(default=None, metadata={"help": "LoRA on only the last N decoder layers: the backward stops there unless index-token rows are trained (default: all)."})
    next_item_loss: str = field(default="lm", metadata={"help": "Loss of the rows answered by one candidate letter (next-item and intent): lm, the causal-LM loss on the letter and EOS; letters, the cross-entropy over the candidate letters' logits at the answer position.", "choices": ["lm", "letters"]})
    loss_normalization: str = field(default="token", metadata={"help": "token: the mean over every loss term of the batch; sample: each row's mean over its own terms first, then the mean over rows (a 2-token answer weighs as much as a 25-token one).", "choices": ["token", "sample"]})
    index_token_init: str = field(default="mean", metadata={"help": "First rows of the index tokens: mean (the base's mean embedding plus seeded noise); text (the mean base embedding of the preference texts of the users whose index holds the token; saved with the adapter).", "choices": ["mean", "text"]})


@dataclass
class RankerModelConfig(ModelConfig):
    """TRL's ModelConfig with the paper's LoRA and derived precision (see the module docstring)."""

    _argument_group_name = "model (TRL ModelConfig)"
    model_name_or_path: str | None = field(default=None, metadata={"help": "Base LLM (default: the one the tasks stage tokenized for)."})
    dtype: str | None = field(default=None, metadata={"help": "Weights/compute dtype (default: bfloat16 with CUDA or 4-bit, else float32).", "choices": ["bfloat16", "float16", "float32", "auto"]})
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (the only mode ulmrec supports)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    load_in_4bit: bool | None = field(default=None, metadata={"help": "QLoRA: a 4-bit NF4 base (default: on with CUDA and bitsandbytes)."})
    use_bnb_nested_quant: bool | None = field(default=None, metadata={"help": "Double quantisation of the 4-bit base (default: on with 4-bit)."})


@dataclass
class RankerTrainingConfig(SFTConfig):
    """TRL's SFTConfig with the paper's optimisation and ulmrec's checkpoint selection (see the module docstring)."""

    _argument_group_name = "training (TRL SFTConfig)"
    output_dir: str | None = field(default=None, metadata={"help": "Not used: checkpoints go to <run_dir>/ranker/checkpoints."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (the paper's 1e-4)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the mixture (the paper: 1)."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (the paper: AdamW)."})
    eval_strategy: str = field(default="steps", metadata={"help": "When to score validation NDCG@10 and checkpoint."})
    eval_steps: float | None = field(default=100, metadata={"help": "Steps between validations (the paper: 100)."})
    save_steps: float | None = field(default=None, metadata={"help": "Steps between checkpoints (default: eval_steps)."})
    metric_for_best_model: str | None = field(default="ndcg@10", metadata={"help": "Validation metric that picks the kept checkpoint."})
    greater_is_better: bool | None = field(default=True, metadata={"help": "Higher metric is better."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Keep the best checkpoint by metric_for_best_model (else the last)."})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "Logging integrations (TensorBoard under checkpoints/runs)."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (default: on with CUDA only)."})
    use_cpu: bool | None = field(default=None, metadata={"help": "Train on the CPU (default: when there is no CUDA; makes a CPU multi-process launch real DDP)."})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated alias of activation_checkpointing."})
    activation_checkpointing: bool | None = field(default=None, metadata={"help": "Activation checkpointing (default: on with CUDA only)."})
    max_length: int | None = field(default=None, metadata={"help": "Truncation length; default none, since `tasks` already fits every prompt."})
    completion_only_loss: bool | None = field(default=True, metadata={"help": "Loss on the answer only (required by the verbalizer evaluation)."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "DDP setting; LoRA has no unused parameters."})

    def __post_init__(self):
        if self.use_cpu is None:
            self.use_cpu = not cuda()
        if self.bf16 is None and not self.fp16:
            import torch

            self.bf16 = bool(cuda() and torch.cuda.is_bf16_supported())
        if self.gradient_checkpointing is None and self.activation_checkpointing is None:
            self.activation_checkpointing = cuda()
        self.given_output_dir = self.output_dir
        self.save_steps = self.eval_steps if self.save_steps is None else self.save_steps
        super().__post_init__()


ARGUMENTS = (StageArguments, RankerArguments, RankerModelConfig, RankerTrainingConfig)


def resolve(model_args: RankerModelConfig, training_args: RankerTrainingConfig, run: RunDir, mixture: dict) -> dict:
    """Fill the derived defaults (logged), reject contradictions; returns what was derived."""
    import importlib.util

    derived = {}
    if model_args.model_name_or_path is None:
        derived["model_name_or_path"] = model_args.model_name_or_path = mixture["model_name_or_path"]
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if model_args.load_in_4bit is None:
        derived["load_in_4bit"] = model_args.load_in_4bit = cuda() and has_bnb
    if model_args.load_in_4bit and not has_bnb:
        raise UlmrecError("train: --load_in_4bit true needs bitsandbytes (pip install -e .[cuda])")
    if model_args.load_in_4bit and not cuda():
        logger.warning("train: 4-bit on the CPU (bitsandbytes' CPU kernels) is slow; it is meant for tests")
    if model_args.use_bnb_nested_quant is None:
        derived["use_bnb_nested_quant"] = model_args.use_bnb_nested_quant = bool(model_args.load_in_4bit)
    if model_args.dtype in (None, "auto"):
        derived["dtype"] = model_args.dtype = "bfloat16" if (cuda() or model_args.load_in_4bit) else "float32"
    problems = sharding_problems(model_args, training_args, derived)
    if not model_args.use_peft:
        problems.append("--use_peft false: ulmrec trains LoRA adapters only")
    if model_args.load_in_8bit:
        problems.append("--load_in_8bit: the paper's QLoRA is 4-bit (--load_in_4bit)")
    if training_args.given_output_dir is not None:
        problems.append(f"--output_dir: checkpoints always go to {run.checkpoints}; choose --run_dir instead")
    if training_args.push_to_hub:
        problems.append("--push_to_hub would upload ranker/checkpoints; after training, `ulmrec push --run_dir RUN --model_repo ID` "
                        "uploads the adapter with its card")
    if training_args.metric_for_best_model not in METRICS:
        problems.append(f"--metric_for_best_model {training_args.metric_for_best_model}: validation reports {', '.join(METRICS)}")
    if not training_args.completion_only_loss:
        problems.append("--completion_only_loss false: the verbalizer evaluation reads the answer from completion-only labels")
    if training_args.eval_strategy == "no":
        problems.append("--eval_strategy no: the checkpoint is chosen by validation NDCG@10")
    if problems:
        raise UlmrecError("train: " + "; ".join(problems))
    training_args.output_dir = str(run.checkpoints)
    for key, value in derived.items():
        logger.info("train: %s not given; using %s", key, value)
    return derived


def sharding_problems(model_args: RankerModelConfig, training_args: RankerTrainingConfig, derived: dict) -> list[str]:
    """FSDP and DeepSpeed need CUDA (accelerate shards nothing on the CPU: it trains plain DDP copies there), and QLoRA
    under FSDP needs the 4-bit weights stored in the dtype FSDP shards with the rest (`bnb_4bit_quant_storage`)."""
    import os

    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(training_args.fsdp)
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or bool(training_args.deepspeed)
    problems = []
    if (fsdp or deepspeed) and not cuda():
        problems.append(f"{'FSDP' if fsdp else 'DeepSpeed'} needs CUDA: without it accelerate runs each process unsharded (distributed type "
                        "MULTI_CPU, plain DDP), so nothing would be sharded; on CPUs use accelerate_configs/multi_gpu.yaml or "
                        "`accelerate launch --multi_gpu --num_processes N`")
    if fsdp and model_args.load_in_4bit:
        if model_args.bnb_4bit_quant_storage is None:
            derived["bnb_4bit_quant_storage"] = model_args.bnb_4bit_quant_storage = model_args.dtype
        elif model_args.bnb_4bit_quant_storage != model_args.dtype:
            problems.append(f"--bnb_4bit_quant_storage {model_args.bnb_4bit_quant_storage}: under FSDP the 4-bit weights are sharded "
                            f"with the {model_args.dtype} ones, so they must be stored as {model_args.dtype} (or leave it unset)")
    return problems


def ranker_tokenizer(model_args, run: RunDir, mixture: dict):
    """The base tokenizer (checked against the one the prompts were built with) plus the index tokens."""
    from .llm import load_tokenizer
    from .prompts import add_index_tokens, tokenizer_fingerprint

    tokenizer = load_tokenizer(model_args.model_name_or_path, padding_side="right")
    if tokenizer_fingerprint(tokenizer) != mixture["tokenizer"]:
        raise UlmrecError(f"train: {model_args.model_name_or_path} has another tokenizer than the one the tasks stage used "
                          f"({mixture['model_name_or_path']}); the letter ids and prompt lengths would not match. Run "
                          f"`ulmrec tasks --model_name_or_path {model_args.model_name_or_path} --overwrite` first")
    tokens = run.index_tokens()
    return tokenizer, (add_index_tokens(tokenizer, tokens) if tokens else [])


def base_record(model_args: RankerModelConfig) -> dict:
    """How the base is loaded, as `ranker_config.json` records it: scoring loads it the same way (`ranker.load_base`)."""
    from .ranker import quantization_name

    return {"base_model": model_args.model_name_or_path, "dtype": model_args.dtype,
            "quantization": quantization_name(model_args.load_in_4bit, model_args.bnb_4bit_quant_type),
            "double_quantization": bool(model_args.use_bnb_nested_quant), "quant_storage": model_args.bnb_4bit_quant_storage,
            "model_revision": model_args.model_revision, "attn_implementation": model_args.attn_implementation or "sdpa"}


def build_model(model_args: RankerModelConfig, ranker: RankerArguments, tokenizer, new_ids: list[int], device_index: int = 0,
                by_token: dict[str, list[str]] | None = None):
    """(base, LoRA config, text rows): with `index_token_init: text`, the index-token rows that start from `by_token`'s
    texts, as (token ids, rows) to save with the adapter (None otherwise)."""
    from trl import get_peft_config

    from .prompts import set_rows, text_rows
    from .ranker import load_base

    base = base_record(model_args)
    device = (device_index if cuda() else "cpu") if model_args.load_in_4bit else None  # the Trainer places a full-precision base
    model = load_base(base["base_model"], base["quantization"], base["dtype"], device, len(tokenizer), base["double_quantization"],
                      base["quant_storage"], base["model_revision"], base["attn_implementation"])
    init = None
    if ranker.index_token_init == "text" and new_ids:
        import torch

        rows = text_rows(model, tokenizer, by_token or {})
        ids = tokenizer.convert_tokens_to_ids(list(rows))
        if ids:
            init = (ids, torch.stack(list(rows.values())))
            set_rows(model, *init)
        logger.info("train: %d of %d index-token rows start from their users' texts; the rest from the mean", len(ids), len(new_ids))
    peft_config = get_peft_config(model_args)
    if ranker.lora_last_layers:
        n = model.config.num_hidden_layers
        if not 0 < ranker.lora_last_layers <= n:
            raise UlmrecError(f"train: --lora_last_layers must be in 1..{n} for this model, got {ranker.lora_last_layers}")
        peft_config.layers_to_transform = list(range(n - ranker.lora_last_layers, n))
    if ranker.train_index_embeddings and new_ids:
        tied = getattr(model.config, "tie_word_embeddings", False)
        peft_config.trainable_token_indices = {"embed_tokens": new_ids} if tied else {"embed_tokens": new_ids, "lm_head": new_ids}
    return model, peft_config, init


def sequences(inputs: dict) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of each sample of a batch, padded (attention_mask) or padding-free (position_ids restart at 0)."""
    ids, labels = inputs["input_ids"].tolist(), inputs["labels"].tolist()
    if "attention_mask" in inputs:
        mask = inputs["attention_mask"].tolist()
        return [([t for t, m in zip(i, ms) if m], [x for x, m in zip(lab, ms) if m]) for i, lab, ms in zip(ids, labels, mask)]
    starts = [p for p, pos in enumerate(inputs["position_ids"][0].tolist()) if pos == 0] + [len(ids[0])]
    return [(ids[0][a:b], labels[0][a:b]) for a, b in zip(starts, starts[1:])]


def row_ids(inputs: dict):
    """The sample each token belongs to: its batch row when padded, else the segment whose position_ids restart at 0."""
    import torch

    ids = inputs["input_ids"]
    if "attention_mask" in inputs:
        return torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    return (inputs["position_ids"] == 0).long().cumsum(-1) - 1


def completion_loss(logits, labels, rows, letter_ids: list[int], next_item_loss: str = "lm", normalization: str = "token"):
    """Loss over the labelled positions: logits (batch, positions, vocab), labels (batch, positions) with -100 where
    unlabelled, rows (batch, positions) the sample of each position.

    - `next_item_loss` lm: each labelled token's causal-LM cross-entropy. letters: a row whose completion is one
      candidate letter and EOS (next-item and intent rows) has one term instead, the cross-entropy over the letters'
      logits at the answer position (the verbalizer's scores); other rows keep their LM terms.
    - `normalization` token: the mean over every term of the batch; sample: each row's mean, then the mean over rows."""
    import torch
    import torch.nn.functional as F

    mask = labels != -100
    flat, targets, owner = logits[mask].float(), labels[mask], rows[mask]
    terms = F.cross_entropy(flat, targets, reduction="none")
    keep = torch.ones_like(terms, dtype=torch.bool)
    if next_item_loss == "letters":
        letters = torch.tensor(letter_ids, device=targets.device)
        starts = torch.ones_like(keep)
        starts[1:] = owner[1:] != owner[:-1]
        first = starts.nonzero().squeeze(-1)
        length = torch.diff(first, append=first.new_tensor([len(owner)]))
        answer = first[(length == 2) & torch.isin(targets[first], letters)]
        gold = (targets[answer, None] == letters[None]).float().argmax(-1)
        terms = terms.clone()
        terms[answer] = F.cross_entropy(flat[answer][:, letters], gold, reduction="none")
        keep[answer + 1] = False  # the EOS after the letter: the ranking reads the letter alone
    if normalization == "token":
        return terms[keep].mean()
    sample = torch.unique(owner[keep], return_inverse=True)[1]
    sums = torch.zeros(int(sample.max()) + 1, device=terms.device).index_add(0, sample, terms[keep])
    return (sums / torch.bincount(sample).float()).mean()


def make_trainer_class():
    import torch
    from trl import SFTTrainer

    from .common import left_pad
    from .ranker import score_batch

    class VerbalizerSFTTrainer(SFTTrainer):
        """SFT on the mixture; evaluation = verbalizer ranking of next-item validation prompts."""

        def __init__(self, *args, letter_ids: list[int], next_item_loss: str = "lm", loss_normalization: str = "token", **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False  # compute_loss returns a per-batch mean
            self.letter_ids = letter_ids
            self.letter_index = {tid: i for i, tid in enumerate(letter_ids)}
            self.next_item_loss, self.loss_normalization = next_item_loss, loss_normalization

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """The completion loss (`completion_loss`), with logits only at the positions that have labels.

            TRL's fused LM head multiplies by `lm_head.weight` directly, which bypasses PEFT's trainable index-token
            rows; the model's own head module applies them."""
            labels = inputs["labels"][:, 1:]
            positions = (labels != -100).any(0).nonzero().squeeze(-1)
            features = {k: v for k, v in inputs.items() if k != "labels"}
            outputs = model(**features, logits_to_keep=positions)
            rows = row_ids(inputs)[:, 1:][:, positions]
            loss = completion_loss(outputs.logits, labels[:, positions], rows, self.letter_ids, self.next_item_loss, self.loss_normalization)
            return (loss, outputs) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            device = inputs["input_ids"].device
            rows, gold = [], []
            for ids, labels in sequences(inputs):
                start = next(p for p, x in enumerate(labels) if x != -100)  # the first completion token: the answer letter
                rows.append(ids[:start])
                gold.append(self.letter_index[labels[start]])
            input_ids, mask = left_pad(rows, self.processing_class.pad_token_id, device)
            with torch.no_grad():
                scores = score_batch(model, input_ids, mask, self.letter_ids)
            return None, scores, torch.tensor(gold, device=device)

        def _save(self, output_dir=None, state_dict=None):
            # PEFT adds full copies of a resized embedding and head to every save ("auto"); the trained index-token
            # rows are already in trainable_tokens_delta, and `resize_embeddings` rebuilds the rest on load.
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=False)
            try:
                super()._save(output_dir, state_dict)
            finally:
                del model.save_pretrained

    return VerbalizerSFTTrainer


def last_checkpoint(folder: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    return Path(get_last_checkpoint(str(folder))) if folder.exists() and get_last_checkpoint(str(folder)) else None


def build_trainer(run: RunDir, ranker: RankerArguments, model_args: RankerModelConfig, training_args: RankerTrainingConfig, mixture: dict):
    """The configured VerbalizerSFTTrainer on the run's mixture (derived defaults already resolved)."""
    from accelerate import PartialState

    from .ranker import compute_metrics, disable_cpu_repack

    tokenizer, new_ids = ranker_tokenizer(model_args, run, mixture)
    if ranker.next_item_loss == "letters":
        check_letter_rows(run.task("train"), mixture["num_candidates"])
    by_token = index_texts(run) if ranker.index_token_init == "text" and new_ids else None
    model, peft_config, init = build_model(model_args, ranker, tokenizer, new_ids, PartialState().local_process_index, by_token)
    trainer = make_trainer_class()(model=model, args=training_args, train_dataset=run.task("train"), eval_dataset=run.eval_set("validation"),
                                   processing_class=tokenizer, peft_config=peft_config, compute_metrics=compute_metrics,
                                   letter_ids=mixture["letter_token_ids"], next_item_loss=ranker.next_item_loss,
                                   loss_normalization=ranker.loss_normalization)
    disable_cpu_repack(trainer.model)
    trainer.index_token_init = init
    return trainer, new_ids


LETTER_TASKS = ("next_item", "intent")


def check_letter_rows(rows, n: int) -> None:
    """`letters` finds a letter row by its completion (one candidate letter, then EOS): in this mixture exactly the
    next-item and intent rows must have one, or the loss would treat another row as a letter answer."""
    from .prompts import LETTERS

    letters = set(LETTERS[:n])
    for task, completion in zip(rows["task"], rows["completion"]):
        if (task in LETTER_TASKS) != (completion in letters):
            raise UlmrecError(f"train: --next_item_loss letters reads a row whose completion is one candidate letter as a letter answer, "
                              f"but a {task} row has the completion {completion!r}; use --next_item_loss lm for this mixture")


def index_texts(run: RunDir) -> dict[str, list[str]]:
    """Each index token's texts for `index_token_init: text`: the preferences of the users whose index holds it."""
    from .prompts import token_texts

    preferences = run.preferences(required=False)
    if not preferences:
        raise UlmrecError(f"train: --index_token_init text starts each index token from its users' preferences, and "
                          f"{run.path('preferences')} has none; run `ulmrec preferences` or use --index_token_init mean")
    return token_texts(run.index(), preferences, run.index_tokens())


def main(stage: StageArguments, ranker: RankerArguments, model_args: RankerModelConfig, training_args: RankerTrainingConfig) -> Path:
    run = RunDir(stage.run_dir)
    mixture = run.mixture()
    derived = resolve(model_args, training_args, run, mixture)
    inputs = ("tasks", "index") + (("preferences",) if ranker.index_token_init == "text" else ())  # text rows read the preferences
    if not run.begin("train", train_settings(ranker, model_args, training_args), stage.overwrite, inputs=inputs):
        return run.ranker
    trainer, new_ids = build_trainer(run, ranker, model_args, training_args, mixture)
    untrained, resume = fit(trainer, run, ranker)
    final = trainer.predict(trainer.eval_dataset, metric_key_prefix="eval")  # the kept model on validation, scores kept
    trainer.save_model(str(run.ranker))
    if not trainer.is_world_process_zero():
        return run.ranker
    config = {**base_record(model_args), "letter_token_ids": mixture["letter_token_ids"], "index_tokens": len(new_ids),
              "index_token_init": ranker.index_token_init if new_ids else None, "next_item_loss": ranker.next_item_loss,
              "loss_normalization": ranker.loss_normalization,
              "protocol": mixture["protocol"], "num_candidates": mixture["num_candidates"],
              "best_checkpoint": trainer.state.best_model_checkpoint, "best_validation_ndcg@10": trainer.state.best_metric}
    choice = checkpoint_choice(final.metrics, untrained, ranker)
    metrics = train_metrics(trainer, run, mixture, final.metrics, untrained, choice, resume, derived, ranker)
    save_ranker(trainer, run, config, metrics, final.predictions)
    model_card(config, mixture, metrics, training_args, model_args, run.user_text_provenance()).save(run.ranker_files.card)
    if choice["refused"]:
        raise UlmrecError(f"train: {choice['decision']}. The adapter is saved in {run.ranker} but the stage is not finished; "
                          "`ulmrec evaluate --zero_shot true` scores the untrained model, and `ulmrec train --allow_worse_than_untrained true` "
                          "(same settings) finishes the stage with this adapter, recorded in its model card")
    run.finish("train")
    logger.info("train: best validation NDCG@10 %.4f (untrained %s) -> %s", final.metrics.get("eval_ndcg@10", float("nan")),
                f"{untrained['untrained_ndcg@10']:.4f}" if untrained else "n/a", run.ranker)
    return run.ranker


def train_settings(ranker: RankerArguments, model_args: RankerModelConfig, training_args: RankerTrainingConfig) -> dict:
    return {"ranking": TIE_RULE, "ranker": settings_of(ranker), "model": settings_of(model_args),
            "training": {k: getattr(training_args, k) for k in TRAINING_SETTINGS if hasattr(training_args, k)}}


def fit(trainer, run: RunDir, ranker: RankerArguments) -> tuple[dict | None, Path | None]:
    """Score the untrained model (once), then train, resuming from the last checkpoint; (untrained metrics, resumed from)."""
    resume = last_checkpoint(run.checkpoints)
    untrained = untrained_metrics(trainer, run, ranker, resume)
    if resume and finished(resume):
        keep_finished(trainer, resume)
    else:
        if resume:
            logger.info("train: resuming from %s (step %s)", resume, resume.name.split("-")[-1])
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return untrained, resume


def train_metrics(trainer, run: RunDir, mixture: dict, best: dict, untrained: dict | None, choice: dict, resume: Path | None, derived: dict,
                  ranker: RankerArguments) -> dict:
    """What train_metrics.json records: the kept and untrained validation metrics, the decision, how training ran."""
    import torch

    options = {k: getattr(ranker, k) for k in ("next_item_loss", "loss_normalization", "index_token_init")}
    init = trainer.index_token_init
    options["index_rows_from_text"] = len(init[0]) if init else 0
    return {"untrained": untrained, "best": best, "choice": choice, "worse_than_untrained": choice["worse_than_untrained"], "protocol": mixture["protocol"],
            "training_options": options,
            "resumed_from": str(resume) if resume else None, "resumed_at_step": int(resume.name.split("-")[-1]) if resume else None,
            "derived_defaults": derived, "index_token_rows": token_row_change(trainer.model),
            "adapter_bytes": run.ranker_files.adapter.stat().st_size,
            "reload_check": reload_scores(trainer.model, trainer.processing_class, trainer.eval_dataset, mixture["letter_token_ids"]),
            "train_samples": len(trainer.train_dataset), "steps": trainer.state.global_step, "world_size": trainer.args.world_size,
            "distributed": distributed_record(trainer),
            "device": "cuda" if torch.cuda.is_available() else "cpu", "log_history": trainer.state.log_history}


def save_ranker(trainer, run: RunDir, config: dict, metrics: dict, validation_scores) -> None:
    """ranker_config.json, train_metrics.json, the kept model's validation scores (evaluate reuses them), the tokenizer
    and the index tokens' text rows (`index_token_init: text`)."""
    import torch

    from .prompts import prompts_digest

    files = run.ranker_files
    if trainer.index_token_init is not None:
        from safetensors.torch import save_file

        ids, rows = trainer.index_token_init
        save_file({"token_ids": torch.tensor(ids), "rows": rows.contiguous()}, str(files.index_token_init))
    write_json(files.config, config)
    write_json(files.train_metrics, metrics)
    write_json(files.validation_scores, {"prompts_sha256": prompts_digest(trainer.eval_dataset["prompt"]), "scores": validation_scores.tolist()})
    trainer.processing_class.save_pretrained(str(run.ranker))


def checkpoint_choice(best: dict, untrained: dict | None, ranker: RankerArguments) -> dict:
    """Whether the kept adapter beats the untrained model on validation NDCG@10 (the same tie rule), and what was decided."""
    if untrained is None:
        return {"worse_than_untrained": None, "refused": False, "decision": "not compared with the untrained model (eval_before_training false)"}
    kept, base = best.get("eval_ndcg@10", float("nan")), untrained["untrained_ndcg@10"]
    worse = not kept >= base
    if not worse:
        decision = f"kept adapter beats or ties the untrained model on validation NDCG@10 ({kept:.4f} >= {base:.4f})"
    elif ranker.allow_worse_than_untrained:
        decision = f"kept adapter is WORSE than the untrained model on validation NDCG@10 ({kept:.4f} < {base:.4f}), kept as allowed by allow_worse_than_untrained"
    else:
        decision = f"the kept adapter is WORSE than the untrained model on validation NDCG@10 ({kept:.4f} < {base:.4f})"
    if worse:
        logger.warning("train: %s", decision)
    return {"worse_than_untrained": worse, "refused": worse and not ranker.allow_worse_than_untrained, "decision": decision}


def finished(checkpoint: Path) -> bool:
    """Whether training had reached its last step at this checkpoint (resuming there would train one step more when
    max_steps ends inside an epoch)."""
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    return state.max_steps > 0 and state.global_step >= state.max_steps


def keep_finished(trainer, checkpoint: Path) -> None:
    """Training already ended at `checkpoint`: take its state and load the best checkpoint's adapter, as training's end does."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    best = Path(trainer.state.best_model_checkpoint or checkpoint)
    if not best.exists():  # checkpoints moved with the run directory: the same name under this run's checkpoints
        best = checkpoint.parent / best.name
    logger.info("train: training finished at %s; keeping %s without another step", checkpoint, best)
    set_peft_model_state_dict(trainer.model, load_file(str(RankerFolder(best).adapter)))


def untrained_metrics(trainer, run: RunDir, ranker: RankerArguments, resume) -> dict | None:
    """Validation scores of the untrained model, computed once: a resumed run reads them back, or computes them before
    the checkpoint is loaded (the trainer's model is still the untrained one then)."""
    from .common import read_json

    path = run.ranker_files.untrained_metrics
    if not ranker.eval_before_training:
        return None
    if path.exists():
        return read_json(path)
    if resume:
        logger.info("train: resuming without the untrained model's validation scores; computing them first")
    metrics = trainer.evaluate(metric_key_prefix="untrained")
    if trainer.is_world_process_zero():
        write_json(path, metrics)
    return metrics


def distributed_record(trainer) -> dict:
    """How training ran across processes: accelerate's distributed type and how many parameters were sharded (DTensor)."""
    from torch.distributed.tensor import DTensor

    params = list(trainer.model_wrapped.parameters())
    return {"type": str(trainer.accelerator.distributed_type).split(".")[-1], "processes": trainer.accelerator.num_processes,
            "sharded_parameters": sum(isinstance(p, DTensor) for p in params), "parameters": len(params)}


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
