"""Preference stage: one sentence of each user's preferences, written by an LLM from their reviews.

Backends: `openai` (any OpenAI-compatible endpoint), `local` (an HF causal LM, SmolLM2 offline by default), `import`
(a precomputed user -> preference file) and `offline-keywords` (a deterministic, labelled, model-free fallback).

Requests to an endpoint are sized and paced for real servers and real bills:
- every request carries `max_tokens` (one sentence by default) and stops at a line break; an answer cut off by
  `max_tokens` counts as invalid, and so do an introduction without content ("The user's preferences are:") and lists;
- a retry after an invalid answer changes the request (a higher temperature and a seed), since the same request at
  temperature 0 returns the same answer; there are at most `invalid_retries` of them (transport errors get `max_retries`);
- a timed-out request is still running on the server, so a timeout halves the number of requests in flight (it grows
  back one per `concurrency` answers) and its retry waits at least `request_timeout`;
- tokens and requests are counted in `summary.json`, and `token_budget` stops a run before it would spend more.
Every answer is appended (fsync'd) to the named cache `cache/preferences/responses.jsonl`, keyed by user, endpoint,
model, messages and sampling settings, so a killed or budget-stopped run resumes without asking anything twice. A user
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from .common import StageArguments, UlmrecError, read_text, settings_of, text_lines, write_json
from .layout import RunDir

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
    max_tokens: int = field(default=64, metadata={"help": "Answer length cap sent with every request (one sentence); a longer answer is cut off and rejected."})
    stop: list[str] = field(default_factory=lambda: ["\n"], metadata={"help": "Stop sequences sent with every request (a one-sentence answer has no line break)."})
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
    response_prefix: str = field(default="The user prefers", metadata={"help": "Start of the answer given to the local model, which continues it (small models answer in sentences then)."})
    fallback: str = field(default="none", metadata={"help": "For users still without a sentence: 'none' (fail and list them) or 'offline-keywords' (labelled, counted).", "choices": ["none", "offline-keywords"]})
    max_users: int | None = field(default=None, metadata={"help": "Only the first N users (for trials)."})


ARGUMENTS = (StageArguments, PreferenceArguments)


class AnswerError(Exception):
    """An answer that arrived but is unusable (empty, cut off, too long, an echo of the prompt)."""


class BudgetExhausted(Exception):
    """The next request would take the run past its token budget."""


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
    if text.endswith(":") or re.search(r"(^|\s)\d[.)]\s", text):
        raise AnswerError("a list or an introduction, not one sentence")
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


def cache_key(user: str, args: PreferenceArguments, prompt: str) -> str:
    request = [user, args.backend, args.base_url or "", args.model, args.system_prompt, prompt, args.max_tokens, args.stop, args.temperature,
               args.retry_temperature, args.response_prefix if args.backend == "local" else ""]
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


class OpenAIBackend:
    def __init__(self, args: PreferenceArguments, stats: Counter, ledger: Ledger):
        from openai import OpenAI

        key = os.environ.get(args.api_key_env) or ("not-needed" if args.base_url else None)
        if key is None:
            raise UlmrecError(f"preferences: no API key in ${args.api_key_env}; set it or give --base_url of a local server")
        self.args, self.stats, self.ledger, self.lock = args, stats, ledger, threading.Lock()
        self.throttle = Throttle(args.concurrency)
        self.client = OpenAI(base_url=args.base_url, api_key=key, timeout=args.request_timeout, max_retries=0)

    def count(self, name: str, value: int = 1) -> None:
        with self.lock:
            self.stats[name] += value

    def request(self, prompt: str, attempt: int, retry_invalid: bool):
        a = self.args
        kwargs = {"temperature": a.retry_temperature, "seed": a.seed + attempt} if retry_invalid else {"temperature": a.temperature}
        estimate = (len(prompt) + len(a.system_prompt)) // 3 + 32 + a.max_tokens  # generous: English runs ~4 characters a token
        self.ledger.reserve(estimate)
        used = 0
        try:
            with self.throttle:
                self.count("requests")
                response = self.client.chat.completions.create(
                    model=a.model, max_tokens=a.max_tokens, **({"stop": a.stop} if a.stop else {}), **kwargs,
                    messages=[{"role": "system", "content": a.system_prompt}, {"role": "user", "content": prompt}])
            usage = response.usage.model_dump() if response.usage else {}
            used = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
            for name in ("prompt_tokens", "completion_tokens"):
                self.count(name, int(usage.get(name) or 0))
            return response
        finally:
            self.ledger.settle(estimate, used)

    def ask(self, prompt: str) -> str:
        """One user's answer with retries; raises the last error when they run out."""
        import openai

        a, retry_invalid, invalid = self.args, False, 0
        for attempt in range(a.max_retries + a.invalid_retries + 1):
            wait, reason = 0.0, None
            try:
                response = self.request(prompt, attempt, retry_invalid)
                choice = response.choices[0] if response.choices else None
                if choice is not None and choice.finish_reason == "length":
                    raise AnswerError(f"answer cut off at max_tokens={a.max_tokens}")
                text = validate_answer(choice.message.content if choice else None, prompt, a.max_chars)
                self.throttle.answered()
                return text
            except openai.RateLimitError as e:
                error, reason, wait = e, "rate_limit", retry_after(e.response) or 0.0
            except openai.APITimeoutError as e:
                error, reason, wait = e, "timeout", a.request_timeout  # the server is still working on the abandoned request
                self.throttle.timed_out()
            except openai.APIStatusError as e:
                if e.status_code < 500 and e.status_code not in (408, 409):
                    raise  # a 4xx other than rate limits will not get better by retrying
                error, reason = e, f"http_{e.status_code}"
            except (openai.APIConnectionError, openai.APIResponseValidationError, ValueError) as e:
                error, reason = e, "connection" if isinstance(e, openai.APIConnectionError) else "malformed_response"
            except AnswerError as e:
                error, reason, retry_invalid, invalid = e, f"invalid: {e}", True, invalid + 1
            if invalid > a.invalid_retries or attempt - invalid >= a.max_retries:
                raise error
            self.count(f"retries[{reason}]")
            backoff = min(a.backoff_max, a.backoff_base * 2**attempt) * (0.5 + random.random())
            time.sleep(min(a.backoff_max, max(backoff, wait)))
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


