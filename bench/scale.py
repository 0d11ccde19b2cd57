"""`prepare` at 1M and 10M reviews: time and peak memory of each engine; `tasks` on full Beauty with every training
prefix: peak memory; both against the issue's targets.

The inputs replicate the shared Musical Instruments 2014 reviews (10,261 lines; `--titles optional`, as it has no meta
file) with renamed users and items: copy r of user A becomes A~r, of item B becomes B~r. 100 copies give 1,026,100
reviews, 1,000 copies 10,261,000.

Usage (one step per call, so that no call holds the machine for long; a measured step is skipped next time):
    python bench/scale.py generate --size 1m         # write bench/runs/scale/1m/reviews_Scale_5.json.gz
    python bench/scale.py measure --size 1m --engine duckdb
    python bench/scale.py tasks                      # `ulmrec tasks` on full Beauty, every prefix, no caps
    python bench/scale.py next                       # the first step not yet done, then the report
    python bench/scale.py report                     # print the table, write bench/results/scale.{json,md}
Peak memory is the largest sum of RSS over the `ulmrec prepare` process and its children (Spark's JVM), sampled
every 0.1 s. `--force` measures a step again.

The `tasks` step reuses the data, LRURec candidates, title index and keyword preferences of bench/beauty_quality.py's
base run (the same `ULMREC_BENCH_RUNS`), and the Beauty SmolLM2 recipe with its row and user caps removed: every
training prefix, every validation and test user.
"""

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "amazon-musical-instruments-2014" / "reviews_Musical_Instruments_5.json.gz"
RUNS = Path(os.environ.get("ULMREC_BENCH_RUNS", ROOT / "bench" / "runs")) / "scale"
RESULTS = ROOT / "bench" / "results"
COPIES = {"1m": 100, "10m": 1000}
ENGINES = ("python", "duckdb", "spark")
GiB = 1 << 30
TARGET_RSS_10M_GIB = 4.0
TARGET_TIME_RATIO_1M = 2.0
TARGET_TASKS_RSS_GIB = 2.0
BEAUTY_BASE = RUNS.parent / "beauty-quality" / "base"
RECIPE = ROOT / "recipes" / "beauty" / "smollm2-135m" / "pipeline.yaml"
TASK_INPUTS = ("prepare", "retrieve", "index", "preferences")
# Not run at 10M: the python engine keeps every row in Python objects (issue 25 measured 2.3 KB a review), about
# 23 GB on a machine of 24 GiB; Spark on 2 local cores would hold the machine for far longer than one call.
SKIP = {("10m", "python"), ("10m", "spark")}


def skip_reason(engine: str, results: dict) -> str:
    one = results["runs"].get(f"1m/{engine}", {})
    if one.get("status") != "ok":
        return "not run"
    scale = COPIES["10m"] / COPIES["1m"]
    if engine == "python":
        per_review = one["peak_rss_gib"] * GiB / one["reviews"]
        return (f"not run: the reference reader holds every row in Python objects, {per_review / 1024:.1f} KiB a review "
                f"at 1M, so about {one['peak_rss_gib'] * scale:.0f} GiB at 10M on this 24 GiB machine")
    return (f"not run: {one['wall_s']:.0f} s at 1M on 2 local cores, so about {one['wall_s'] * scale / 60:.0f} min at 10M, "
            "beyond one bench call (Spark is for a cluster)")


def load() -> dict:
    path = RESULTS / "scale.json"
    return json.loads(path.read_text()) if path.exists() else {"inputs": {}, "runs": {}}


def save(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(results, indent=2) + "\n")


def input_file(size: str) -> Path:
    return RUNS / size / "reviews_Scale_5.json.gz"


def generate(size: str, results: dict) -> None:
    """Copies of the source lines with `~r` appended to every reviewerID and asin (gzip level 1 to save time)."""
    out = input_file(size)
    out.parent.mkdir(parents=True, exist_ok=True)
    block = gzip.decompress(SOURCE.read_bytes())
    marked = re.sub(rb'("(?:reviewerID|asin)": "[^"]*)"', rb'\1~@COPY@"', block)
    start, tmp, written = time.time(), out.with_suffix(".tmp"), 0
    with gzip.open(tmp, "wb", compresslevel=1) as f:
        for r in range(COPIES[size]):
            written += f.write(marked.replace(b"@COPY@", str(r).encode()))
    tmp.rename(out)
    results["inputs"][size] = {"reviews": block.count(b"\n") * COPIES[size], "copies": COPIES[size],
                               "gzip_bytes": out.stat().st_size, "uncompressed_bytes": written,
                               "generate_s": round(time.time() - start, 1)}


