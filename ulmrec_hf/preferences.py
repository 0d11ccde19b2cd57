"""Preference stage: one sentence of each user's preferences, written by an LLM from their reviews.

Backends: `openai` (any OpenAI-compatible endpoint), `local` (an HF causal LM, SmolLM2 offline by default), `import`
(a precomputed user -> preference file) and `offline-keywords` (a deterministic, labelled, model-free fallback).

Requests to an endpoint are sized and paced for real servers and real bills:
- every request carries `max_tokens` (64 tokens, one sentence; 96 in chat mode, room for an introduction before it);
  prefill and completion requests stop at a line break and the client keeps the first sentence (by `sentences()`, so
  "D.R. Strings" or "e.g." do not end it); chat and json_schema requests send no stop sequence (an introduction may sit
  on a line of its own; a line break may sit inside the JSON) and the client judges the reply's first paragraph, or an
  introduction and the paragraph after it. An answer cut off by `max_tokens` counts as invalid, and so do an
  introduction without content ("The user's preferences are:") and lists;
- a retry after an invalid answer changes the request (a higher temperature and a seed), since the same request at
  temperature 0 returns the same answer; there are at most `invalid_retries` of them (transport errors get `max_retries`),
  and none after the server returned the same invalid answer twice (a server that ignores temperature and seed);
- a timed-out request is still running on the server, so a timeout halves the number of requests in flight (it grows
  back one per `concurrency` answers) and its retry waits at least `request_timeout`;
- tokens and requests are counted in `summary.json`, and `token_budget` stops a run before it would spend more.
Small open models rarely answer a plain chat request with one bare sentence, so the `openai` backend asks in the way the
server allows (`answer_mode`, chosen once per run from GET /v1/models unless the recipe sets it, and recorded): a chat
whose answer starts with `response_prefix` and is continued by the server (`prefill`), a JSON-schema `response_format`
(`json_schema`), a /v1/completions prompt rendered by the model's own chat template (`completion`), or a plain chat.
An introduction followed by exactly one valid sentence, or a one-item list, is reduced to that sentence and labelled
`salvaged`; two sentences, several items or an echo of a review stay invalid. No other request goes out until the
first `concurrency` requests (at least 2) have come back; when every one of them got the same client error (400, 401,
403, 404, 422 with the same message) and none was answered, the stage stops with the server's own message (and the
served models, when the model name is the cause). Otherwise, and once any answer has arrived, a client error fails only
its user. `failures.json` keeps each failed user's reason and last rejected answer; the API key is redacted from every
server message.
Every answer is appended (fsync'd) to the named cache `cache/preferences/responses.jsonl`, keyed by user, endpoint,
model, messages, answering mode and sampling settings, so a killed or budget-stopped run resumes without asking
anything twice. Stored answers are read back in whichever answering mode they were made (recorded per user). A user
whose answers stayed invalid through every retry is recorded there too, and is not asked again unless
`--retry_failed true` (timeouts and server errors are not recorded: they may pass). Re-running costs nothing.
"""

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .common import StageArguments, UlmrecError, file_digest, read_preference_file, settings_of, text_lines, write_json
from .layout import RunDir
from .split import IMPORTED, text_scope, user_view

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You summarise shoppers' tastes from their product reviews."
DEFAULT_PROMPT = (
    "Here are a user's product reviews, newest first, each with its star rating where known:\n{reviews}\n\n"
    "In one sentence, state this user's preferences (what they like and dislike). Answer with the sentence only."
)
OFFLINE_LABEL = "[offline-keywords]"
ANSWER_MODES = ["auto", "chat", "prefill", "json_schema", "completion"]
PREFILL_SERVERS = {"vllm": "vLLM", "sglang": "SGLang", "llamacpp": "llama.cpp", "library": "Ollama"}  # by /v1/models owned_by
CLIENT_ERRORS = (400, 401, 403, 404, 422)  # the request itself may be wrong, whichever user it is for
SENTENCE_TOKENS, CHAT_TOKENS = 64, 96  # default max_tokens: one sentence; in chat mode an introduction may come first
ANSWER_SCHEMA = {"type": "json_schema", "json_schema": {"name": "preference", "strict": True, "schema": {
    "type": "object", "properties": {"preference": {"type": "string"}}, "required": ["preference"], "additionalProperties": False}}}
KEEP_CHARS = 300  # of a rejected answer or a server message, in failures.json, the cache and errors
INTROS = (re.compile(r"^(sure|certainly|of course|okay|absolutely)[!.]\s+", re.I),
          re.compile(r"^here('s| is| are)\b[^.!?:]{0,160}[.!?:]\s+", re.I),
          re.compile(r"^[^.!?:]{0,160}\b(here|sentence|summary|answer|preferences?|tastes?|likes and dislikes|based on)\b[^.!?:]{0,160}:\s*(?=\S)", re.I))
NUMBERED = re.compile(r"(^|\s)\d[.)]\s")
BULLET = re.compile(r"^[-*•]\s")
STOPWORDS = set("""a about after all also am an and any are as at be because been but by can could did do does for from
get got had has have he her him his how i if in into is it its just like love me more most my no not of on one only or
our out so some than that the their them then there these they this to too up us very was we well were what when which
who will with would you your really great good product use used using bought buy works work much make made even well""".split())


