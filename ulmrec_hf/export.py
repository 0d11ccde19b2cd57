"""`ulmrec export`: a trained ranker as a full model directory that servers load.

vLLM's multi-LoRA serving takes no adapter that adds vocabulary, so a ranker with index tokens is served from a full
model: the base with the LoRA merged in, the index-token rows in place, and the tokenizer with the index tokens.
`AutoModelForCausalLM.from_pretrained(DIR)` loads it. `ulmrec_export.json` beside it holds what a server needs to score
(the answer-letter ids, the prompt template and instructions, the protocol and the tie rule) and how far the export
agrees with the ranker as trained on the validation prompts. A QLoRA ranker is merged into a bf16 base, as
`evaluate --merge_adapter` does: a different model from the 4-bit one that validation selected, hence the agreement.
"""

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .common import RunArguments, UlmrecError, read_json, write_json
from .layout import CARD, EXPORT_FILE, RankerFolder, RunDir

logger = logging.getLogger(__name__)


@dataclass
class ExportArguments:
    _argument_group_name = "export"
    output: str | None = field(default=None, metadata={"help": "Model directory to write (default: <run_dir>/export)."})
    dtype: str | None = field(default=None, metadata={"help": "Weights dtype (default: the dtype the ranker trained in; bfloat16 for a QLoRA ranker).",
                                                      "choices": ["bfloat16", "float32"]})
    check_users: int | None = field(default=None, metadata={"help": "Validation users scored to compare the export with the ranker as trained (default: all)."})
    batch_size: int = field(default=8, metadata={"help": "Users scored at once in that comparison."})


ARGUMENTS = (RunArguments, ExportArguments)


def export_dir(run: RunDir, args: ExportArguments) -> Path:
    return Path(args.output) if args.output else run.export


def export_dtype(config: dict, dtype: str | None) -> str:
    if dtype:
        return dtype
    return "bfloat16" if config["quantization"] != "none" or config["dtype"] != "float32" else "float32"


def merge_note(config: dict, dtype: str) -> str:
    if config["quantization"] != "none":
        return (f"The adapter was trained on a 4-bit NF4 base ({config['quantization']}); it is merged here into a {dtype} base, "
                "as `ulmrec evaluate --merge_adapter` does: a different model from the 4-bit one that validation selected.")
    return f"The adapter was trained on a {config['dtype']} base and is merged into a {dtype} copy of it."


def prepare_output(out: Path) -> None:
    """An earlier export is replaced; any other non-empty folder is left alone."""
    if out.exists() and any(out.iterdir()):
        if not (out / EXPORT_FILE).exists():
            raise UlmrecError(f"export: {out} exists and holds no earlier export ({EXPORT_FILE}); choose an empty or new --output")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def as_trained_scores(ranker: Path, prompts: list[str], n: int, batch_size: int) -> tuple[np.ndarray, str]:
    """The ranker's own scores on the first n prompts: those training saved for the kept model when it scored the same
    prompts, else scored here on the base as trained."""
    from .prompts import prompts_digest
    from .ranker import load_ranker, score_prompts

    saved = RankerFolder(ranker).validation_scores
    if saved.exists():
        record = read_json(saved)
        if record["prompts_sha256"] == prompts_digest(prompts):
            return np.array(record["scores"][:n], dtype=np.float32), f"from training ({saved})"
    model, tokenizer, config = load_ranker(ranker)
    return score_prompts(model, tokenizer, prompts[:n], config["letter_token_ids"], batch_size, progress="scoring validation (as trained)"), "scored here"


def compare(run: RunDir, out: Path, config: dict, dtype: str, args: ExportArguments) -> dict:
    """Validation scores of the written folder (loaded with plain transformers) against the ranker as trained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .metrics import agreement, score_metrics
    from .ranker import default_device, score_prompts

    validation = run.eval_set("validation")
    n = len(validation) if args.check_users is None else min(args.check_users, len(validation))
    prompts, gold = validation["prompt"][:n], np.array(validation["target_position"][:n])
    reference, source = as_trained_scores(run.ranker, validation["prompt"], n, args.batch_size)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype)).to(default_device())
    tokenizer = AutoTokenizer.from_pretrained(out)
    scores = score_prompts(model, tokenizer, prompts, config["letter_token_ids"], args.batch_size, progress="scoring validation (export)")
    ndcg = {name: score_metrics(s, gold, ks=(10,))["rank"]["ndcg@10"] for name, s in (("as_trained", reference), ("export", scores))}
    return {"compared_with": f"{config['quantization']}, {config['dtype']} (as trained; scores {source})", **agreement(reference, scores),
            "max_abs_score_difference": float(np.abs(reference - scores).max()), "validation_rank_ndcg@10": ndcg}


def record(run: RunDir, config: dict, dtype: str, check: dict) -> dict:
    from . import __version__
    from .llm import hub_model_id
    from .metrics import TIE_RULE
    from .prompts import HEADER, LETTERS

    tasks = run.prompt_settings()
    return {"ulmrec_hf": __version__, "ranker": str(run.ranker), "base_model": config["base_model"], "base_model_hub_id": hub_model_id(config["base_model"]),
            "trained_as": {"quantization": config["quantization"], "dtype": config["dtype"]}, "dtype": dtype, "merge": merge_note(config, dtype),
            "letters": list(LETTERS[:config["num_candidates"]]), "letter_token_ids": config["letter_token_ids"], "num_candidates": config["num_candidates"],
            "index_tokens": config["index_tokens"], "padding_side": "left", "prompt_template": HEADER,
            "instructions": {name[len("instruction_"):]: value for name, value in tasks.items() if name.startswith("instruction_")},
            "prompt": {key: tasks[key] for key in ("history_len", "max_length", "title_max_tokens")},
            "protocol": config["protocol"], "tie_rule": TIE_RULE, "validation_check": check}


def main(run_args: RunArguments, args: ExportArguments) -> Path:
    from transformers import AutoTokenizer

    from .ranker import load_ranker
    from .cards import card_export, run_card

    run = RunDir(run_args.run_dir)
    config = run.ranker_config()
    dtype = export_dtype(config, args.dtype)
    out = export_dir(run, args)
    prepare_output(out)
    logger.info("export: merging %s into a %s copy of %s -> %s", run.ranker, dtype, config["base_model"], out)
    model, _, _ = load_ranker(run.require("train"), merge=True, merge_dtype=dtype)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(run.ranker, padding_side="left").save_pretrained(out)  # a given padding side is saved
    del model
    info = record(run, config, dtype, compare(run, out, config, dtype, args))
    write_json(out / EXPORT_FILE, info)
    run_card(run, export=card_export(info)).save(out / CARD)
    check = info["validation_check"]
    print(f"export: {out} ({dtype}); on {check['users']} validation users top-1 identical {check['top1_identical']:.3f}, "
          f"top-10 identical {check['top10_identical']:.3f}, largest score difference {check['max_abs_score_difference']:.2g}")
    return out
