"""Preference stage: one sentence of each user's preferences, written by an LLM from their reviews.

Backends: `openai` (any OpenAI-compatible endpoint), `local` (an HF causal LM, SmolLM2 offline by
default), `import` (a precomputed user -> preference file) and `offline-keywords` (a deterministic,
labelled, model-free fallback).

Every answer is appended to `preferences/cache.jsonl` (fsync'd) as it arrives, keyed by
(user, model, prompt hash), so a killed run re-requests nothing already answered.
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from .common import RunArguments, UlmrecError, load_prepared, mark_complete, should_skip, stage_dir, write_json

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You summarise shoppers' tastes from their product reviews."
DEFAULT_PROMPT = (
    "Here are a user's product reviews, newest first, each with its star rating where known:\n{reviews}\n\n"
    "In one sentence, state this user's preferences (what they like and dislike). Answer with the sentence only."
)
OFFLINE_LABEL = "[offline-keywords]"
STOPWORDS = set("""a about after all also am an and any are as at be because been but by can could did do does for from
get got had has have he her him his how i if in into is it its just like love me more most my no not of on one only or
our out so some than that the their them then there these they this to too up us very was we well were what when which
who will with would you your really great good product use used using bought buy works work much make made even well""".split())


@dataclass
class PreferenceArguments:
    preference_backend: str = field(default="offline-keywords", metadata={"help": "Where sentences come from.", "choices": ["openai", "local", "import", "offline-keywords"]})
    preference_model: str = field(default="gpt-3.5-turbo", metadata={"help": "Model name (openai) or HF id/path/'smollm2' (local)."})
    base_url: str | None = field(default=None, metadata={"help": "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM)."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Environment variable that holds the API key."})
    preferences_file: str | None = field(default=None, metadata={"help": "For `import`: JSON {user: sentence} or JSONL with user/preference."})
    preference_input: str = field(default="reviews", metadata={"help": "User text given to the LLM.", "choices": ["reviews", "titles"]})
    preference_system_prompt: str = field(default=DEFAULT_SYSTEM, metadata={"help": "System message."})
    preference_prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "Prompt template with {reviews}."})
    review_token_budget: int = field(default=768, metadata={"help": "Review text per prompt, in estimated tokens (4 characters each); newest first."})
    concurrency: int = field(default=8, metadata={"help": "Requests in flight at once (openai)."})
    request_timeout: float = field(default=60.0, metadata={"help": "Seconds before a request is abandoned and retried."})
    max_retries: int = field(default=5, metadata={"help": "Retries per user after the first attempt."})
    backoff_base: float = field(default=1.0, metadata={"help": "First backoff in seconds; doubles each retry, with jitter."})
    backoff_max: float = field(default=60.0, metadata={"help": "Longest single wait, Retry-After included."})
    max_preference_chars: int = field(default=500, metadata={"help": "Longer answers are rejected (and retried)."})
    preference_max_new_tokens: int = field(default=60, metadata={"help": "Generation length (local)."})
    preference_batch_size: int = field(default=8, metadata={"help": "Users generated at once (local)."})
    response_prefix: str = field(default="The user prefers", metadata={"help": "Start of the answer given to the local model, which continues it (small models answer in sentences then)."})
    preference_fallback: str = field(default="none", metadata={"help": "For users still without a sentence: 'none' (fail and list them) or 'offline-keywords' (labelled, counted).", "choices": ["none", "offline-keywords"]})
    max_users: int | None = field(default=None, metadata={"help": "Only the first N users (for trials)."})


class AnswerError(Exception):
    """An answer that arrived but is unusable (empty, too long, an echo of the prompt)."""


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
    text = re.sub(r"\s+", " ", text or "").strip().strip('"').strip()
    if not text:
        raise AnswerError("empty answer")
    if len(re.findall(r"[A-Za-z]{2,}", text)) < 4:
        raise AnswerError("answer too short to state a preference")
    if re.search(r"\(\d(\.\d)? stars\)", text):
        raise AnswerError("answer echoes the prompt")
    if len(text) > max_chars:
        raise AnswerError(f"answer longer than {max_chars} characters")
    lines = [ln.strip() for ln in prompt.splitlines() if len(ln.strip()) > 40]
    if any(ln in text for ln in lines):
        raise AnswerError("answer echoes the prompt")
    return text


class Cache:
    """Append-only JSONL; every line is flushed and fsync'd before the answer counts as stored."""

    def __init__(self, path: Path):
        self.path, self.lock, self.entries = path, threading.Lock(), {}
        if path.exists():
            with open(path) as f:
                for n, line in enumerate(f, 1):
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