@dataclass
class PreferenceArguments:
    _argument_group_name = "preferences"
    _operational = ('api_key_env', 'concurrency', 'request_timeout', 'max_retries', 'invalid_retries', 'backoff_base', 'backoff_max',
                    'token_budget', 'batch_size', 'retry_failed')  # fields that do not change the output (left out of the recorded settings)
    backend: str = field(default="offline-keywords", metadata={"help": "Where sentences come from.", "choices": ["openai", "local", "import", "offline-keywords"]})
    model: str = field(default="gpt-3.5-turbo", metadata={"help": "Model name (openai) or HF id/path/'smollm2' (local)."})
    base_url: str | None = field(default=None, metadata={"help": "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM)."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Environment variable that holds the API key."})
    import_file: str | None = field(default=None, metadata={"help": "For `import`: JSON {user: sentence} or JSONL with user/preference."})
    input: str = field(default="reviews", metadata={"help": "User text given to the LLM.", "choices": ["reviews", "titles"]})
    system_prompt: str = field(default=DEFAULT_SYSTEM, metadata={"help": "System message."})
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "Prompt template with {reviews}."})
    review_token_budget: int = field(default=768, metadata={"help": "Review text per prompt, in estimated tokens (4 characters each); newest first."})
    max_tokens: int | None = field(default=None, metadata={"help": f"Answer length cap sent with every request; a longer answer is cut off and rejected. Default {SENTENCE_TOKENS} (one sentence), {CHAT_TOKENS} in chat mode (an introduction may come before the sentence)."})
    stop: list[str] | None = field(default=None, metadata={"help": "Stop sequences sent with every request. Default: a line break in prefill and completion modes (the answer continues one sentence), none in chat mode (an introduction may sit on a line of its own) and never any in json_schema mode."})
    retry_failed: bool = field(default=False, metadata={"help": "Ask again the users whose answers stayed invalid in an earlier run (recorded in the cache)."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature of a first request."})
    retry_temperature: float = field(default=0.7, metadata={"help": "Temperature of a retry after an invalid answer (which also sends a seed)."})
    seed: int = field(default=42, metadata={"help": "Seed sent with retries after invalid answers (plus the attempt number), and of the backoff jitter."})
    concurrency: int = field(default=8, metadata={"help": "Most requests in flight at once (openai); halved after a timeout."})
    request_timeout: float = field(default=60.0, metadata={"help": "Seconds before a request is abandoned; its retry waits at least as long."})
    max_retries: int = field(default=5, metadata={"help": "Retries per user after timeouts, rate limits and server errors."})
    invalid_retries: int = field(default=2, metadata={"help": "Retries after invalid answers (each with the retry temperature and a new seed): a prompt the model keeps failing does not pass on the fifth paid try."})
    backoff_base: float = field(default=1.0, metadata={"help": "First backoff in seconds; doubles each retry, with jitter."})
    backoff_max: float = field(default=60.0, metadata={"help": "Longest single wait, Retry-After included."})
    token_budget: int | None = field(default=None, metadata={"help": "Most tokens (prompt + completion, counted and reserved) this run may spend; the stage stops before it would exceed them and resumes from the cache next time."})
    max_chars: int = field(default=500, metadata={"help": "Longer answers are rejected (and retried)."})
    batch_size: int = field(default=8, metadata={"help": "Users generated at once (local)."})
    response_prefix: str = field(default="The user prefers", metadata={"help": "Start of the answer that the model continues (small models answer in sentences then): the local backend, and the openai backend's prefill and completion modes."})
    answer_mode: str = field(default="auto", metadata={"help": "How the openai backend asks: 'chat' (plain chat), 'prefill' (the server continues an assistant message holding response_prefix: vLLM, SGLang, llama.cpp, Ollama), 'json_schema' (a JSON-schema response_format), 'completion' (/v1/completions with the prompt rendered by the chat template of --tokenizer), or 'auto' (chosen once per run from GET /v1/models; recorded in summary.json).", "choices": ANSWER_MODES})
    tokenizer: str | None = field(default=None, metadata={"help": "For answer_mode completion: HF id or folder whose chat template renders the prompt (default: --model)."})
    fallback: str = field(default="none", metadata={"help": "For users still without a sentence: 'none' (fail and list them) or 'offline-keywords' (labelled, counted).", "choices": ["none", "offline-keywords"]})
    max_users: int | None = field(default=None, metadata={"help": "Only the first N users (for trials)."})
    include_heldout_text: bool = field(default=False, metadata={"help": "Also read the reviews, ratings and titles of each user's validation and test interactions (only to reproduce an artifact built that way; recorded)."})


ARGUMENTS = (StageArguments, PreferenceArguments)


class AnswerError(Exception):
    """An answer that arrived but is unusable (empty, cut off, too long, an echo of the prompt); keeps the answer."""

    def __init__(self, message: str, answer: str | None = None):
        super().__init__(message)
        self.answer = answer


class ShapeError(AnswerError):
    """An answer that is not one bare sentence (an introduction, a list, several sentences): maybe salvageable."""


class EchoError(AnswerError):
    """An answer that repeats the prompt (a review, a rating): never salvaged."""


class BudgetExhausted(Exception):
    """The next request would take the run past its token budget."""


class StageStop(Exception):
    """Every request of the first window got the same client error and none was answered: the stage stops."""

    def __init__(self, error: Exception, count: int):
        super().__init__(describe(error))
        self.error, self.count = error, count


class UserFailure(Exception):
    """A user left without a sentence: why, the last rejected answer, and whether the cache remembers it."""

    def __init__(self, reason: str, last_answer: str | None, remember: bool):
        super().__init__(reason)
        self.reason, self.last_answer, self.remember = reason, last_answer, remember


def user_text(row: dict, source: str, titles: dict, budget_chars: int) -> tuple[str, dict]:
    """The newest reviews (or history titles) that fit the budget; returns the text and what was cut."""
    if source == "titles":
        entries = [f"- {titles.get(i) or f'item {i}'}" for i in reversed(row["items"])]
    else:
        ratings = row.get("ratings") or [None] * len(row["reviews"])
        entries = [f"- ({r:g} stars) {t.strip()}" if r else f"- {t.strip()}"
                   for t, r in zip(reversed(row["reviews"]), reversed(ratings)) if t and t.strip()]
    kept, used = [], 0
    for entry in entries:
        if kept and used + len(entry) > budget_chars:
            break
        kept.append(entry[:budget_chars])
        used += len(kept[-1]) + 1
    return "\n".join(kept), {"entries_used": len(kept), "entries_total": len(entries)}


def validate_answer(text: str | None, prompt: str, max_chars: int) -> str:
    """The answer as one clean sentence; raises AnswerError (ShapeError when only its shape is wrong)."""
    text = re.sub(r"\s+", " ", text or "").strip().strip('"').strip()
    if not text:
        raise AnswerError("empty answer")
    if len(re.findall(r"[A-Za-z]{2,}", text)) < 4:
        raise AnswerError("answer too short to state a preference", text)
    if re.search(r"\(\d(\.\d)? stars\)", text) or any(ln in text or (len(text) > 40 and text in ln) for ln in prompt_lines(prompt)):
        raise EchoError("answer echoes the prompt", text)
    if len(text) > max_chars:
        raise AnswerError(f"answer longer than {max_chars} characters", text)
    if text.endswith(":") or NUMBERED.search(text) or BULLET.match(text) or any(p.match(text) for p in INTROS):
        raise ShapeError("a list or an introduction, not one sentence", text)
    if len(sentences(text)) > 1:
        raise ShapeError("more than one sentence", text)
    return text


def prompt_lines(prompt: str) -> list[str]:
    """The prompt's lines longer than 40 characters, as an answer would repeat them: a review without its "- (N stars) " or
    "- " marker, whitespace collapsed."""
    lines = (re.sub(r"\s+", " ", re.sub(r"^\s*-\s+(\(\d(\.\d)? stars\)\s*)?", "", ln)).strip() for ln in prompt.splitlines())
    return [ln for ln in lines if len(ln) > 40]


def sentences(text: str) -> list[str]:
    """Split after a word's full stop, question or exclamation mark followed by a capital ("D.R. Strings" stays whole)."""
    return re.split(r"(?<=[a-z]{2}[.!?])\s+(?=[A-Z])", text)


def salvage(text: str) -> str | None:
    """The answer without its introduction and one-item list marker; None when it is a list of several items."""
    text = re.sub(r"\s+", " ", text or "").strip().strip('"').strip()
    for _ in range(3):  # "Sure! Here is the sentence: ..." has two
        match = next((m for m in (p.match(text) for p in INTROS) if m), None)
        if match is None:
            break
        text = text[match.end():]
    item = re.match(r"^(\d[.)]|[-*•])\s+(.*)$", text)
    if item:
        text = item.group(2)
        if NUMBERED.search(text) or re.search(r"\s[-*•]\s", text):
            return None
    return text.strip() or None


def accept_answer(text: str | None, prompt: str, max_chars: int) -> tuple[str, bool]:
    """The answer's one sentence, and whether it was salvaged from an introduction or a one-item list."""
    try:
        return validate_answer(text, prompt, max_chars), False
    except ShapeError as error:
        sentence = salvage(text)
        if sentence and sentence != error.answer:
            try:
                return validate_answer(sentence, prompt, max_chars), True
            except EchoError:
                raise EchoError("answer echoes the prompt", error.answer) from None
            except AnswerError:
                pass
        raise error from None


def only_introduction(text: str) -> bool:
    """Whether a paragraph is nothing but an introduction ("Here is the sentence:", "Sure!")."""
    text = re.sub(r"\s+", " ", text).strip()
    if text.endswith(":"):
        return True
    rest = text + " "
    for _ in range(3):
        match = next((m for m in (p.match(rest) for p in INTROS) if m), None)
        if match is None:
            break
        rest = rest[match.end():]
    return not rest.strip()


def chat_answer(text: str | None) -> tuple[str | None, bool]:
    """The part of a chat reply that is judged: its first paragraph, or an introduction that is a paragraph of its own and
    the paragraph after it; and whether the reply went on after that part (then a max_tokens cut did not touch it)."""
    paragraphs = re.split(r"\n\s*\n", (text or "").strip())
    if not paragraphs[0]:
        return text, False
    used = 2 if len(paragraphs) > 1 and only_introduction(paragraphs[0]) else 1
    return "\n".join(paragraphs[:used]), len(paragraphs) > used


class Cache:
    """Append-only JSONL; every line is flushed and fsync'd before the answer counts as stored."""

    def __init__(self, path: Path):
        self.path, self.lock, self.entries = path, threading.Lock(), {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            for n, line in text_lines(path):
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError):
                    logger.warning("%s:%d: unreadable cache line ignored (an interrupted write)", path, n)

    def put(self, entry: dict) -> None:
        with self.lock:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.entries[entry["key"]] = entry


def request_limits(mode: str, args: PreferenceArguments) -> tuple[int, list[str]]:
    """`max_tokens` and the stop sequences of a request in this answering mode."""
    max_tokens = args.max_tokens or (CHAT_TOKENS if mode == "chat" else SENTENCE_TOKENS)
    if mode == "json_schema":  # a line break may sit inside the JSON
        return max_tokens, []
    return max_tokens, list(args.stop) if args.stop is not None else [] if mode == "chat" else ["\n"]


def cache_key(user: str, args: PreferenceArguments, prompt: str, mode: str = "chat") -> str:
    if args.backend == "local":  # the keys local answers had before answering modes existed
        limits = [args.max_tokens or SENTENCE_TOKENS, args.stop if args.stop is not None else ["\n"]]
    else:
        limits = list(request_limits(mode, args))
    request = [user, args.backend, args.base_url or "", args.model, args.system_prompt, prompt, *limits, args.temperature,
               args.retry_temperature, args.response_prefix if args.backend == "local" else ""]
    if mode != "chat":
        request += [mode, args.response_prefix, args.tokenizer or args.model]
    return hashlib.sha256(json.dumps(request).encode()).hexdigest()


class Throttle:
    """Requests in flight: at most `limit`, halved after a timeout and grown back by one per `limit` answers."""

    def __init__(self, maximum: int):
        self.maximum = self.limit = maximum
        self.in_flight, self.successes, self.lowest = 0, 0, maximum
        self.cond = threading.Condition()

    def __enter__(self):
        with self.cond:
            self.cond.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1
        return self

    def __exit__(self, *exc):
        with self.cond:
            self.in_flight -= 1
            self.cond.notify_all()

    def timed_out(self) -> None:
        with self.cond:
            self.limit = max(1, self.limit // 2)
            self.lowest, self.successes = min(self.lowest, self.limit), 0

    def answered(self) -> None:
        with self.cond:
            self.successes += 1
            if self.limit < self.maximum and self.successes >= self.limit:
                self.limit, self.successes = self.limit + 1, 0
                self.cond.notify_all()


class Ledger:
    """Tokens spent and reserved by requests in flight, against an optional budget."""

    def __init__(self, budget: int | None):
        self.budget, self.spent, self.reserved, self.lock = budget, 0, 0, threading.Lock()

    def reserve(self, estimate: int) -> None:
        with self.lock:
            if self.budget is not None and self.spent + self.reserved + estimate > self.budget:
                raise BudgetExhausted(f"token budget {self.budget}: {self.spent} spent, {self.reserved} reserved")
            self.reserved += estimate

    def settle(self, estimate: int, used: int) -> None:
        with self.lock:
            self.reserved -= estimate
            self.spent += used


class Tripwire:
    """No request goes out until the first `window` requests have come back (at least 2 of them: one request proves nothing).
    When every one of those got the same client error (400, 401, 403, 404 or 422 with the same message) and none was
    answered, the request itself is likely wrong, whichever user it is for: `stop` is set and the stage stops. Any other
    first window, and any answer at all, opens the way for good: from then on a client error fails only its user."""

    def __init__(self, window: int):
        self.window, self.cond = window, threading.Condition()
        self.decided, self.stop = window < 2, None
        self.started, self.in_flight, self.outcomes, self.example = 0, 0, [], None

    @contextmanager
    def watch(self):
        import openai

        with self.cond:
            self.cond.wait_for(lambda: self.decided or self.started < self.window)
            if self.stop is not None:
                raise self.stop
            counted = not self.decided
            self.started += counted
            self.in_flight += counted
        outcome, error = "other", None
        try:
            yield
            outcome = "answered"
        except openai.APIStatusError as e:
            if e.status_code in CLIENT_ERRORS:
                outcome, error = (e.status_code, server_message(e)), e
            raise
        finally:
            if counted:
                self.settle(outcome, error)

    def settle(self, outcome, error) -> None:
        with self.cond:
            self.in_flight -= 1
            self.outcomes.append(outcome)
            self.example = self.example or error
            if outcome == "answered":
                self.decided = True
            if not self.decided and self.in_flight == 0 and self.started >= self.window:
                self.decided = True  # the first window has come back: decide once
                if outcome != "other" and all(o == outcome for o in self.outcomes):
                    self.stop = StageStop(self.example, len(self.outcomes))
            self.cond.notify_all()


SECRETS: set[str] = set()  # API keys in use: redacted from every message this stage shows or stores


def redact(text: str) -> str:
    """The text without the API key, also where a server echoes it masked ("sk-abcd1234****wxyz")."""
    for key in SECRETS:
        text = text.replace(key, "[API key]")
        if len(key) >= 16:
            text = re.sub(r"\S*(" + re.escape(key[:8]) + "|" + re.escape(key[-6:]) + r")\S*", "[API key]", text)
    return text


def make_client(args: PreferenceArguments):
    from openai import OpenAI

    key = os.environ.get(args.api_key_env) or ("not-needed" if args.base_url else None)
    if key is None:
        raise UlmrecError(f"preferences: no API key in ${args.api_key_env}; set it or give --base_url of a local server")
    if os.environ.get(args.api_key_env):
        SECRETS.add(key)
    return OpenAI(base_url=args.base_url, api_key=key, timeout=args.request_timeout, max_retries=0)


def served_models(client) -> list[tuple[str, str | None]]:
    """GET /v1/models as (id, owned_by) pairs; empty when the server does not list its models."""
    try:
        return [(m.id, getattr(m, "owned_by", None)) for m in client.models.list()]
    except Exception as e:  # noqa: BLE001 - a server without /v1/models still answers
        logger.warning("preferences: GET /v1/models failed (%s)", describe(e))
        return []


def has_chat_template(name: str) -> bool:
    """Whether the tokenizer of `name` (a folder, or a Hub id already in the local cache) has a chat template."""
    from huggingface_hub import try_to_load_from_cache

    def local(filename: str) -> Path | None:
        if (Path(name) / filename).exists():
            return Path(name) / filename
        try:
            found = try_to_load_from_cache(name, filename)
        except ValueError:  # not a Hub id either
            return None
        return Path(found) if isinstance(found, str) else None

    config = local("tokenizer_config.json")
    return local("chat_template.jinja") is not None or (config is not None and "chat_template" in json.loads(config.read_text()))


def detect_mode(args: PreferenceArguments) -> tuple[str, str]:
    """The answering mode, and why: set in the recipe, or from which server GET /v1/models names and the tokenizers at hand."""
    if args.answer_mode != "auto":
        return args.answer_mode, "set by answer_mode"
    models = served_models(make_client(args))
    owner = next((o for i, o in models if i == args.model), models[0][1] if models else None)
    if owner in PREFILL_SERVERS:
        return "prefill", f"GET /v1/models: owned_by {owner!r}, {PREFILL_SERVERS[owner]}, which continues a prefilled answer"
    name = args.tokenizer or args.model
    if has_chat_template(name):
        return "completion", f"GET /v1/models: owned_by {owner!r}; the chat template of {name} is at hand to render /v1/completions prompts"
    return "chat", f"GET /v1/models: owned_by {owner!r}, not a server known to continue a prefilled answer, and no local chat template for {name}"


def load_chat_template(args: PreferenceArguments):
    """Renders the system and user messages as the model's chat template does, up to the start of the answer."""
    from .llm import load_tokenizer

    name = args.tokenizer or args.model
    try:
        tokenizer = load_tokenizer(name)
    except (OSError, ValueError) as e:
        raise UlmrecError(f"preferences: answer_mode completion renders prompts with the chat template of {name!r}, which did not load "
                          f"({str(e)[:200]}); set --tokenizer to the served model's HF id or folder") from None
    if not tokenizer.chat_template:
        raise UlmrecError(f"preferences: the tokenizer of {name!r} has no chat template to render /v1/completions prompts; set --tokenizer")
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else None
    adds_bos = bool(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]

    def render(messages: list[dict]) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # a template that writes `bos_token` itself, for a tokenizer that adds BOS when the server encodes the prompt: once is enough
        return text[len(bos):] if adds_bos and text.startswith(bos) else text

    return render


def build_request(mode: str, args: PreferenceArguments, prompt: str, template=None) -> tuple[str, dict]:
    """The endpoint ('chat' or 'completion') and the body of a first request in this answering mode."""
    max_tokens, stop = request_limits(mode, args)
    body = {"model": args.model, "max_tokens": max_tokens, "temperature": args.temperature, **({"stop": stop} if stop else {})}
    messages = [{"role": "system", "content": args.system_prompt}, {"role": "user", "content": prompt}]
    if mode == "completion":
        return "completion", {**body, "prompt": template(messages) + args.response_prefix}
    if mode == "prefill":
        return "chat", {**body, "messages": [*messages, {"role": "assistant", "content": args.response_prefix}],
                        "extra_body": {"continue_final_message": True, "add_generation_prompt": False}}
    if mode == "json_schema":
        return "chat", {**body, "messages": messages, "response_format": ANSWER_SCHEMA}
    return "chat", {**body, "messages": messages}


def cut_at_stop(text: str | None, stops: list[str]) -> str | None:
    """The text before the first stop sequence, as the OpenAI API returns it; `transformers serve` (5.24) returns the stop
    sequence and the rest of its last token too."""
    found = [text.find(stop) for stop in stops if stop and text and stop in text]
    return text[:min(found)] if found else text


def continued(prefix: str, text: str | None) -> str:
    """The prefilled start and the server's continuation as one answer (a few servers echo the start); nothing is added."""
    if not (text or "").strip():
        raise AnswerError("empty answer", text or None)
    if text.lstrip().startswith(prefix):
        return text.strip()
    return f"{prefix}{'' if text[0].isspace() or text[0] in ',.;:!?' else ' '}{text}".strip()


def json_preference(text: str | None) -> str:
    try:
        value = json.loads(text or "")
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not isinstance(value.get("preference"), str):
        raise AnswerError("not the JSON object the schema asks for", text)
    return value["preference"]


class OpenAIBackend:
    def __init__(self, args: PreferenceArguments, stats: Counter, ledger: Ledger, mode: str = "chat", jobs: int = 1):
        self.args, self.stats, self.ledger, self.lock, self.mode = args, stats, ledger, threading.Lock(), mode
        self.throttle = Throttle(args.concurrency)
        self.tripwire = Tripwire(min(max(2, args.concurrency), jobs))
        self.client = make_client(args)
        self.template = load_chat_template(args) if mode == "completion" else None

    def count(self, name: str, value: int = 1) -> None:
        with self.lock:
            self.stats[name] += value

    def request(self, prompt: str, attempt: int, retry_invalid: bool) -> tuple[str | None, str | None]:
        """One request: (the answer's text, its finish_reason)."""
        a = self.args
        endpoint, body = build_request(self.mode, a, prompt, self.template)
        if retry_invalid:
            body.update(temperature=a.retry_temperature, seed=a.seed + attempt)
        estimate = (len(prompt) + len(a.system_prompt)) // 3 + 32 + body["max_tokens"]  # generous: English runs ~4 characters a token
        self.ledger.reserve(estimate)
        used = 0
        try:
            with self.tripwire.watch(), self.throttle:
                self.count("requests")
                create = self.client.completions.create if endpoint == "completion" else self.client.chat.completions.create
                response = create(**body)
            usage = response.usage.model_dump() if response.usage else {}
            used = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
            for name in ("prompt_tokens", "completion_tokens"):
                self.count(name, int(usage.get(name) or 0))
            choice = response.choices[0] if response.choices else None
            if choice is None:
                return None, None
            text = choice.text if endpoint == "completion" else choice.message.content
            return cut_at_stop(text, body.get("stop") or []), choice.finish_reason
        finally:
            self.ledger.settle(estimate, used)

    def shown(self, text: str | None) -> str | None:
        """The reply as the model wrote it (after the prefilled start, in prefill and completion modes); None when blank."""
        if not (text or "").strip():
            return None
        return continued(self.args.response_prefix, text) if self.mode in ("prefill", "completion") else text.strip()

    def judged(self, text: str | None, shown: str | None, finish: str | None) -> str | None:
        """The part of the reply that is judged as the answer; raises AnswerError when a max_tokens cut reached it."""
        if self.mode in ("prefill", "completion"):
            if shown is None:
                raise AnswerError("empty answer")
            parts = sentences(shown)  # one sentence: the server no longer stops at ". ", which "D.R." or "e.g." hold
            part, went_on = parts[0], len(parts) > 1
        elif self.mode == "chat":
            part, went_on = chat_answer(text)
        else:
            part, went_on = text, False
        if finish == "length" and not went_on:
            raise AnswerError(f"answer cut off at max_tokens={request_limits(self.mode, self.args)[0]}", shown)
        return json_preference(text) if self.mode == "json_schema" else part

    def ask(self, prompt: str) -> tuple[str, str | None]:
        """One user's sentence and, when it was salvaged, the answer it came from. Raises UserFailure when the retries run
        out, StageStop when the first requests all got the same client error."""
        import openai

        a, retry_invalid, invalid, last_answer, previous = self.args, False, 0, None, None
        for attempt in range(a.max_retries + a.invalid_retries + 1):
            wait, reason, shown = 0.0, None, None
            try:
                text, finish = self.request(prompt, attempt, retry_invalid)
                shown = self.shown(text)
                sentence, salvaged = accept_answer(self.judged(text, shown, finish), prompt, a.max_chars)
                self.throttle.answered()
                return sentence, (shown if salvaged else None)
            except openai.RateLimitError as e:
                error, reason, wait = e, "rate_limit", retry_after(e.response) or 0.0
            except openai.APITimeoutError as e:
                error, reason, wait = e, "timeout", a.request_timeout  # the server is still working on the abandoned request
                self.throttle.timed_out()
            except openai.APIStatusError as e:
                if e.status_code < 500 and e.status_code not in (408, 409):  # a 4xx other than rate limits will not pass on a retry
                    if self.tripwire.stop is not None:
                        raise self.tripwire.stop from None
                    raise UserFailure(describe(e), last_answer, remember=False) from None
                error, reason = e, f"http_{e.status_code}"
            except (openai.APIConnectionError, openai.APIResponseValidationError, ValueError) as e:
                error, reason = e, "connection" if isinstance(e, openai.APIConnectionError) else "malformed_response"
            except AnswerError as e:
                error, reason, retry_invalid, invalid = e, f"invalid: {e}", True, invalid + 1
                last_answer = shown or e.answer or last_answer
                if (str(e), shown) == previous:  # the server ignores temperature and seed: more retries buy the same answer
                    self.count("identical_answers")
                    raise UserFailure(f"{describe(e)} (the same answer came back to a retry with another temperature and seed, so it "
                                      f"was not asked again)", last_answer, remember=True) from None
                previous = (str(e), shown)
            if invalid > a.invalid_retries or attempt - invalid >= a.max_retries:  # the answers, not the server: remembered
                raise UserFailure(describe(error), last_answer, remember=isinstance(error, AnswerError))
            self.count(f"retries[{reason}]")
            backoff = min(a.backoff_max, a.backoff_base * 2**attempt) * (0.5 + random.random())
            time.sleep(min(a.backoff_max, max(backoff, wait)))
        raise AssertionError("unreachable")


def retry_after(response) -> float | None:
    try:
        return float(response.headers.get("retry-after"))
    except (TypeError, ValueError, AttributeError):
        return None


def server_message(error: Exception) -> str:
    """What the server said: FastAPI's `detail`, OpenAI's `error.message`, or the start of the body."""
    body = getattr(error, "body", None)  # the openai client has already unwrapped a top-level "error" object
    if isinstance(body, dict):
        for key in ("detail", "message", "error", "msg"):
            if body.get(key):
                return flat(body[key])
    if isinstance(body, str) and body.strip():
        return body.strip()[:KEEP_CHARS]
    return str(error)


def flat(value) -> str:
    if isinstance(value, list):  # FastAPI's validation errors
        return "; ".join(flat(v) for v in value)
    if isinstance(value, dict):
        where = ".".join(str(x) for x in value.get("loc", []))
        text = value.get("msg") or value.get("message")
        return f"{where}: {text}" if where and text else text or json.dumps(value)[:KEEP_CHARS]
    return str(value)


def describe(error: Exception) -> str:
    """The error's kind, HTTP status and the server's own message (without the API key, which some proxies echo)."""
    status = getattr(error, "status_code", None)
    message = server_message(error) if status else str(error)
    name = "AnswerError" if isinstance(error, AnswerError) else type(error).__name__
    return f"{name}{f' {status}' if status else ''}: {redact(message)[:KEEP_CHARS]}"


def stop_message(stop: StageStop, backend: OpenAIBackend, why: str) -> str:
    """The end of a stage stopped by a client error: the server's message, and what to change."""
    args, status = backend.args, stop.error.status_code
    parts = [f"preferences: stopped after {backend.stats['requests']} requests: all {stop.count} requests of the first window got the same "
             f"error and none was answered, which points at the request itself (model name, API key, endpoint or an option) rather "
             f"than at single users. {describe(stop.error)}"]
    if status in (401, 403):
        parts.append(f"Check the API key in ${args.api_key_env} and --base_url")
    ids = [i for i, _ in served_models(backend.client)] if status not in (401, 403) else []
    if ids and args.model not in ids:
        parts.append(f"--model {args.model!r} is not among the models the server offers (GET /v1/models): {', '.join(ids[:20])}")
    elif status in (400, 413, 422):
        parts.append("If the message is about these users' prompts (too long for the model's context, say), a smaller "
                     "--review_token_budget shortens every prompt")
    if backend.mode != "chat" and why != "set by answer_mode":
        parts.append(f"The answering mode was {backend.mode} ({why}); --answer_mode chat sends plain chat requests")
    return ". ".join(part.rstrip(".") for part in parts)


def clip(text: str | None) -> str | None:
    return text[:KEEP_CHARS] if text else text


def run_openai(jobs: list[dict], args: PreferenceArguments, cache: Cache, stats: Counter, failures: dict, mode: str = "chat",
               why: str = "set by answer_mode") -> list[str]:
    """Ask for every job; returns the users left unasked because the token budget ran out."""
    from tqdm.auto import tqdm

    ledger = Ledger(args.token_budget)
    backend = OpenAIBackend(args, stats, ledger, mode, len(jobs))
    stopped, stop = [], None
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool, tqdm(total=len(jobs), desc="preferences", unit="user") as bar:
        futures = {pool.submit(backend.ask, job["prompt"]): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                sentence, salvaged_from = future.result()
                salvaged = {"salvaged": True, "salvaged_from": clip(salvaged_from)} if salvaged_from else {}
                cache.put({"key": job["key"], "user": job["user"], "preference": sentence, "mode": mode, **salvaged})
                stats["answered"] += 1
            except BudgetExhausted:
                stopped.append(job["user"])
            except StageStop as e:
                stop = stop or e
                for other in futures:
                    other.cancel()
            except CancelledError:
                pass
            except UserFailure as e:
                failures[job["user"]] = {"reason": e.reason, "last_answer": clip(e.last_answer)}
                if e.remember:  # the model's answers, not the server: a rerun costs nothing
                    cache.put({"key": job["key"], "user": job["user"], "failed": e.reason, "last_answer": clip(e.last_answer), "mode": mode})
            except Exception as e:  # noqa: BLE001 - anything else is recorded per user
                failures[job["user"]] = {"reason": describe(e), "last_answer": None}
            bar.update(1)
            bar.set_postfix(done=stats["answered"], failed=len(failures), tokens=stats["prompt_tokens"] + stats["completion_tokens"],
                            in_flight_limit=backend.throttle.limit)
    stats["lowest_concurrency"] = backend.throttle.lowest
    if stop is not None:
        raise UlmrecError(stop_message(stop, backend, why))
    return stopped


def run_local(jobs: list[dict], args: PreferenceArguments, cache: Cache, stats: Counter, failures: dict) -> list[str]:
    import torch
    from tqdm.auto import tqdm

    from .llm import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(args.model, padding_side="left")
    model = load_causal_lm(args.model).eval()
    bar = tqdm(range(0, len(jobs), args.batch_size), desc="preferences (local)", unit="batch")
    for start in bar:
        batch = jobs[start:start + args.batch_size]
        chats = [[{"role": "system", "content": args.system_prompt}, {"role": "user", "content": j["prompt"]}] for j in batch]
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) + args.response_prefix for c in chats]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_tokens or SENTENCE_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        stats["prompt_tokens"] += int(enc["attention_mask"].sum())
        for job, ids in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            stats["completion_tokens"] += int((ids != tokenizer.pad_token_id).sum())
            raw = f"{args.response_prefix}{tokenizer.decode(ids, skip_special_tokens=True)}"
            try:
                sentence, salvaged = accept_answer(first_sentence(raw), job["prompt"], args.max_chars)
                cache.put({"key": job["key"], "user": job["user"], "preference": sentence,
                           **({"salvaged": True, "salvaged_from": clip(raw)} if salvaged else {})})
                stats["answered"] += 1
            except AnswerError as e:
                failures[job["user"]] = {"reason": f"AnswerError: {e}", "last_answer": clip(raw)}
                cache.put({"key": job["key"], "user": job["user"], "failed": f"AnswerError: {e}", "last_answer": clip(raw)})
        bar.set_postfix(done=stats["answered"], failed=len(failures), tokens=stats["prompt_tokens"] + stats["completion_tokens"])
    return []


def first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])(\s|$)", text.strip(), flags=re.S)
    return match.group(1) if match else text


