"""Prompts and the tokenizer facts they rely on: templates, prompt fitting, answer-letter ids, index tokens.

`tasks` builds prompts with these helpers, and `recommend` and `explain` build theirs with the same ones from the tasks
stage's recorded settings (`build_builder`, `eval_row`); `train`, `ranker` and `recommend` use the same ones to add index
tokens, resize the embeddings and read the letter logits, so that training, scoring and serving agree token for token.
"""

import hashlib
import json
import random
import string

from .common import UlmrecError

HEADER = "### Instruction:\n{instruction}\n### Input:\n{body}\n### Response:\n"
INSTRUCTIONS = {
    "next_item": "Given the user and their purchase history in chronological order, choose the item the user will buy next. Answer with the candidate's letter.",
    "index_to_preference": "Describe the preferences of this user in one sentence.",
    "preference_to_index": "Which user has this preference? Answer with the user's index.",
    "history_to_index": "Which user has this purchase history? Answer with the user's index.",
    "rating": "Predict the star rating (1-5) the user gives to the next item. Answer with the number.",
    "intent": "Choose the candidate that best matches the user's intention. Answer with the candidate's letter.",
}
LETTERS = string.ascii_uppercase


class PromptBuilder:
    """Builds prompts that fit `max_length` tokens (with the answer), titles cut to `title_max_tokens`.

    Too long a prompt loses its oldest history lines first; candidates and the answer are never cut."""

    def __init__(self, tokenizer, titles: dict[int, str], max_length: int, history_len: int, title_max_tokens: int,
                 instructions: dict[str, str] | None = None):
        self.tok, self.max_length, self.history_len = tokenizer, max_length, history_len
        self.instructions = {**INSTRUCTIONS, **(instructions or {})}
        ids = tokenizer([t or f"item {i}" for i, t in titles.items()], add_special_tokens=False).input_ids if titles else []
        self.titles = {item: tokenizer.decode(t[:title_max_tokens]).strip() for item, t in zip(titles, ids)}
        self.line_tokens: dict[str, int] = {}

    def n_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False).input_ids)

    def prompt(self, task: str, parts: dict, history: list[str] | None = None, answer_tokens: int = 8) -> str:
        """Fill the template; drop the oldest history lines until prompt + answer fit."""
        history = list(history or [])[-self.history_len:] if self.history_len else []
        budget = self.max_length - answer_tokens
        while True:
            text = HEADER.format(instruction=self.instructions[task], body="\n".join(self.sections(parts, history)))
            over = self.n_tokens(text) - budget
            if over <= 0:
                return text
            if not history:
                raise UlmrecError(f"tasks: a {task} prompt needs {budget + over} tokens without any history, more than "
                                  f"max_length={self.max_length} allows; raise max_length or lower title_max_tokens")
            drop = 1  # drop as many of the oldest lines as their token counts say, then check the real length again
            while drop < len(history) and sum(self.count(line) for line in history[:drop]) < over:
                drop += 1
            history = history[drop:]

    def count(self, line: str) -> int:
        if line not in self.line_tokens:
            self.line_tokens[line] = self.n_tokens(line + "\n")
        return self.line_tokens[line]

    @staticmethod
    def sections(parts: dict, history: list[str]):
        for key in ("user", "preference"):
            if parts.get(key):
                yield f"{key.capitalize()}: {parts[key]}"
        if history:
            yield "History:\n" + "\n".join(history)
        for key in ("target", "candidates"):
            if parts.get(key):
                yield parts[key]

    def history_lines(self, items: list[int], ratings: list[float] | None = None) -> list[str]:
        return [f"- {self.titles[item]}" + (f" ({ratings[n]:g} stars)" if ratings else "") for n, item in enumerate(items)]

    def candidate_block(self, candidates: list[int]) -> str:
        return "Candidates:\n" + "\n".join(f"({LETTERS[i]}) {self.titles[c]}" for i, c in enumerate(candidates))


