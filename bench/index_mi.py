"""User index on real reviews (Musical Instruments 2014, 1,429 users) and on Beauty preference sentences.

Reports unique indices, collision rate before repair, codebook usage, wall time, and a check that the
codes mean something: users sharing their first code vs random pairs, by the mean cosine of their
*held-out* review embeddings (the validation/test reviews, never used to build the index).
Writes bench/results/index_mi.json. Resumable: finished stages in bench/runs/ are kept.
"""

import json
import random
import sys
from pathlib import Path

from bench_common import stage

from ulmrec_hf.layout import RunDir

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MI = DATA / "amazon-musical-instruments-2014"
BEAUTY = DATA / "amazon-beauty-ulmrec"


def heldout_similarity(run: Path, seed: int = 0) -> dict:
    """Mean cosine of held-out review embeddings: same first code vs random pairs."""
    import torch

    from ulmrec_hf.index import IndexArguments, TextEncoder, user_texts

    users = RunDir(run).prepared()["users"].to_list()
    codes = RunDir(run).index_table()["codes"]
    _, held = user_texts(users, IndexArguments(), {}, None)
    keep = [i for i, h in enumerate(held) if h]
    encoder = TextEncoder("all-minilm-l6-v2", 64, 256)
    vectors = torch.nn.functional.normalize(torch.stack([encoder.encode(held[i]).mean(0) for i in keep]), dim=-1)
    first = [codes[i][0] for i in keep]
    sims = vectors @ vectors.T
    same = [(a, b) for a in range(len(keep)) for b in range(a + 1, len(keep)) if first[a] == first[b]]
    rng = random.Random(seed)
    rand = [tuple(rng.sample(range(len(keep)), 2)) for _ in range(20000)]
    shuffled = first[:]
    rng.shuffle(shuffled)
    perm_same = [(a, b) for a in range(len(keep)) for b in range(a + 1, len(keep)) if shuffled[a] == shuffled[b]]
    mean = lambda pairs: float(sum(sims[a, b] for a, b in pairs) / max(1, len(pairs)))  # noqa: E731
    same_cos, rand_cos, perm_cos = mean(same), mean(rand), mean(perm_same)
    return {"users_with_heldout_text": len(keep), "same_first_code_pairs": len(same), "same_first_code_mean_cos": round(same_cos, 4),
            "random_pairs_mean_cos": round(rand_cos, 4), "ratio_same_over_random": round(same_cos / rand_cos, 4),
            "control_shuffled_codes_ratio": round(perm_cos / rand_cos, 4)}


def main() -> int:
    from ulmrec_hf.cli import setup_logging

    setup_logging()
    results = {}
    if MI.exists():
        run = ROOT / "bench" / "runs" / "mi"
        prep = stage("prepare", run, ["--input", str(MI), "--titles", "optional"])
        wall = stage("index", run, ["--text_source", "reviews", "--encoder", "all-minilm-l6-v2"])
        stats = RunDir(run).index_stats()
        results["musical_instruments_reviews"] = {
            "prepare_wall_s": prep, "index_wall_s_this_call": wall, "index_wall_s": stats["wall_time_s"], "users": stats["users"],
            "unique": stats["unique"], "collision_rate_before": stats["collision_rate_before"], "collision_rate_after": stats["collision_rate_after"],
            "users_moved": stats["users_moved"], "codebook": stats["codebook"], "reconstruction_mse": stats["reconstruction_mse"],
            "texts": stats["texts"], "meaning_check": heldout_similarity(run)}
    if BEAUTY.exists():
        run = ROOT / "bench" / "runs" / "beauty-index"
        stage("prepare", run, ["--input", str(BEAUTY / "dataset.json")])
        wall = stage("index", run, ["--text_source", "preferences", "--preferences_file", str(BEAUTY / "preferences.json"), "--rq_epochs", "100"])
        stats = RunDir(run).index_stats()
        results["beauty_preferences"] = {k: stats[k] for k in ("users", "unique", "collision_rate_before", "collision_rate_after",
                                                                "users_moved", "codebook", "users_without_text", "wall_time_s")}
        results["beauty_preferences"]["index_wall_s_this_call"] = wall
    out = ROOT / "bench" / "results" / "index_mi.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("| data | users | unique | collisions before | after | level-1 codes used | wall s | same-code/random cos |\n|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        meaning = r.get("meaning_check", {}).get("ratio_same_over_random", "n/a")
        print(f"| {name} | {r['users']} | {r['unique']} | {r['collision_rate_before']} | {r['collision_rate_after']} | "
              f"{r['codebook'][0]['codes_used']} | {r.get('index_wall_s', r.get('wall_time_s'))} | {meaning} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