def keyword_preference(row: dict, titles: dict) -> str:
    """Model-free: frequent content words of liked (>= 4 stars) and disliked (<= 2 stars) reviews."""
    reviews = row.get("reviews") or []
    ratings = row.get("ratings") or [None] * len(reviews)
    liked, disliked = Counter(), Counter()
    for text, rating in zip(reviews, ratings):
        words = [w for w in re.findall(r"[a-z][a-z\-]{2,}", (text or "").lower()) if w not in STOPWORDS]
        (disliked if rating is not None and rating <= 2 else liked).update(words)
    if not liked and not disliked:  # no review text: fall back to the titles the user chose
        for item in row["items"]:
            liked.update(w for w in re.findall(r"[a-z][a-z\-]{2,}", (titles.get(item) or "").lower()) if w not in STOPWORDS)
    top = lambda c: ", ".join(w for w, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:4])  # noqa: E731
    sentence = f"{OFFLINE_LABEL} The user prefers {top(liked) or 'nothing in particular'}"
    return sentence + (f" and dislikes {top(disliked)}." if disliked else ".")


def main(stage: StageArguments, args: PreferenceArguments) -> Path:
    run = RunDir(stage.run_dir)
    if not run.begin("preferences", {**settings_of(args), "import_digest": file_digest(args.import_file)}, stage.overwrite, inputs=("prepare",)):
        return run.path("preferences")
    out, data = run.path("preferences"), run.prepared()
    users = [user_view(u, args.include_heldout_text) for u in data["users"].to_list()[: args.max_users]]
    titles = run.titles()
    start, stats, failures, stopped = time.time(), Counter(), {}, []
    if args.backend in ("import", "offline-keywords"):
        results = simple_backend(users, titles, args, failures)
        source = args.import_file if args.backend == "import" else OFFLINE_LABEL
    else:
        results, stopped, source = llm_backend(users, titles, args, run, stats, failures, "reviews" in data["users"].column_names)
    if args.fallback == "offline-keywords" and not stopped:
        for u in users:
            if u["user"] in failures:
                results[u["user"]] = {"preference": keyword_preference(u, titles), "backend": "offline-keywords",
                                     "fallback_for": failure_record(failures.pop(u["user"]))["reason"]}
                stats["fallbacks"] += 1
    rows = [{"user_id": u["user_id"], "user": u["user"], "backend": args.backend, **results[u["user"]]} for u in users if u["user"] in results]
    run.write_preferences(rows)
    summary = summarize(args, source, users, rows, failures, stopped, stats, time.time() - start)
    write_json(run.preferences_summary_file, summary)
    write_json(run.preferences_failures_file, {u: failure_record(r) for u, r in failures.items()})
    logger.info("preferences: %s", json.dumps({k: v for k, v in summary.items() if k != "retries"}))
    if stopped:
        raise UlmrecError(f"preferences: stopped by the token budget ({args.token_budget}) with {len(stopped)} users not asked yet; "
                          f"{len(rows)} answers are cached and the next run resumes from them")
    if failures:
        listed = "; ".join(f"{u}: {failure_record(r)['reason']}" for u, r in list(failures.items())[:10])
        raise UlmrecError(f"{len(failures)} of {len(users)} users have no preference (each with its reason and last rejected answer in "
                          f"{run.preferences_failures_file}): {listed}. To go on: "
                          f"{how_to_go_on(args, out, run.preferences_cache if args.backend in ('openai', 'local') else None)}")
    run.finish("preferences", {"summary": summary})
    return out


