"""The `openai` preference backend against a real OpenAI-compatible server on loopback (issue 15).

Starts `transformers serve` (pip install -e .[bench]) on 127.0.0.1 with the cached SmolLM2-135M-Instruct checkpoint, then:
1. asks it for the preferences of 24 real Musical Instruments users (concurrency 2, reviews cut to 384 tokens, the
   stage's defaults otherwise: max_tokens 64, a line-break stop, 5 retries);
2. runs the stage again with --overwrite: every answer comes from the named cache, 0 requests;
3. in a fresh run directory, kills the stage with SIGKILL once some answers are stored, and resumes it: no user whose
   answer was stored is asked again;
4. sets a canary API key for all of it, and greps run directories and logs for it.
Records users/s, requests and tokens per user, retries by reason, and stops the server it started.
Writes bench/results/preferences_server.json.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MI = ROOT.parent / "shared" / "data" / "amazon-musical-instruments-2014"
RUNS = ROOT / "bench" / "runs" / "preferences-server"
USERS, CANARY = 24, "sk-canary-ulmrec-7f3a9c"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "transformers"), "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--dtype", "bfloat16", "--log-level", "info"]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
        if proc.poll() is not None:
            raise SystemExit(f"transformers serve exited ({proc.returncode}); see {log}")
    proc.kill()
    raise SystemExit(f"transformers serve did not answer within 180 s; see {log}")


def stage_cmd(run: Path, port: int, model: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ulmrec_hf.cli", "preferences", "--run_dir", str(run), "--backend", "openai", "--base_url",
            f"http://127.0.0.1:{port}/v1", "--model", model, "--max_users", str(USERS), "--concurrency", "2", "--request_timeout", "60",
            "--review_token_budget", "384", *extra]


def run_stage(cmd: list[str], log: Path) -> tuple[int, float]:
    start = time.time()
    with open(log, "a") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OPENAI_API_KEY": CANARY}).returncode
    return code, round(time.time() - start, 1)


def summary(run: Path) -> dict:
    s = json.loads((run / "preferences" / "summary.json").read_text())
    per_user = lambda k: round(s[k] / max(1, s["answered"]), 2)  # noqa: E731
    return {k: s[k] for k in ("users", "done", "failed", "cached", "answered", "requests", "prompt_tokens", "completion_tokens", "retries",
                              "lowest_concurrency", "wall_time_s", "users_per_s")} | {
        "requests_per_answered_user": per_user("requests"), "tokens_per_answered_user": round((s["prompt_tokens"] + s["completion_tokens"]) / max(1, s["answered"]), 1)}


def cached_users(run: Path) -> tuple[set[str], set[str]]:
    """(users with a stored answer, users with a stored failure) in the answer cache."""
    path = run / "cache" / "preferences" / "responses.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []
    return {r["user"] for r in rows if "preference" in r}, {r["user"] for r in rows if "failed" in r}


def killed_and_resumed(port: int, model: str, log: Path) -> dict:
    run = RUNS / "killed"
    subprocess.run([sys.executable, "-m", "ulmrec_hf.cli", "prepare", "--run_dir", str(run), "--input", str(MI), "--titles", "optional"], check=True)
    proc = subprocess.Popen(stage_cmd(run, port, model), stdout=open(log, "a"), stderr=subprocess.STDOUT, env={**os.environ, "OPENAI_API_KEY": CANARY})
    deadline = time.time() + 240
    while time.time() < deadline and sum(map(len, cached_users(run))) < USERS // 3 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    answers, failed = cached_users(run)
    time.sleep(5)  # requests of the killed process finish on the server (nobody reads them)
    code, wall = run_stage(stage_cmd(run, port, model), log)
    s = json.loads((run / "preferences" / "summary.json").read_text())
    # every stored answer is read back, so only the other users are asked (a request cut off by the kill is asked again)
    return {"answers_stored_before_kill": len(answers), "failures_stored_before_kill": len(failed), "resumed_exit_code": code,
            "resumed_wall_s": wall, "answers_read_on_resume": s["cached"], "failures_read_on_resume": s["cached_failures"],
            "requests_after_resume": s["requests"], "answered_after_resume": s["answered"], "done": s["done"], "failed": s["failed"]}


def canary_hits(paths: list[Path]) -> int:
    hits = 0
    for root in paths:
        for f in ([root] if root.is_file() else root.rglob("*")):
            if f.is_file() and CANARY.encode() in f.read_bytes():
                hits += 1
                print(f"canary found in {f}")
    return hits


def main() -> int:
    from ulmrec_hf.llm import resolve_model_path

    if not MI.exists():
        print(f"skip: {MI} is absent")
        return 0
    import shutil

    shutil.rmtree(RUNS, ignore_errors=True)
    RUNS.mkdir(parents=True)
    model, port = resolve_model_path("smollm2"), free_port()
    server_log, stage_log = RUNS / "server.log", RUNS / "stage.log"
    started = time.time()
    server = start_server(model, port, server_log)
    result = {"server": "transformers serve (SmolLM2-135M-Instruct, CPU, bf16) on 127.0.0.1", "users": USERS, "concurrency": 2,
              "server_start_s": round(time.time() - started, 1)}
    try:
        run = RUNS / "first"
        subprocess.run([sys.executable, "-m", "ulmrec_hf.cli", "prepare", "--run_dir", str(run), "--input", str(MI), "--titles", "optional"], check=True)
        code, wall = run_stage(stage_cmd(run, port, model), stage_log)
        result["first_run"] = {"exit_code": code, "wall_s": wall, **summary(run)}
        code, wall = run_stage(stage_cmd(run, port, model, "--overwrite"), stage_log)
        result["rerun_overwrite"] = {"exit_code": code, "wall_s": wall, **summary(run)}
        result["killed_and_resumed"] = killed_and_resumed(port, model, stage_log)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    result["server_stopped"] = server.poll() is not None
    result["canary_hits"] = canary_hits([RUNS])
    result["total_wall_s"] = round(time.time() - started, 1)
    first, again, killed = result["first_run"], result["rerun_overwrite"], result["killed_and_resumed"]
    result["checks"] = {"all_users_answered_or_listed": first["done"] + first["failed"] == USERS,
                        "first_run_under_5_minutes": first["wall_s"] < 300, "rerun_sent_0_requests": again["requests"] == 0,
                        "resume_asked_no_stored_user_again": (killed["answers_read_on_resume"], killed["failures_read_on_resume"])
                        == (killed["answers_stored_before_kill"], killed["failures_stored_before_kill"]),
                        "canary_0_hits": result["canary_hits"] == 0}
    (ROOT / "bench" / "results" / "preferences_server.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| run | exit | users done / failed | requests | tokens/user | users/s | wall s |\n|---|---|---|---|---|---|---|")
    for name in ("first_run", "rerun_overwrite"):
        r = result[name]
        print(f"| {name} | {r['exit_code']} | {r['done']} / {r['failed']} | {r['requests']} | {r['tokens_per_answered_user']} | {r['users_per_s']} | {r['wall_s']} |")
    print(f"killed after {killed['answers_stored_before_kill']} stored answers and {killed['failures_stored_before_kill']} stored failures; "
          f"the resumed run read {killed['answers_read_on_resume']} and {killed['failures_read_on_resume']} from the cache and sent "
          f"{killed['requests_after_resume']} requests for the other users; canary hits: {result['canary_hits']}")
    print(json.dumps(result["checks"]))
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
