"""Synthetic demo catalogue in the raw Amazon 2018 format, with a planted structure the method can use.

Planted structure (all seeded):
- Items have a category and a style, and both appear in the title ("Lumera Vegan Matte Lipstick No. 3").
- Each user has a favourite category, a second category and a favourite style (the latent taste).
- Sequences follow taste plus item-to-item transitions: with probability `transition_prob` the next item
  is the current item's fixed successor in its category; otherwise it is drawn by taste match.
- Ratings and review texts reflect the match between taste and item: a full match gives 5 stars and
  praise naming the style; a category-only match 4; a mismatch 1-3 with a complaint.
- A few items have no title (or an HTML-escaped one), so the title filter is exercised too.
"""

import gzip
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .common import RunArguments, write_json

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
    demo_output: str = field(default="runs/demo/raw", metadata={"help": "Folder for Demo_5.json.gz and meta_Demo.json.gz."})
    demo_users: int = field(default=200, metadata={"help": "Number of synthetic users."})
    demo_items: int = field(default=96, metadata={"help": "Number of synthetic items."})
    demo_min_length: int = field(default=6, metadata={"help": "Shortest user sequence."})
    demo_max_length: int = field(default=14, metadata={"help": "Longest user sequence."})
    transition_prob: float = field(default=0.5, metadata={"help": "Chance that the next item is the current item's successor."})


def make_items(rng, n: int) -> list[dict]:
    items = []
    for i in range(n):
        cat, style = CATEGORIES[i % len(CATEGORIES)], STYLES[int(rng.integers(len(STYLES)))]
        brand, adj = BRANDS[int(rng.integers(len(BRANDS)))], ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]
        title = f"{brand} {style} {adj} {cat} No. {i // len(CATEGORIES) + 1}"
        items.append({"asin": f"B0DEMO{i:04d}", "category": cat, "style": style, "brand": brand, "title": title})
    # Documented defects that prepare must handle: two untitled items and one HTML-escaped title.
    items[5]["title"], items[11]["title"] = None, "   "
    items[7]["title"] = items[7]["title"].replace(" ", " &amp; ", 1)
    return items


def successors(rng, items: list[dict]) -> dict[int, int]:
    """A fixed random cycle through each category's items: the planted item-to-item transitions."""
    nxt = {}
    for cat in CATEGORIES:
        idx = [i for i, it in enumerate(items) if it["category"] == cat]
        order = [idx[j] for j in rng.permutation(len(idx))]
        nxt.update({a: b for a, b in zip(order, order[1:] + order[:1])})
    return nxt


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


def make_users(rng, items: list[dict], args: DemoDataArguments) -> list[dict]:
    nxt = successors(rng, items)
    rows = []
    for u in range(args.demo_users):
        cats = [CATEGORIES[int(c)] for c in rng.choice(len(CATEGORIES), size=2, replace=False)]
        taste = {"categories": cats, "style": STYLES[int(rng.integers(len(STYLES)))]}
        weights = [[0.2, 3.0, 12.0][match(it, taste)] * (1.5 if it["category"] == cats[0] else 1.0) for it in items]
        probs = [w / sum(weights) for w in weights]
        length = int(rng.integers(args.demo_min_length, args.demo_max_length + 1))
        user = f"AD{int(rng.integers(16**10)):010X}{u:03d}"
        t = 1_400_000_000 + int(rng.integers(0, 30_000_000))
        seen, cur = set(), int(rng.choice(len(items), p=probs))
        while len(seen) < length:
            if cur not in seen:
                seen.add(cur)
                rating, text, summary = review(rng, items[cur], taste)
                rows.append({"overall": rating, "verified": True, "reviewTime": "", "reviewerID": user,
                             "asin": items[cur]["asin"], "reviewerName": f"Demo user {u}", "reviewText": text,
                             "summary": summary, "unixReviewTime": t})
                t += int(rng.integers(86_400, 30 * 86_400))
            follow = rng.random() < args.transition_prob and nxt[cur] not in seen
            cur = nxt[cur] if follow else int(rng.choice(len(items), p=probs))
    return rows


def write_gz_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        for row in rows:
            f.write((json.dumps(row) + "\n").encode())


def main(run_args: RunArguments, args: DemoDataArguments) -> Path:
    import numpy as np

    out = Path(args.demo_output)
    reviews, meta = out / "Demo_5.json.gz", out / "meta_Demo.json.gz"
    if reviews.exists() and meta.exists() and not run_args.overwrite:
        logger.info("demo-data: %s already exists; skipping", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(run_args.seed)
    items = make_items(rng, args.demo_items)
    rows = make_users(rng, items, args)
    write_gz_jsonl(meta, [{"asin": it["asin"], "title": it["title"], "brand": it["brand"], "category": ["Beauty", it["category"]]} for it in items])
    write_gz_jsonl(reviews, rows)
    write_json(out / "planted_structure.json", {"items": items, "transition_prob": args.transition_prob})
    logger.info("demo-data: %d reviews of %d items by %d users -> %s", len(rows), len(items), args.demo_users, out)
    return out