def failure_record(failure) -> dict:
    return failure if isinstance(failure, dict) else {"reason": failure}


def how_to_go_on(args: PreferenceArguments, out: Path, cache: Path | None) -> str:
    fallback = ("--fallback offline-keywords (`fallback: offline-keywords` in the recipe's preferences section) gives them labelled "
                "keyword sentences")
    overwrite = (f"a changed setting needs --overwrite, which deletes only {out} (the stage's output, rebuilt from the cache)")
    if args.backend == "import":
        return f"add them to {args.import_file} and rerun with --overwrite, or rerun with --overwrite and {fallback}"
    other = "--answer_mode, --model or prompt" if args.backend == "openai" else "--model or prompt"
    return (f"rerun with --retry_failed true to ask only them again (no --overwrite needed); or rerun with --overwrite and another "
            f"{other}, which may answer them, or with {fallback}. {overwrite}: the answer cache {cache} stays, "
            f"so every user whose answer is stored for this model and prompt (in any answering mode) is read back, not asked or paid "
            f"for again")


def summarize(args, source, users, rows, failures, stopped, stats: Counter, seconds: float) -> dict:
    retries = {k[len("retries["):-1]: v for k, v in stats.items() if k.startswith("retries[")}
    return {"backend": args.backend, "model": args.model if args.backend in ("openai", "local") else None, "source": source,
            "user_text": IMPORTED if args.backend == "import" else text_scope(args.include_heldout_text),
            "users": len(users), "done": len(rows), "failed": len(failures), "not_asked_budget": len(stopped),
            "cached": stats["cached"], "cached_failures": stats["cached_failures"], "answered": stats["answered"], "requests": stats["requests"],
            "prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
            "retries": retries, "retries_total": sum(retries.values()), "identical_answers": stats["identical_answers"],
            "fallbacks": stats["fallbacks"], "salvaged": stats["salvaged"],
            "answer_mode": stats.get("answer_mode"), "answer_mode_source": stats.get("answer_mode_source"),
            "answers_by_mode": {k[len("answers_by_mode["):-1]: v for k, v in stats.items() if k.startswith("answers_by_mode[")},
            "invalid_answer_retry": {"temperature": args.retry_temperature, "seed": f"{args.seed} + attempt"},
            "max_tokens": request_limits(stats.get("answer_mode") or "chat", args)[0] if args.backend == "openai" else args.max_tokens or SENTENCE_TOKENS,
            "token_budget": args.token_budget, "lowest_concurrency": stats.get("lowest_concurrency"),
            "wall_time_s": round(seconds, 2), "users_per_s": round(stats["answered"] / max(seconds, 1e-9), 3)}


