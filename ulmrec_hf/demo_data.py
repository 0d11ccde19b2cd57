"""Synthetic demo catalogue in the raw Amazon 2018 format, with a planted structure the method can use.

Planted structure (all seeded):
- Items have a category and a style, and both appear in the title ("Lumera Vegan Matte Lipstick No. 3").
- Items come in series of `series_size` of one category sharing brand, style and line ("Lumera Vegan Matte
  Lipstick No. 1" .. "No. 4"); an item's successor is the next one of its series (the last wraps to the first).
- Each user has a favourite category, a second category and a favourite style (the latent taste).
- Sequences follow taste plus item-to-item transitions: with probability `transition_prob` the next item
  is the current item's successor; otherwise it is drawn by taste match. A sequential retriever learns the
  transitions from co-occurrence; an LLM can read them from the titles.
- Ratings and review texts reflect the match between taste and item: a full match gives 5 stars and
  praise naming the style; a category-only match 4; a mismatch 1-3 with a complaint.
- A few items have no title (or an HTML-escaped one), so the title filter is exercised too.
"""

import gzip
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .common import write_json

logger = logging.getLogger(__name__)

CATEGORIES = ["Lipstick", "Shampoo", "Moisturizer", "Nail Polish", "Perfume", "Sunscreen"]
STYLES = ["Vegan", "Luxury", "Organic", "Travel-Size", "Professional", "Sensitive-Skin"]
ADJECTIVES = ["Matte", "Silky", "Fresh", "Radiant", "Gentle", "Classic", "Velvet", "Pure"]
BRANDS = ["Lumera", "Aveline", "Nordby", "Casimir", "Orla", "Piera", "Sunvale", "Kiyo"]
PRAISE = {
    "Vegan": "no animal ingredients, exactly what I want",
    "Luxury": "feels premium and the packaging is gorgeous",
    "Organic": "clean natural ingredients that I trust",
    "Travel-Size": "small enough for my carry-on",
    "Professional": "salon quality results at home",
    "Sensitive-Skin": "no irritation at all on my sensitive skin",
}


@dataclass
class DemoDataArguments:
    _argument_group_name = "demo-data"
    output: str = field(default="runs/demo/raw", metadata={"help": "Folder for Demo_5.json.gz and meta_Demo.json.gz."})
    seed: int = field(default=42, metadata={"help": "Seed of the synthetic catalogue and users."})
    users: int = field(default=200, metadata={"help": "Number of synthetic users."})
    items: int = field(default=96, metadata={"help": "Number of synthetic items."})
    min_length: int = field(default=6, metadata={"help": "Shortest user sequence."})
    max_length: int = field(default=14, metadata={"help": "Longest user sequence."})
    transition_prob: float = field(default=0.5, metadata={"help": "Chance that the next item is the current item's successor."})
    series_size: int = field(default=4, metadata={"help": "Items per series (same brand, style and line; numbered)."})


ARGUMENTS = (DemoDataArguments,)


def make_items(rng, n: int, series_size: int) -> list[dict]:
    """Series of `series_size` items of one category sharing brand, style and line, numbered within the series."""
    items = []
    for i in range(n):
        series, number = divmod(i, series_size)
        if number == 0:
            cat = CATEGORIES[series % len(CATEGORIES)]
            style, brand = STYLES[int(rng.integers(len(STYLES)))], BRANDS[int(rng.integers(len(BRANDS)))]
            adj = ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]
        items.append({"asin": f"B0DEMO{i:04d}", "category": cat, "style": style, "brand": brand, "series": series,
                      "title": f"{brand} {style} {adj} {cat} No. {number + 1}"})
    # Documented defects that prepare must handle: two untitled items and one HTML-escaped title.
    items[5]["title"], items[11]["title"] = None, "   "
    items[7]["title"] = items[7]["title"].replace(" ", " &amp; ", 1)
    return items


def successors(items: list[dict]) -> dict[int, int]:
    """The next item of each item's series, the last wrapping to the first: the planted item-to-item transitions."""
    members = {}
    for i, it in enumerate(items):
        members.setdefault(it["series"], []).append(i)
    return {a: group[(k + 1) % len(group)] for group in members.values() for k, a in enumerate(group)}


