"""Prompts and the tokenizer facts they rely on: templates, prompt fitting, answer-letter ids, index tokens.

`tasks` builds prompts with these helpers, and `recommend` and `explain` build theirs with the same ones from the tasks
stage's recorded settings (`build_builder`, `eval_row`); `train`, `ranker` and `recommend` use the same ones to add index
tokens, resize the embeddings and read the letter logits, so that training, scoring and serving agree token for token.
"""

import hashlib
import json
import random
import re
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


def permutation(n: int, key: str) -> list[int]:
    """A seeded order of n positions (the same for the same key)."""
    order = list(range(n))
    random.Random(key).shuffle(order)
    return order


def user_key(eval_seed: int, split: str, user_id) -> str:
    """What seeds one user's candidate orders in a split: the shuffled protocol's order and the extra scoring orders
    (evaluation and serving both read it here, so they cannot drift)."""
    return f"{eval_seed}-{split}-{user_id}"


def eval_row(builder: PromptBuilder, eval_order: str, r: dict, user_field: str | None, eval_seed: int, split: str, with_history: bool = True) -> dict:
    """The next-item prompt of one validation/test candidate row (serving builds the same one)."""
    cands = list(r["candidates"])
    if eval_order == "shuffled":
        random.Random(user_key(eval_seed, split, r["user_id"])).shuffle(cands)
    score = dict(zip(r["candidates"], r["scores"]))
    return next_item_row(builder, user_field, r["history"] if with_history else [], cands, r["target"], user_id=r["user_id"],
                         retriever_scores=[score[c] for c in cands], retriever_rank=r["target_rank"])


RESPONSE = "\n### Response:\n"


def permuted_prompt(prompt: str, order: list[int]) -> str:
    """The same prompt with its candidate lines shown in `order` (position i shows the line that was at order[i]),
    relettered A, B, ...; the rest of the prompt is unchanged."""
    head, found, block = prompt.rpartition("Candidates:\n")
    lines, start = [], 0
    for i in range(1, len(order) + 1):
        end = block.find(f"\n({LETTERS[i]}) ", start) if i < len(order) else block.rfind(RESPONSE)
        lines.append(block[start:end].removeprefix(f"({LETTERS[i - 1]}) "))
        start = end + 1
    if not found or "".join(f"({LETTERS[i]}) {t}\n" for i, t in enumerate(lines)) + RESPONSE[1:] != block:
        raise UlmrecError(f"a prompt's candidate block does not hold {len(order)} lettered lines followed by the response header:\n{prompt}")
    return head + found + "\n".join(f"({LETTERS[i]}) {lines[o]}" for i, o in enumerate(order)) + RESPONSE


def with_user_field(prompt: str, own: str, other: str) -> str:
    """The same prompt with the user field `own` replaced by `other`."""
    line = f"### Input:\nUser: {own}\n"
    if prompt.count(line) != 1:
        raise UlmrecError(f"the prompt has no user field {own!r}:\n{prompt}")
    return prompt.replace(line, f"### Input:\nUser: {other}\n")


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


def token_texts(index: dict[str, str], texts: dict[str, str], tokens: list[str]) -> dict[str, list[str]]:
    """Each index token's texts: those of the users whose index holds it, users in sorted order (a fixed order)."""
    out = {t: [] for t in tokens}
    for user in sorted(index):
        if texts.get(user):
            for token in re.findall(r"<[^<>]+>", index[user]):
                if token in out:
                    out[token].append(texts[user])
    return out


def text_rows(model, tokenizer, by_token: dict[str, list[str]]) -> dict:
    """float32 rows for the tokens that have texts: the mean over their texts of each text's mean input-embedding row
    (the base's rows of the text's own tokens), computed on the CPU in a fixed order so that it is the same every time."""
    import torch

    weight = model.get_input_embeddings().weight
    unique = sorted({t for texts in by_token.values() for t in texts})
    ids = tokenizer(unique, add_special_tokens=False).input_ids if unique else []
    with torch.no_grad():
        vectors = {text: weight[torch.tensor(i, device=weight.device)].float().cpu().mean(0) for text, i in zip(unique, ids) if i}
    return {token: torch.stack([vectors[t] for t in texts if t in vectors]).mean(0) for token, texts in by_token.items()
            if any(t in vectors for t in texts)}


def set_rows(model, token_ids: list[int], rows) -> None:
    """Put `rows` in the input embedding at `token_ids` (a tied LM head shares them; an untied one keeps its rows)."""
    import torch

    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[torch.tensor(token_ids, device=weight.device)] = rows.to(weight.device, weight.dtype)


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the vocabulary does: recorded by `tasks`, checked by `train` and `evaluate`."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab]).encode()).hexdigest()[:16]


def prompts_digest(prompts: list[str]) -> str:
    """Identifies a list of prompts (evaluate reuses training's validation scores only for the same prompts)."""
    return hashlib.sha256("\x00".join(prompts).encode()).hexdigest()
