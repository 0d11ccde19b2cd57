"""What the benchmark scripts share: running one stage (timed, optionally holding a lock) and the no-alignment flags.
Run-directory files are read through `ulmrec_hf.layout.RunDir`, as the stages read them."""

import contextlib
import time
from pathlib import Path

from ulmrec_hf.runner import NO_ALIGN, split_overrides


def stage_flags(stage: str, overrides: list[str]) -> list[str]:
    """`--stage.key value` overrides of `ulmrec run` as the flags of that one stage."""
    return [arg for s, key, values in split_overrides(overrides) if s == stage for arg in (f"--{key}", *values)]


NO_ALIGN_TASKS = stage_flags("tasks", NO_ALIGN)  # `ulmrec tasks` without any alignment task (the ablation's wo_all_align)


def stage(name: str, run: Path, flags: list[str], recipe: Path | None = None, lock: str | None = None, label: str | None = None) -> float:
    """Run `ulmrec <name>` on `run` (with `recipe`'s section first, when given); its seconds. With `lock`, the stage
    holds that file lock (flock) so that other jobs on a small machine run between stages; waiting is not counted."""
    import fcntl

    from ulmrec_hf.runner import run_stage

    with open(lock, "a") if lock else contextlib.nullcontext() as held:
        if held:
            fcntl.flock(held, fcntl.LOCK_EX)
        start = time.time()
        print(f"== {label or Path(run).name}: ulmrec {name} {' '.join(flags)}", flush=True)
        run_stage(name, [*(["--config", str(recipe)] if recipe else []), "--run_dir", str(run), *flags])
        return round(time.time() - start, 1)


def read_jsonl(path: Path) -> list[dict]:
    """The complete JSON lines of a file (a line cut off by a killed writer is left out)."""
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.endswith("}")]