def build_builder(tokenizer, titles: dict[int, str], settings: dict) -> PromptBuilder:
    """The PromptBuilder of the tasks stage's settings (`TaskArguments` as a dict, or as a finished run recorded them)."""
    instructions = {t: settings[f"instruction_{t}"] for t in INSTRUCTIONS}
    return PromptBuilder(tokenizer, titles, settings["max_length"], settings["history_len"], settings["title_max_tokens"], instructions)


def next_item_row(builder: PromptBuilder, user_field: str | None, history: list[int], cands: list[int], target: int | None,
                  task: str = "next_item", preference: str | None = None, **extra) -> dict:
    parts = {"user": user_field, "preference": preference, "candidates": builder.candidate_block(cands)}
    prompt = builder.prompt(task, parts, builder.history_lines(history) if history else [])
    pos = cands.index(target) if target in cands else -1  # -1 only when serving a user the retriever missed
    return {"prompt": prompt, "completion": LETTERS[pos] if pos >= 0 else "", "task": task, "candidates": cands, "target": target,
            "target_position": pos, **extra}


def eval_row(builder: PromptBuilder, eval_order: str, r: dict, user_field: str | None, eval_seed: int, split: str, with_history: bool = True) -> dict:
    """The next-item prompt of one validation/test candidate row (serving builds the same one)."""
    cands = list(r["candidates"])
    if eval_order == "shuffled":
        random.Random(f"{eval_seed}-{split}-{r['user_id']}").shuffle(cands)
    score = dict(zip(r["candidates"], r["scores"]))
    return next_item_row(builder, user_field, r["history"] if with_history else [], cands, r["target"], user_id=r["user_id"],
                         retriever_scores=[score[c] for c in cands], retriever_rank=r["target_rank"])


def letter_ids(tokenizer, prompt: str, n: int) -> list[int]:
    """Token id of each answer letter exactly as it tokenizes after `prompt` (the letter alone, never a "▁A" variant)."""
    base = tokenizer(prompt, add_special_tokens=False).input_ids
    ids = []
    for letter in LETTERS[:n]:
        full = tokenizer(prompt + letter, add_special_tokens=False).input_ids
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise UlmrecError(f"the answer letter {letter!r} is not a single token after the prompt for this tokenizer")
        ids.append(full[-1])
    return ids


def add_index_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Add the user-index tokens (e.g. `<a_12>`) as single, unnormalised tokens; returns their ids."""
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, single_word=False, normalized=False) for t in tokens])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    for token, tid in zip(tokens, ids):
        if tokenizer(token, add_special_tokens=False).input_ids != [tid]:
            raise UlmrecError(f"index token {token} does not tokenize to one id")
    return ids


def resize_embeddings(model, size: int) -> None:
    """Grow the input embedding (and an untied head) to `size` rows, the new rows the same every time.

    transformers' default resize draws the new rows at random, so an adapter that holds only the trained rows
    would reload onto different untrained rows. Here each new row is the mean of the old rows plus
    noise from a generator seeded by the new size, so loading rebuilds exactly what training started from."""
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    if size == old:
        return
    model.resize_token_embeddings(size, mean_resizing=False)
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    seen = set()
    with torch.no_grad():
        for module in modules:
            if module is None or id(module.weight) in seen or module.weight.shape[0] != size:
                continue
            seen.add(id(module.weight))
            w = module.weight
            base = w[:old].float()
            noise = torch.randn(size - old, w.shape[1], generator=torch.Generator().manual_seed(size))
            w[old:] = (base.mean(0) + 0.01 * base.std(0) * noise).to(w.device, w.dtype)


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the vocabulary does: recorded by `tasks`, checked by `train` and `evaluate`."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab]).encode()).hexdigest()[:16]


def prompts_digest(prompts: list[str]) -> str:
    """Identifies a list of prompts (evaluate reuses training's validation scores only for the same prompts)."""
    return hashlib.sha256("\x00".join(prompts).encode()).hexdigest()