def cache_key(user: str, model: str, system: str, prompt: str) -> str:
    return hashlib.sha256("\x00".join([user, model, system, prompt]).encode()).hexdigest()


class OpenAIBackend:
    def __init__(self, args: PreferenceArguments):
        from openai import OpenAI

        key = os.environ.get(args.api_key_env) or ("not-needed" if args.base_url else None)
        if key is None:
            raise UlmrecError(f"preferences: no API key in ${args.api_key_env}; set it or give --base_url of a local server")
        self.args = args
        self.client = OpenAI(base_url=args.base_url, api_key=key, timeout=args.request_timeout, max_retries=0)

    def ask(self, prompt: str, stats: Counter) -> tuple[str, dict]:
        """One user's answer with retries; raises the last error when they run out."""
        import openai

        a = self.args
        for attempt in range(a.max_retries + 1):
            wait = None
            try:
                response = self.client.chat.completions.create(
                    model=a.preference_model, temperature=0,
                    messages=[{"role": "system", "content": a.preference_system_prompt}, {"role": "user", "content": prompt}])
                text = validate_answer(response.choices[0].message.content if response.choices else None, prompt, a.max_preference_chars)
                usage = response.usage.model_dump() if response.usage else {}
                return text, usage
            except openai.RateLimitError as e:
                error, wait = e, retry_after(e.response)
            except openai.APIStatusError as e:
                if e.status_code < 500 and e.status_code not in (408, 409):
                    raise  # a 4xx other than rate limits will not get better by retrying
                error = e
            except (openai.APITimeoutError, openai.APIConnectionError, openai.APIResponseValidationError, AnswerError, ValueError) as e:
                error = e
            if attempt == a.max_retries:
                raise error
            stats["retries"] += 1
            backoff = min(a.backoff_max, a.backoff_base * 2**attempt) * (0.5 + random.random())
            time.sleep(min(a.backoff_max, max(backoff, wait or 0.0)))
        raise AssertionError("unreachable")


def retry_after(response) -> float | None:
    try:
        return float(response.headers.get("retry-after"))
    except (TypeError, ValueError, AttributeError):
        return None


def describe(error: Exception) -> str:
    name = type(error).__name__
    status = getattr(error, "status_code", None)
    return f"{name}{f' {status}' if status else ''}: {str(error)[:200]}"


def run_openai(jobs: list[dict], args: PreferenceArguments, cache: Cache, stats: Counter, failures: dict):
    from tqdm.auto import tqdm

    backend = OpenAIBackend(args)
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool, tqdm(total=len(jobs), desc="preferences", unit="user") as bar:
        futures = {pool.submit(backend.ask, job["prompt"], stats): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                text, usage = future.result()
                cache.put({"key": job["key"], "user": job["user"], "preference": text, "usage": usage})
                stats["requested"] += 1
                for name, value in usage.items():
                    if isinstance(value, int):
                        stats[f"tokens_{name}"] += value
            except Exception as e:  # noqa: BLE001 - any error after retries is recorded per user
                failures[job["user"]] = describe(e)
            bar.update(1)


def run_local(jobs: list[dict], args: PreferenceArguments, cache: Cache, stats: Counter, failures: dict):
    import torch
    from tqdm.auto import tqdm

    from .llm import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(args.preference_model, padding_side="left")
    model = load_causal_lm(args.preference_model).eval()
    for start in tqdm(range(0, len(jobs), args.preference_batch_size), desc="preferences (local)", unit="batch"):
        batch = jobs[start:start + args.preference_batch_size]
        chats = [[{"role": "system", "content": args.preference_system_prompt}, {"role": "user", "content": j["prompt"]}] for j in batch]
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) + args.response_prefix for c in chats]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.preference_max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for job, ids in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            raw = f"{args.response_prefix}{tokenizer.decode(ids, skip_special_tokens=True)}"
            try:
                text = validate_answer(first_sentence(raw), job["prompt"], args.max_preference_chars)
                cache.put({"key": job["key"], "user": job["user"], "preference": text, "usage": {"completion_tokens": int((ids != tokenizer.pad_token_id).sum())}})
                stats["requested"] += 1
            except AnswerError as e:
                failures[job["user"]] = f"AnswerError: {e}"


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