def run_openai(jobs: list[dict], args: PreferenceArguments, cache: Cache, stats: Counter, failures: dict) -> list[str]:
    """Ask for every job; returns the users left unasked because the token budget ran out."""
    from tqdm.auto import tqdm

    ledger = Ledger(args.token_budget)
    backend = OpenAIBackend(args, stats, ledger)
    stopped = []
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool, tqdm(total=len(jobs), desc="preferences", unit="user") as bar:
        futures = {pool.submit(backend.ask, job["prompt"]): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                cache.put({"key": job["key"], "user": job["user"], "preference": future.result()})
                stats["answered"] += 1
            except BudgetExhausted:
                stopped.append(job["user"])
            except Exception as e:  # noqa: BLE001 - any error after retries is recorded per user
                failures[job["user"]] = describe(e)
                if isinstance(e, AnswerError):  # the model's answers, not the server: remembered, so a rerun costs nothing
                    cache.put({"key": job["key"], "user": job["user"], "failed": describe(e)})
            bar.update(1)
            bar.set_postfix(done=stats["answered"], failed=len(failures), tokens=stats["prompt_tokens"] + stats["completion_tokens"],
                            in_flight_limit=backend.throttle.limit)
    stats["lowest_concurrency"] = backend.throttle.lowest
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
            out = model.generate(**enc, max_new_tokens=args.max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        stats["prompt_tokens"] += int(enc["attention_mask"].sum())
        for job, ids in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            stats["completion_tokens"] += int((ids != tokenizer.pad_token_id).sum())
            raw = f"{args.response_prefix}{tokenizer.decode(ids, skip_special_tokens=True)}"
            try:
                cache.put({"key": job["key"], "user": job["user"], "preference": validate_answer(first_sentence(raw), job["prompt"], args.max_chars)})
                stats["answered"] += 1
            except AnswerError as e:
                failures[job["user"]] = f"AnswerError: {e}"
                cache.put({"key": job["key"], "user": job["user"], "failed": failures[job["user"]]})
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


def load_import(path: str) -> dict[str, str]:
    p = Path(path)
    if not p.exists():
        raise UlmrecError(f"{p}: no such preferences file")
    if p.suffix == ".jsonl":
        mapping = {}
        for n, line in text_lines(p):
            if line.strip():
                try:
                    row = json.loads(line)
                    mapping[str(row["user"])] = row["preference"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UlmrecError(f"{p}:{n}: expected a JSON object with 'user' and 'preference' ({e})") from None
        return mapping
    try:
        data = json.loads(read_text(p))
    except json.JSONDecodeError as e:
        raise UlmrecError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise UlmrecError(f"{p}: expected a JSON object mapping user id to preference")
    return {str(k): v for k, v in data.items()}


def file_digest(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path and Path(path).exists() else None


def main(stage: StageArguments, args: PreferenceArguments) -> Path:
    run = RunDir(stage.run_dir)
    if not run.begin("preferences", {**settings_of(args), "import_digest": file_digest(args.import_file)}, stage.overwrite, inputs=("prepare",)):
        return run.path("preferences")
    out, data = run.path("preferences"), run.prepared()
    users = data["users"].to_list()[: args.max_users]
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
                results[u["user"]] = {"preference": keyword_preference(u, titles), "backend": "offline-keywords", "fallback_for": failures.pop(u["user"])}
                stats["fallbacks"] += 1
    rows = [{"user_id": u["user_id"], "user": u["user"], "backend": args.backend, **results[u["user"]]} for u in users if u["user"] in results]
    with open(run.preferences_file, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    summary = summarize(args, source, users, rows, failures, stopped, stats, time.time() - start)
    write_json(out / "summary.json", summary)
    write_json(out / "failures.json", failures)
    logger.info("preferences: %s", json.dumps({k: v for k, v in summary.items() if k != "retries"}))
    if stopped:
        raise UlmrecError(f"preferences: stopped by the token budget ({args.token_budget}) with {len(stopped)} users not asked yet; "
                          f"{len(rows)} answers are cached and the next run resumes from them")
    if failures:
        listed = "; ".join(f"{u}: {r}" for u, r in list(failures.items())[:10])
        raise UlmrecError(f"{len(failures)} of {len(users)} users have no preference (all in {out / 'failures.json'}): {listed}")
    run.finish("preferences", {"summary": summary})
    return out


def summarize(args, source, users, rows, failures, stopped, stats: Counter, seconds: float) -> dict:
    retries = {k[len("retries["):-1]: v for k, v in stats.items() if k.startswith("retries[")}
    return {"backend": args.backend, "model": args.model if args.backend in ("openai", "local") else None, "source": source,
            "users": len(users), "done": len(rows), "failed": len(failures), "not_asked_budget": len(stopped),
            "cached": stats["cached"], "cached_failures": stats["cached_failures"], "answered": stats["answered"], "requests": stats["requests"],
            "prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
            "retries": retries, "retries_total": sum(retries.values()), "fallbacks": stats["fallbacks"],
            "invalid_answer_retry": {"temperature": args.retry_temperature, "seed": f"{args.seed} + attempt"},
            "max_tokens": args.max_tokens, "token_budget": args.token_budget, "lowest_concurrency": stats.get("lowest_concurrency"),
            "wall_time_s": round(seconds, 2), "users_per_s": round(stats["answered"] / max(seconds, 1e-9), 3)}


def simple_backend(users, titles, args, failures) -> dict:
    if args.backend == "offline-keywords":
        return {u["user"]: {"preference": keyword_preference(u, titles)} for u in users}
    if not args.import_file:
        raise UlmrecError("preferences: the import backend needs --import_file")
    mapping = load_import(args.import_file)
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
    cache = Cache(run.cache("preferences", "responses.jsonl"))
    jobs, cuts = [], {}
    for u in users:
        text, cut = user_text(u, args.input, titles, args.review_token_budget * 4)
        prompt = args.prompt.format(reviews=text)
        cut["key"] = cache_key(u["user"], args, prompt)
        cuts[u["user"]] = cut
        entry = cache.entries.get(cut["key"])
        if entry and "failed" in entry and not args.retry_failed:
            failures[u["user"]] = f"{entry['failed']} (in an earlier run; --retry_failed true asks again)"
            stats["cached_failures"] += 1
        elif entry and "preference" in entry:
            stats["cached"] += 1
        else:
            jobs.append({"user": u["user"], "key": cut["key"], "prompt": prompt})
    if stats["cached"] or stats["cached_failures"]:
        logger.info("preferences: resuming: %d users answered from the cache %s (%d failed earlier), %d to request", stats["cached"],
                    cache.path, stats["cached_failures"], len(jobs))
    stopped = (run_openai if args.backend == "openai" else run_local)(jobs, args, cache, stats, failures)
    results = {}
    for user, cut in cuts.items():
        entry = cache.entries.get(cut.pop("key"))
        if entry and "preference" in entry:
            results[user] = {"preference": entry["preference"], "cut": cut}
    return results, stopped, args.base_url or args.model
