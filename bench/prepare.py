"""Time the data stage on real data: Beauty (LlamaRec import) and Gift Cards (raw Amazon 2018)."""

import json
import sys
import tempfile
import time
from pathlib import Path

from ulmrec_hf.common import StageArguments, read_json
from ulmrec_hf.layout import RunDir
from ulmrec_hf.prepare import PrepareArguments, main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CASES = {
    "beauty (dataset.json import)": DATA / "amazon-beauty-ulmrec" / "dataset.json",
    "gift cards (raw 2018)": DATA / "amazon-gift-cards-2018",
}
TARGET_BEAUTY_S = 10.0


def main_bench() -> int:
    rows = []
    for name, path in CASES.items():
        if not path.exists():
            print(f"skip {name}: {path} is absent")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            out = main(StageArguments(run_dir=tmp), PrepareArguments(input=str(path)))
            wall = time.perf_counter() - start
            stats = read_json(RunDir(tmp).prepare_stats_file)
        rows.append({"case": name, "wall_s": round(wall, 2), **{k: stats[k] for k in ("users", "items", "interactions", "avg_length", "sparsity")},
                     "skipped": sum(stats["skipped"]["counts"].values())})
    print(f"| {' | '.join(rows[0])} |\n|{'---|' * len(rows[0])}")
    for r in rows:
        print(f"| {' | '.join(str(v) for v in r.values())} |")
    beauty = next((r for r in rows if r["case"].startswith("beauty")), None)
    result = {"rows": rows, "target_beauty_s": TARGET_BEAUTY_S, "beauty_within_target": beauty is not None and beauty["wall_s"] < TARGET_BEAUTY_S}
    out = Path(__file__).parent / "results" / "prepare.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