def tree_rss(proc) -> int:
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def watch(cmd: list[str], timeout: float) -> tuple[int | None, float, int]:
    """Run `cmd`; (exit code or None when stopped at `timeout`, wall seconds, peak RSS of its process tree)."""
    import psutil

    start, peak = time.time(), 0
    child = subprocess.Popen(cmd)
    proc = psutil.Process(child.pid)
    while child.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.1)
        if time.time() - start > timeout:
            for p in [*proc.children(recursive=True), proc]:
                p.kill()
            child.wait()
            return None, time.time() - start, peak
    return child.returncode, time.time() - start, peak


def status_of(code: int | None, timeout: float) -> str:
    return f"stopped after {timeout:.0f} s (the bench's limit per call)" if code is None else f"failed (exit {code})" if code else "ok"


def measure(size: str, engine: str, results: dict, timeout: float) -> dict:
    run_dir = RUNS / f"run-{size}-{engine}"
    cmd = [sys.executable, "-m", "ulmrec_hf.cli", "prepare", "--run_dir", str(run_dir), "--input", str(input_file(size)),
           "--titles", "optional", "--engine", engine, "--overwrite"]
    code, wall, peak = watch(cmd, timeout)
    row = {"size": size, "engine": engine, "status": status_of(code, timeout), "wall_s": round(wall, 1), "peak_rss_gib": round(peak / GiB, 3)}
    if code != 0:
        return row
    from ulmrec_hf.layout import RunDir

    stats = json.loads(RunDir(run_dir).prepare_stats_file.read_text())
    reviews = results["inputs"][size]["reviews"]
    return {**row, "reviews": reviews, "prepare_s": stats["wall_time_s"], "us_per_review": round(1e6 * wall / reviews, 2),
            "users": stats["users"], "items": stats["items"], "interactions": stats["interactions"],
            "dataset_bytes": sum(p.stat().st_size for p in RunDir(run_dir).path("prepare").rglob("*.arrow"))}


def uncapped_recipe(run_dir: Path) -> Path:
    """The Beauty recipe with the tasks stage's row and user caps removed."""
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    for key in ("max_train_samples", "max_eval_users", "max_validation_users"):
        recipe["tasks"].pop(key, None)
    path = run_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def measure_tasks(timeout: float) -> dict:
    from ulmrec_hf.layout import RunDir
    from ulmrec_hf.runner import link_shared

    missing = [s for s in TASK_INPUTS if not RunDir(BEAUTY_BASE).is_complete(s)]
    if missing:
        return {"status": f"not measured: {BEAUTY_BASE} lacks {missing}; run bench/beauty_quality.py first"}
    run_dir = RUNS / "tasks-beauty"
    link_shared(BEAUTY_BASE, run_dir, TASK_INPUTS)
    cmd = [sys.executable, "-m", "ulmrec_hf.cli", "tasks", "--config", str(uncapped_recipe(run_dir)), "--run_dir", str(run_dir), "--overwrite"]
    code, wall, peak = watch(cmd, timeout)
    row = {"status": status_of(code, timeout), "wall_s": round(wall, 1), "peak_rss_gib": round(peak / GiB, 3)}
    if code != 0:
        return row
    mixture = RunDir(run_dir).mixture()
    return {**row, "train_rows": mixture["train_samples"], "next_item_rows": mixture["next_item_samples"],
            "rows_by_task": {name: t["rows"] for name, t in mixture["tasks"].items()},
            "prepared_interactions": json.loads(RunDir(run_dir).prepare_stats_file.read_text())["interactions"]}


def steps():
    yield ("tasks", None, None)
    for size in COPIES:
        yield ("generate", size, None)
        for engine in ENGINES:
            yield ("measure", size, engine)


def done(step, results: dict) -> bool:
    kind, size, engine = step
    if kind == "tasks":
        return results.get("tasks", {}).get("status") == "ok"
    if kind == "generate":
        return size in results["inputs"] and input_file(size).exists()
    return f"{size}/{engine}" in results["runs"] or (size, engine) in SKIP


def run_step(step, results: dict, timeout: float) -> None:
    kind, size, engine = step
    print(f"== {kind} {size or ''} {engine or ''}", flush=True)
    if kind == "tasks":
        results["tasks"] = measure_tasks(timeout)
    elif kind == "generate":
        generate(size, results)
    else:
        if size not in results["inputs"] or not input_file(size).exists():
            generate(size, results)
            save(results)
        results["runs"][f"{size}/{engine}"] = measure(size, engine, results, timeout)
    save(results)


