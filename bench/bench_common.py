"""What the benchmark scripts share: running one stage (timed, optionally holding a lock), the no-alignment flags, and
per-user NDCG@10 with paired 95 % intervals. Run-directory files are read through `ulmrec_hf.layout.RunDir`, as the
stages read them."""

import contextlib
import json
import math
import time
from pathlib import Path

from ulmrec_hf.runner import NO_ALIGN, split_overrides


def stage_flags(stage: str, overrides: list[str]) -> list[str]:
    """`--stage.key value` overrides of `ulmrec run` as the flags of that one stage."""
    return [arg for s, key, values in split_overrides(overrides) if s == stage for arg in (f"--{key}", *values)]


NO_ALIGN_TASKS = stage_flags("tasks", NO_ALIGN)  # `ulmrec tasks` without any alignment task (the ablation's wo_all_align)


def stage(name: str, run: Path, flags: list[str], recipe: Path | None = None, lock: str | None = None, label: str | None = None,
          wall: tuple[Path, str] | None = None) -> float:
    """Run `ulmrec <name>` on `run` (with `recipe`'s section first, when given); its seconds. With `lock`, the stage
    holds that file lock (flock) so that other jobs on a small machine run between stages; waiting is not counted.
    With `wall` (file, key), the seconds are added to that wall-time file, those of a killed attempt included."""
    from ulmrec_hf.runner import run_stage

    with held(lock), wall_clock(*wall) if wall else contextlib.nullcontext():
        start = time.time()
        print(f"== {label or Path(run).name}: ulmrec {name} {' '.join(flags)}", flush=True)
        run_stage(name, [*(["--config", str(recipe)] if recipe else []), "--run_dir", str(run), *flags])
        return round(time.time() - start, 1)


@contextlib.contextmanager
def held(lock: str | None):
    """Hold the file lock `lock` (flock) while the block runs; no lock when None."""
    import fcntl

    with open(lock, "a") if lock else contextlib.nullcontext() as file:
        if file:
            fcntl.flock(file, fcntl.LOCK_EX)
        yield


def add_wall(path: Path, key: str, seconds: float) -> dict:
    """Add a stage's seconds to a JSON file of wall times (a stage resumed over several calls adds up); the file's dict."""
    from ulmrec_hf.common import write_json

    wall = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    wall[key] = round(wall.get(key, 0) + seconds, 1)
    write_json(Path(path), wall)
    return wall


@contextlib.contextmanager
def wall_clock(path: Path, key: str, beat: float = 30.0):
    """Add the block's seconds to the wall-time file `path` under `key`, also when the process is killed inside it: a
    heartbeat file beside it (`<path>.running`) keeps each running block's seconds so far, and the next block with the
    same key adds what a killed attempt left there (to within `beat` seconds). Both files are written atomically under
    a lock (`<path>.lock`), so processes sharing them do not lose each other's updates."""
    import threading

    running = Path(f"{path}.running")
    with held(f"{path}.lock"):
        left = _set_running(running, key, None)
        if left:
            add_wall(path, key, left)
    start, stop = time.time(), threading.Event()

    def heartbeat():
        while not stop.wait(beat):
            with held(f"{path}.lock"):
                _set_running(running, key, round(time.time() - start, 1))

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with held(f"{path}.lock"):
            _set_running(running, key, None)
            add_wall(path, key, round(time.time() - start, 1))


def _set_running(running: Path, key: str, seconds: float | None) -> float:
    """Set (or, with None, remove) `key` in a heartbeat file; the seconds it held before (0 when none)."""
    from ulmrec_hf.common import write_json

    beats = json.loads(running.read_text()) if running.exists() else {}
    before = beats.pop(key, 0)
    if seconds is not None:
        beats[key] = seconds
    write_json(running, beats)
    return before


def per_user(run: Path) -> dict:
    """Per-user rank NDCG@10 of a finished evaluation's test users: the ranker, fused, retriever (and uid-only) rows."""
    import datasets

    from ulmrec_hf.layout import RunDir
    from ulmrec_hf.metrics import load_metric

    test = datasets.load_from_disk(str(RunDir(run).eval_per_user))["test"]
    ndcg = lambda ranks: load_metric("ranks").compute(predictions=ranks, ks=[10], per_user=True)["per_user"]["ndcg@10"]  # noqa: E731
    columns = {"ranker": "rank", "fused": "fused_rank", "retriever": "retriever_rank", "uid_only": "rank_uid_only",
               "uid_only_swapped_index": "rank_uid_only_swapped_index", "random_order": "rank_random_order"}
    return {row: dict(zip(test["user_id"], ndcg(test[column]))) for row, column in columns.items() if column in test.column_names}


def paired(values: dict, base: dict) -> dict:
    """Mean of `values` and its mean difference from `base` over the same users, with a normal 95 % interval."""
    users = sorted(base)
    x, d = [values[u] for u in users], [values[u] - base[u] for u in users]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    se = lambda v: math.sqrt(sum((e - mean(v)) ** 2 for e in v) / (len(v) - 1) / len(v))  # noqa: E731
    return {"mean": round(mean(x), 4), "diff": round(mean(d), 4), "ci95": [round(mean(d) - 1.96 * se(d), 4), round(mean(d) + 1.96 * se(d), 4)]}


def ci_text(p: dict | None) -> str:
    return "—" if p is None else f"{p['diff']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"


def read_jsonl(path: Path) -> list[dict]:
    """The complete JSON lines of a file (a line cut off by a killed writer is left out)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.endswith("}")]
