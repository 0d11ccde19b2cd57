"""Preference sentences from real reviews (Musical Instruments 2014): the local SmolLM2 backend on a
seeded subset and the offline-keywords backend on every user. Writes bench/results/preferences_mi.json."""

import json
import sys
import time
from pathlib import Path

from bench_common import read_jsonl

from ulmrec_hf.layout import RunDir

ROOT = Path(__file__).resolve().parents[1]
MI = ROOT.parent / "shared" / "data" / "amazon-musical-instruments-2014"
LOCAL_USERS = 64


def run(run_dir: Path, flags: list[str]) -> dict:
    from ulmrec_hf.common import UlmrecError
    from ulmrec_hf.runner import run_stage

    start = time.time()
    try:
        run_stage("preferences", ["--run_dir", str(run_dir), *flags])
    except UlmrecError as e:  # users the model failed for are part of the result, listed in failures.json
        print(f"preferences: {e}")
    files = RunDir(run_dir)  # read whether or not the stage finished: failures are part of the result
    summary = json.loads(files.preferences_summary_file.read_text())
    rows = read_jsonl(files.preferences_file)
    failures = json.loads(files.preferences_failures_file.read_text())
    return {**summary, "failures": failures, "wall_s_this_call": round(time.time() - start, 1), "examples": [{"user": r["user"], "preference": r["preference"]} for r in rows[:5]]}


def main() -> int:
    from ulmrec_hf.cli import setup_logging

    setup_logging()
    from ulmrec_hf.runner import run_stage

    if not MI.exists():
        print(f"skip: {MI} is absent")
        return 0
    base = ROOT / "bench" / "runs" / "mi-prefs"
    results = {}
    for name, flags in (("local_smollm2", ["--backend", "local", "--model", "smollm2", "--max_users", str(LOCAL_USERS),
                                            "--batch_size", "8", "--review_token_budget", "384"]),
                        ("offline_keywords", ["--backend", "offline-keywords"])):
        run_dir = base / name
        run_stage("prepare", ["--run_dir", str(run_dir), "--input", str(MI), "--titles", "optional"])
        results[name] = run(run_dir, flags)
    out = ROOT / "bench" / "results" / "preferences_mi.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("| backend | users | done | failed | users/s | wall s |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['users']} | {r['done']} | {r['failed']} | {r['users_per_s']} | {r['wall_time_s']} |")
    for name, r in results.items():
        print(f"\n{name}:\n" + "\n".join(f"  {e['user']}: {e['preference']}" for e in r["examples"][:3]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