def targets(results: dict) -> list[dict]:
    runs = results["runs"]
    duck10 = runs.get("10m/duckdb", {})
    rss = duck10.get("peak_rss_gib") if duck10.get("status") == "ok" else None
    rows = [{"target": f"10M reviews through DuckDB, peak RSS < {TARGET_RSS_10M_GIB:g} GiB",
             "measured": "not measured" if rss is None else f"{rss:.2f} GiB",
             "result": "not measured" if rss is None else ("pass" if rss < TARGET_RSS_10M_GIB else "miss")}]
    py1, duck1 = runs.get("1m/python", {}), runs.get("1m/duckdb", {})
    if py1.get("status") == "ok" and duck1.get("status") == "ok":
        ratio = duck1["us_per_review"] / py1["us_per_review"]
        rows.append({"target": f"1M: DuckDB time per review <= {TARGET_TIME_RATIO_1M:g}x the Python reader's",
                     "measured": f"{ratio:.2f}x ({duck1['us_per_review']} vs {py1['us_per_review']} us)",
                     "result": "pass" if ratio <= TARGET_TIME_RATIO_1M else "miss"})
    else:
        rows.append({"target": f"1M: DuckDB time per review <= {TARGET_TIME_RATIO_1M:g}x the Python reader's",
                     "measured": "not measured", "result": "not measured"})
    tasks = results.get("tasks", {})
    rss = tasks.get("peak_rss_gib") if tasks.get("status") == "ok" else None
    rows.append({"target": f"`tasks` on full Beauty with all prefixes, peak RSS < {TARGET_TASKS_RSS_GIB:g} GiB",
                 "measured": "not measured" if rss is None else f"{rss:.2f} GiB ({tasks['train_rows']:,} training rows)",
                 "result": "not measured" if rss is None else ("pass" if rss < TARGET_TASKS_RSS_GIB else "miss")})
    return rows


def report(results: dict) -> str:
    lines = ["# `prepare` at scale (bench/scale.py)", "",
             ("Musical Instruments 2014 reviews copied with renamed users and items, `--titles optional`; "
              "2-core CPU machine, 24 GiB. Time is the whole `ulmrec prepare` process (start-up included); "
              "peak RSS sums the process and its children."), "",
             "| reviews | engine | wall s | µs / review | peak RSS GiB | users | items | interactions | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in COPIES:
        reviews = results["inputs"].get(size, {}).get("reviews", "")
        for engine in ENGINES:
            r = results["runs"].get(f"{size}/{engine}")
            if r is None:
                status = skip_reason(engine, results) if (size, engine) in SKIP else "not measured yet"
                lines.append(f"| {reviews:,} | {engine} | | | | | | | {status} |" if reviews else f"| {size} | {engine} | | | | | | | {status} |")
                continue
            lines.append(f"| {reviews:,} | {engine} | {r['wall_s']} | {r.get('us_per_review', '')} | {r['peak_rss_gib']} | "
                         f"{r.get('users', '')} | {r.get('items', '')} | {r.get('interactions', '')} | {r['status']} |")
    lines += tasks_report(results.get("tasks"))
    lines += ["", "| target | measured | result |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['result']} |" for t in targets(results)]
    return "\n".join(lines) + "\n"


def tasks_report(tasks: dict | None) -> list[str]:
    lines = ["", "`ulmrec tasks` on full Beauty (bench/beauty_quality.py's base run), protocol paper (every training prefix), "
             "no row or user caps; whole process:", "", "| training rows | next-item rows | wall s | peak RSS GiB | status |", "|---|---|---|---|---|"]
    if not tasks:
        return lines + ["| | | | | not measured yet |"]
    return lines + [f"| {tasks.get('train_rows', '')} | {tasks.get('next_item_rows', '')} | {tasks.get('wall_s', '')} | "
                    f"{tasks.get('peak_rss_gib', '')} | {tasks['status']} |"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["generate", "measure", "tasks", "next", "report"])
    parser.add_argument("--size", choices=list(COPIES))
    parser.add_argument("--engine", choices=list(ENGINES))
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--timeout", type=float, default=540, help="Stop a measured run after this many seconds.")
    args = parser.parse_args()
    if not SOURCE.exists():
        print(f"skip: {SOURCE} is absent")
        return 0
    results = load()
    if args.command == "tasks":
        if args.force or not done(("tasks", None, None), results):
            run_step(("tasks", None, None), results, args.timeout)
    elif args.command in ("generate", "measure"):
        step = (args.command, args.size, args.engine if args.command == "measure" else None)
        if args.force or not done(step, results):
            run_step(step, results, args.timeout)
    elif args.command == "next":
        step = next((s for s in steps() if not done(s, results)), None)
        if step is not None:
            run_step(step, results, args.timeout)
    results["targets"] = targets(results)
    save(results)
    text = report(results)
    (RESULTS / "scale.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