def load_import(path: str) -> dict[str, str]:
    p = Path(path)
    if not p.exists():
        raise UlmrecError(f"{p}: no such preferences file")
    text = p.read_text()
    if p.suffix == ".jsonl":
        mapping = {}
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    mapping[str(row["user"])] = row["preference"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UlmrecError(f"{p}:{n}: expected a JSON object with 'user' and 'preference' ({e})") from None
        return mapping
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UlmrecError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise UlmrecError(f"{p}: expected a JSON object mapping user id to preference")
    return {str(k): v for k, v in data.items()}


def main(run_args: RunArguments, args: PreferenceArguments) -> Path:
    out = stage_dir(run_args, "preferences")
    if should_skip(run_args, out, "preferences"):
        return out
    data = load_prepared(run_args)
    out.mkdir(parents=True, exist_ok=True)
    users = data["users"].to_list()[: args.max_users]
    titles = dict(zip(data["items"]["item_id"], data["items"]["title"]))
    start, stats, failures = time.time(), Counter(), {}
    if args.preference_backend in ("import", "offline-keywords"):
        results = simple_backend(users, titles, args, failures)
        source = args.preferences_file if args.preference_backend == "import" else OFFLINE_LABEL
    else:
        results, source = llm_backend(users, titles, args, out, stats, failures, "reviews" in data["users"].column_names)
    if args.preference_fallback == "offline-keywords":
        for u in users:
            if u["user"] in failures:
                results[u["user"]] = {"preference": keyword_preference(u, titles), "backend": "offline-keywords", "fallback_for": failures.pop(u["user"])}
                stats["fallbacks"] += 1
    rows = [{"user_id": u["user_id"], "user": u["user"], "backend": args.preference_backend, **results[u["user"]]}
            for u in users if u["user"] in results]
    with open(out / "preferences.jsonl", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    summary = {"backend": args.preference_backend, "model": args.preference_model if args.preference_backend in ("openai", "local") else None,
               "source": source, "users": len(users), "done": len(rows), "failed": len(failures), **dict(stats),
               "wall_time_s": round(time.time() - start, 2), "users_per_s": round(len(rows) / max(1e-9, time.time() - start), 3)}
    write_json(out / "summary.json", summary)
    write_json(out / "failures.json", failures)
    logger.info("preferences: %s", json.dumps(summary))
    if failures:
        listed = "; ".join(f"{u}: {r}" for u, r in list(failures.items())[:10])
        raise UlmrecError(f"{len(failures)} of {len(users)} users have no preference (all in {out / 'failures.json'}): {listed}")
    mark_complete(out, summary)
    return out


def simple_backend(users, titles, args, failures) -> dict:
    if args.preference_backend == "offline-keywords":
        return {u["user"]: {"preference": keyword_preference(u, titles)} for u in users}
    if not args.preferences_file:
        raise UlmrecError("preferences: the import backend needs --preferences_file")
    mapping = load_import(args.preferences_file)
    results = {}
    for u in users:
        text = mapping.get(u["user"])
        if isinstance(text, str) and text.strip():
            results[u["user"]] = {"preference": text.strip()}
        else:
            failures[u["user"]] = f"not in {args.preferences_file}" if text is None else "empty preference in the imported file"
    unmatched = len(set(mapping) - {u["user"] for u in users})
    if unmatched:
        logger.warning("preferences: %d users of %s are not in the data set (ignored)", unmatched, args.preferences_file)
    return results


def llm_backend(users, titles, args, out, stats, failures, has_reviews) -> tuple[dict, str]:
    if args.preference_input == "reviews" and not has_reviews:
        raise UlmrecError("preferences: this data set has no review text; use --preference_input titles, or the import backend")
    cache = Cache(out / "cache.jsonl")
    jobs, cuts = [], {}
    for u in users:
        text, cut = user_text(u, args.preference_input, titles, args.review_token_budget * 4)
        prompt = args.preference_prompt.format(reviews=text)
        key = cache_key(u["user"], args.preference_model, args.preference_system_prompt, prompt)
        cuts[u["user"]] = cut
        if key in cache.entries:
            stats["cached"] += 1
        else:
            jobs.append({"user": u["user"], "key": key, "prompt": prompt})
        cuts[u["user"]]["key"] = key
    logger.info("preferences: %d users cached, %d to request from %s", stats["cached"], len(jobs), args.preference_backend)
    (run_openai if args.preference_backend == "openai" else run_local)(jobs, args, cache, stats, failures)
    results = {}
    for user, cut in cuts.items():
        entry = cache.entries.get(cut.pop("key"))
        if entry:
            results[user] = {"preference": entry["preference"], "cut": cut}
    return results, args.base_url or args.preference_model