def match(item: dict, taste: dict) -> int:
    """2 = favourite category and style, 1 = one of the user's categories, 0 = mismatch."""
    if item["category"] in taste["categories"]:
        return 2 if item["style"] == taste["style"] else 1
    return 0


def review(rng, item: dict, taste: dict) -> tuple[float, str, str]:
    m = match(item, taste)
    noun = item["category"].lower()
    if m == 2:
        return 5.0, f"Love this {item['style'].lower()} {noun}: {PRAISE[item['style']]}.", "Perfect for me"
    if m == 1:
        return 4.0, f"Good {noun}, though I prefer {taste['style'].lower()} products: {PRAISE[taste['style']]}.", "Nice"
    rating = float(rng.integers(1, 4))
    want = taste["categories"][0].lower()
    return rating, f"Not really for me. I mostly buy {want} and this {noun} did not fit my routine.", "Disappointed"


def taste_cdf(items: list[dict], taste: dict, cache: dict):
    """Cumulative sampling weights of one taste, computed once per taste: O(items) per distinct taste, not per user."""
    key = (*taste["categories"], taste["style"])
    if key not in cache:
        import numpy as np

        cats = taste["categories"]
        weights = [[0.2, 3.0, 12.0][match(it, taste)] * (1.5 if it["category"] == cats[0] else 1.0) for it in items]
        total = sum(weights)
        cdf = np.asarray([w / total for w in weights]).cumsum()
        cache[key] = cdf / cdf[-1]
    return cache[key]


def draw(rng, cdf) -> int:
    """One draw of `rng.choice(len(cdf), p=probs)`: the same uniform number and the same inverse-CDF lookup."""
    return int(cdf.searchsorted(rng.random(), side="right"))


def make_users(rng, items: list[dict], args: DemoDataArguments):
    """Yields the review rows user by user (the file is written as they come)."""
    nxt = successors(items)
    cdfs = {}
    for u in range(args.users):
        cats = [CATEGORIES[int(c)] for c in rng.choice(len(CATEGORIES), size=2, replace=False)]
        taste = {"categories": cats, "style": STYLES[int(rng.integers(len(STYLES)))]}
        cdf = taste_cdf(items, taste, cdfs)
        length = int(rng.integers(args.min_length, args.max_length + 1))
        user = f"AD{int(rng.integers(16**10)):010X}{u:03d}"
        t = 1_400_000_000 + int(rng.integers(0, 30_000_000))
        seen, cur = set(), draw(rng, cdf)
        while len(seen) < length:
            if cur not in seen:
                seen.add(cur)
                rating, text, summary = review(rng, items[cur], taste)
                yield {"overall": rating, "verified": True, "reviewTime": "", "reviewerID": user,
                       "asin": items[cur]["asin"], "reviewerName": f"Demo user {u}", "reviewText": text,
                       "summary": summary, "unixReviewTime": t}
                t += int(rng.integers(86_400, 30 * 86_400))
            follow = rng.random() < args.transition_prob and nxt[cur] not in seen
            cur = nxt[cur] if follow else draw(rng, cdf)


def write_gz_jsonl(path: Path, rows) -> int:
    count = 0
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        for row in rows:
            f.write((json.dumps(row) + "\n").encode())
            count += 1
    return count


def main(args: DemoDataArguments) -> Path:
    """Writes the files every time (under a second): the same arguments give byte-identical files."""
    import numpy as np

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    items = make_items(rng, args.items, args.series_size)
    write_gz_jsonl(out / "meta_Demo.json.gz", [{"asin": it["asin"], "title": it["title"], "brand": it["brand"], "category": ["Beauty", it["category"]]} for it in items])
    reviews = write_gz_jsonl(out / "Demo_5.json.gz", make_users(rng, items, args))
    write_json(out / "planted_structure.json", {"items": items, "transition_prob": args.transition_prob})
    logger.info("demo-data: %d reviews of %d items by %d users -> %s", reviews, len(items), args.users, out)
    return out