def simple_backend(users, titles, args, failures) -> dict:
    if args.backend == "offline-keywords":
        return {u["user"]: {"preference": keyword_preference(u, titles)} for u in users}
    if not args.import_file:
        raise UlmrecError("preferences: the import backend needs --import_file")
    mapping = read_preference_file(args.import_file)
    results = {}
    for u in users:
        text = mapping.get(u["user"])
        if isinstance(text, str) and text.strip():
            results[u["user"]] = {"preference": text.strip()}
        else:
            failures[u["user"]] = f"not in {args.import_file}" if text is None else "empty preference in the imported file"
    unmatched = len(set(mapping) - {u["user"] for u in users})
    if unmatched:
        logger.warning("preferences: %d users of %s are not in the data set (ignored)", unmatched, args.import_file)
    return results


def llm_backend(users, titles, args, run: RunDir, stats, failures, has_reviews) -> tuple[dict, list, str]:
    if args.input == "reviews" and not has_reviews:
        raise UlmrecError("preferences: this data set has no review text; use --input titles, or the import backend")
    cache = Cache(run.preferences_cache)
    # stored answers count in whichever mode they were made (the recipe's mode first): another --answer_mode re-asks no one answered
    modes = sorted(ANSWER_MODES[1:], key=lambda m: m != args.answer_mode) if args.backend == "openai" else ["chat"]
    prompts, cuts, keys, chosen, pending = {}, {}, {}, {}, []
    for u in users:
        text, cuts[u["user"]] = user_text(u, args.input, titles, args.review_token_budget * 4)
        prompts[u["user"]] = args.prompt.format(reviews=text)
        keys[u["user"]] = {m: cache_key(u["user"], args, prompts[u["user"]], m) for m in modes}
        answered = [k for k in keys[u["user"]].values() if "preference" in cache.entries.get(k, {})]  # in any mode: a rerun asks nothing
        if answered:
            chosen[u["user"]] = answered[0]
            stats["cached"] += 1
        else:
            pending.append(u["user"])
    mode, why = "chat", None
    if args.backend == "openai":  # the mode is detected only when someone is to be asked
        mode, why = detect_mode(args) if pending else (None, "every answer came from the cache")
        stats["answer_mode"], stats["answer_mode_source"] = mode, why
        logger.info("preferences: answer mode %s (%s)", mode, why)
    jobs = []
    for user in pending:
        chosen[user] = keys[user][mode]
        entry = cache.entries.get(chosen[user])
        if entry and "failed" in entry and not args.retry_failed:
            failures[user] = {"reason": f"{entry['failed']} (in an earlier run; --retry_failed true asks again)", "last_answer": entry.get("last_answer")}
            stats["cached_failures"] += 1
        else:
            jobs.append({"user": user, "key": chosen[user], "prompt": prompts[user]})
    if stats["cached"] or stats["cached_failures"]:
        logger.info("preferences: resuming: %d users answered from the cache %s (%d failed earlier), %d to request", stats["cached"],
                    cache.path, stats["cached_failures"], len(jobs))
    if args.backend == "openai":
        stopped = run_openai(jobs, args, cache, stats, failures, mode, why)
    else:
        stopped = run_local(jobs, args, cache, stats, failures)
    results = {}
    for user, cut in cuts.items():
        entry = cache.entries.get(chosen[user], {})
        if "preference" in entry:
            results[user] = {"preference": entry["preference"], "cut": cut, **({"salvaged": True} if entry.get("salvaged") else {})}
            stats["salvaged"] += bool(entry.get("salvaged"))
            if args.backend == "openai":
                results[user]["answer_mode"] = entry.get("mode", "chat")
                stats[f"answers_by_mode[{entry.get('mode', 'chat')}]"] += 1
    return results, stopped, args.base_url or args.model
