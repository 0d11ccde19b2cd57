"""Amazon review and metadata records: one line to one record, with skipped rows counted by reason and named by
file and line. Every prepare engine reads lines through these functions, so their rules are the same."""

import ast
import html
import json
import logging
import re
from collections import Counter, defaultdict
from pathlib import Path
from .common import UlmrecError, text_lines

logger = logging.getLogger(__name__)

SIGNALS = ("ratings", "timestamps", "reviews", "summaries")
FIELDS = {
    "amazon2014": dict(user="reviewerID", item="asin", rating="overall", text="reviewText", summary="summary", time="unixReviewTime"),
    "amazon2023": dict(user="user_id", item="parent_asin", rating="rating", text="text", summary="title", time="timestamp"),
}
FIELDS["amazon2018"] = FIELDS["amazon2014"]
META_ITEM = {"amazon2014": "asin", "amazon2018": "asin", "amazon2023": "parent_asin"}


class SkipLog:
    """Counts skipped rows by reason and keeps a few `file:line` examples of each."""

    def __init__(self, examples: int = 5):
        self.counts = Counter()
        self.examples = defaultdict(list)
        self.max_examples = examples

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append(where)
        if self.counts[reason] <= 3:
            logger.warning("skipped row (%s) at %s", reason, where)

    def as_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": dict(sorted(self.examples.items()))}


def clean_title(title) -> str | None:
    """Unescape HTML entities and normalise whitespace; None when nothing usable is left."""
    if not isinstance(title, str):
        return None
    title = re.sub(r"\s+", " ", html.unescape(title)).strip()
    return title or None


def iter_lines(path: Path):
    """Yield (line_number, text) of non-empty lines; bad bytes, a truncated or a corrupt gzip are clear errors."""
    for n, line in text_lines(path):
        if line.strip():
            yield n, line


def parse_record(line: str, skips: SkipLog, where: str, counter: Counter) -> dict | None:
    """JSON first; the 2014 meta files hold Python literals, which `ast.literal_eval` reads safely."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        try:
            record = ast.literal_eval(line.strip())
            counter["python_literal_lines"] += 1
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            skips.add("malformed_line", where)
            return None
    if not isinstance(record, dict):
        skips.add("not_an_object", where)
        return None
    return record


def review_from_line(line: str, fmt: str, where: str, skips: SkipLog, notes: Counter) -> dict | None:
    """One review row of a non-blank line, or None with the reason counted."""
    f = FIELDS[fmt]
    rec = parse_record(line, skips, where, notes)
    if rec is None:
        return None
    missing = [f[k] for k in ("user", "item") if not rec.get(f[k])]
    if missing:
        skips.add(f"missing_field:{missing[0]}", where)
        return None
    rating = rec.get(f["rating"])
    ts = rec.get(f["time"])
    if ts is not None:
        try:
            ts = int(ts) // 1000 if fmt == "amazon2023" else int(ts)  # 2023 times are milliseconds
        except (TypeError, ValueError):
            skips.add(f"bad_field:{f['time']}", where)
            return None
    if rating is not None:
        try:
            rating = float(rating)
        except (TypeError, ValueError):
            skips.add(f"bad_field:{f['rating']}", where)
            return None
    text = rec.get(f["text"])
    if not isinstance(text, str) or not text.strip():
        notes["empty_review_text"] += 1
        text = ""
    return dict(user=str(rec[f["user"]]), item=str(rec[f["item"]]), rating=rating, timestamp=ts, review=text,
                summary=rec.get(f["summary"]) or "")


def read_reviews(path: Path, fmt: str, skips: SkipLog, notes: Counter) -> list[dict]:
    rows = []
    for n, line in iter_lines(path):
        row = review_from_line(line, fmt, f"{path}:{n}", skips, notes)
        if row is not None:
            rows.append({**row, "order": len(rows)})
    if not rows:
        raise no_reviews(path, skips)
    return rows


def no_reviews(path: Path, skips: SkipLog) -> UlmrecError:
    return UlmrecError(f"{path}: no usable review rows ({sum(skips.counts.values())} skipped: {dict(skips.counts)})")


def meta_record(line: str, key: str, where: str, skips: SkipLog, notes: Counter) -> dict | None:
    """A meta record that names its item, or None with the reason counted."""
    rec = parse_record(line, skips, where, notes)
    if rec is None:
        return None
    if not rec.get(key):
        skips.add(f"meta_missing_field:{key}", where)
        return None
    return rec


def read_titles(path: Path, fmt: str, wanted: set[str], skips: SkipLog, notes: Counter) -> dict[str, str | None]:
    key = META_ITEM[fmt]
    titles = {}
    for n, line in iter_lines(path):
        rec = meta_record(line, key, f"{path}:{n}", skips, notes)
        if rec is not None and rec[key] in wanted and rec[key] not in titles:
            titles[rec[key]] = clean_title(rec.get("title"))
    return titles


def count_stats(n_users: int, n_items: int, n_inter: int) -> dict:
    return {
        "users": n_users,
        "items": n_items,
        "interactions": n_inter,
        "avg_length": round(n_inter / n_users, 4),
        "sparsity": round(1 - n_inter / (n_users * n_items), 6),
    }
