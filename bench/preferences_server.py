"""The `openai` preference backend against a real OpenAI-compatible server on loopback (issues 15 and 22).

Starts `transformers serve` (pip install -e .[bench]) on 127.0.0.1 pinned to the cached SmolLM2-135M-Instruct checkpoint, then:
1. runs the stage with a model name the server does not serve (`smollm2-135m-instruct`): it must stop after at most
   `concurrency` requests with the server's own message and the models GET /v1/models offers;
2. asks it for the preferences of 24 real Musical Instruments users (concurrency 2, reviews cut to 384 tokens, the
   stage's defaults otherwise: answer_mode auto, max_tokens 64, 5 retries), and records the answering mode it chose,
   salvaged answers and the failures with their last rejected answers;
3. runs the stage again with --overwrite: every answer comes from the named cache, 0 requests; then with --overwrite and
   --answer_mode chat: answers stored in another mode are read back too, so only users without a stored answer are asked;
4. in a fresh run directory, kills the stage with SIGKILL once some answers are stored, and resumes it: no user whose
   answer was stored is asked again;
5. for comparison, the same 24 users with --answer_mode chat (the only way the stage asked before issue 22; now with no
   stop sequence, room for an introduction, and salvage);
6. sets a canary API key for all of it, and greps run directories and logs for it.
Requests are counted by the stage and, independently, in the server's access log. Stops the server it started.
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

from bench_common import read_jsonl

from ulmrec_hf.layout import RunDir

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


def server_posts(log: Path) -> int:
    """POST requests in the server's access log."""
    return sum('"POST /v1/' in line for line in log.read_text(errors="replace").splitlines()) if log.exists() else 0


def stage_cmd(run: Path, port: int, model: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ulmrec_hf.cli", "preferences", "--run_dir", str(run), "--backend", "openai", "--base_url",
            f"http://127.0.0.1:{port}/v1", "--model", model, "--max_users", str(USERS), "--concurrency", "2", "--request_timeout", "60",
            "--review_token_budget", "384", *extra]


def run_stage(cmd: list[str], log: Path, server_log: Path) -> tuple[int, float, int, str]:
    """Exit code, wall seconds, POSTs the server saw, and the stage's last error line."""
    start, posts = time.time(), server_posts(server_log)
    with open(log, "a") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OPENAI_API_KEY": CANARY})
        f.write(proc.stdout)
    time.sleep(0.5)  # the access log line follows the answer
    error = next((line for line in reversed(proc.stdout.splitlines()) if "error:" in line), "")
    return proc.returncode, round(time.time() - start, 1), server_posts(server_log) - posts, error


def prepare(run: Path) -> None:
    subprocess.run([sys.executable, "-m", "ulmrec_hf.cli", "prepare", "--run_dir", str(run), "--input", str(MI), "--titles", "optional"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summary(run: Path) -> dict:
    s = json.loads(RunDir(run).preferences_summary_file.read_text())
    rows = read_jsonl(RunDir(run).preferences_file)
    per_user = lambda k: round(s[k] / max(1, s["answered"]), 2)  # noqa: E731
    keys = ("users", "done", "failed", "cached", "answered", "salvaged", "answer_mode", "answer_mode_source", "answers_by_mode", "requests",
            "prompt_tokens", "completion_tokens", "retries", "identical_answers", "max_tokens", "lowest_concurrency", "wall_time_s", "users_per_s")
    return {k: s[k] for k in keys} | {
        "salvaged_rows": sum(bool(r.get("salvaged")) for r in rows),
        "requests_per_answered_user": per_user("requests"), "tokens_per_answered_user": round((s["prompt_tokens"] + s["completion_tokens"]) / max(1, s["answered"]), 1)}


def examples(run: Path) -> dict:
    """A few answers (salvaged ones first) and every failure with its last rejected answer."""
    rows = read_jsonl(RunDir(run).preferences_file)
    rows.sort(key=lambda r: not r.get("salvaged"))
    entries = read_jsonl(RunDir(run).preferences_cache)
    raw = {e["user"]: e.get("salvaged_from") for e in entries if "preference" in e}
    return {"answers": [{"user": r["user"], "preference": r["preference"], **({"salvaged_from": raw.get(r["user"])} if r.get("salvaged") else {})}
                        for r in rows[:4]],
            "failures": json.loads(RunDir(run).preferences_failures_file.read_text())}


def wrong_model(port: int, log: Path, server_log: Path) -> dict:
    """The model name of the issue: not the one the server is pinned to."""
    run = RUNS / "wrong-model"
    prepare(run)
    code, wall, posts, error = run_stage(stage_cmd(run, port, "smollm2-135m-instruct"), log, server_log)
    return {"exit_code": code, "wall_s": wall, "requests_seen_by_server": posts, "error": error.split("error: ", 1)[-1]}


def cached_users(run: Path) -> tuple[set[str], set[str]]:
    """(users with a stored answer, users with a stored failure) in the answer cache."""
    path = RunDir(run).preferences_cache
    rows = read_jsonl(path) if path.exists() else []
    return {r["user"] for r in rows if "preference" in r}, {r["user"] for r in rows if "failed" in r}


def killed_and_resumed(port: int, model: str, log: Path, server_log: Path) -> dict:
    run = RUNS / "killed"
    prepare(run)
    proc = subprocess.Popen(stage_cmd(run, port, model), stdout=open(log, "a"), stderr=subprocess.STDOUT, env={**os.environ, "OPENAI_API_KEY": CANARY})
    deadline = time.time() + 240
    while time.time() < deadline and sum(map(len, cached_users(run))) < USERS // 3 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    answers, failed = cached_users(run)
    time.sleep(5)  # requests of the killed process finish on the server (nobody reads them)
    size = len(RunDir(run).preferences_cache.read_text().splitlines())
    code, wall, posts, _ = run_stage(stage_cmd(run, port, model), log, server_log)
    s = json.loads(RunDir(run).preferences_summary_file.read_text())
    later = [json.loads(line) for line in RunDir(run).preferences_cache.read_text().splitlines()[size:]]
    # every stored answer is read back, so only the other users are asked (a request cut off by the kill is asked again)
    return {"answers_stored_before_kill": len(answers), "failures_stored_before_kill": len(failed), "resumed_exit_code": code,
            "resumed_wall_s": wall, "answers_read_on_resume": s["cached"], "failures_read_on_resume": s["cached_failures"],
            "requests_after_resume": s["requests"], "requests_seen_by_server_after_resume": posts, "answered_after_resume": s["answered"],
            "stored_users_stored_again": len({e["user"] for e in later} & (answers | failed)), "done": s["done"], "failed": s["failed"]}


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
    result = {"server": "transformers serve (SmolLM2-135M-Instruct, CPU, bf16) on 127.0.0.1, pinned to the model folder", "users": USERS,
              "concurrency": 2, "server_start_s": round(time.time() - started, 1)}
    try:
        result["wrong_model_name"] = wrong_model(port, stage_log, server_log)
        run = RUNS / "first"
        prepare(run)
        code, wall, posts, _ = run_stage(stage_cmd(run, port, model), stage_log, server_log)
        result["first_run"] = {"exit_code": code, "wall_s": wall, "requests_seen_by_server": posts, **summary(run), **examples(run)}
        code, wall, posts, _ = run_stage(stage_cmd(run, port, model, "--overwrite"), stage_log, server_log)
        result["rerun_overwrite"] = {"exit_code": code, "wall_s": wall, "requests_seen_by_server": posts, **summary(run)}
        code, wall, posts, _ = run_stage(stage_cmd(run, port, model, "--overwrite", "--answer_mode", "chat"), stage_log, server_log)
        result["rerun_other_mode"] = {"exit_code": code, "wall_s": wall, "requests_seen_by_server": posts, **summary(run)}
        result["killed_and_resumed"] = killed_and_resumed(port, model, stage_log, server_log)
        run = RUNS / "chat-mode"
        prepare(run)
        code, wall, posts, _ = run_stage(stage_cmd(run, port, model, "--answer_mode", "chat"), stage_log, server_log)
        result["chat_mode_for_comparison"] = {"exit_code": code, "wall_s": wall, "requests_seen_by_server": posts, **summary(run)}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    result["server_stopped"] = server.poll() is not None
    result["canary_hits"] = canary_hits([RUNS])
    result["total_wall_s"] = round(time.time() - started, 1)
    first, again, killed, wrong = result["first_run"], result["rerun_overwrite"], result["killed_and_resumed"], result["wrong_model_name"]
    other = result["rerun_other_mode"]
    result["checks"] = {"wrong_model_stopped_within_concurrency": wrong["exit_code"] == 2 and 1 <= wrong["requests_seen_by_server"] <= 2,
                        "wrong_model_error_has_server_message_and_models": "Server is pinned to" in wrong["error"] and model in wrong["error"]
                        and "GET /v1/models" in wrong["error"],
                        "at_least_22_of_24_answered": first["done"] >= 22, "all_users_answered_or_listed": first["done"] + first["failed"] == USERS,
                        "every_salvaged_answer_counted": first["salvaged"] == first["salvaged_rows"],
                        "first_run_under_5_minutes": first["wall_s"] < 300,
                        "rerun_sent_0_requests": again["requests"] == 0 and again["requests_seen_by_server"] == 0,
                        "other_mode_rerun_read_every_stored_answer": other["cached"] == first["done"] and other["answers_by_mode"].get(
                            first["answer_mode"], 0) == first["done"],
                        "resume_asked_no_stored_user_again": (killed["answers_read_on_resume"], killed["failures_read_on_resume"])
                        == (killed["answers_stored_before_kill"], killed["failures_stored_before_kill"]) and killed["stored_users_stored_again"] == 0,
                        "canary_0_hits": result["canary_hits"] == 0}
    (ROOT / "bench" / "results" / "preferences_server.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| run | exit | users done / failed | requests | tokens/user | users/s | wall s |\n|---|---|---|---|---|---|---|")
    for name in ("first_run", "rerun_overwrite", "rerun_other_mode", "chat_mode_for_comparison"):
        r = result[name]
        print(f"| {name} ({r['answer_mode']}, {r['salvaged']} salvaged) | {r['exit_code']} | {r['done']} / {r['failed']} | {r['requests']} | "
              f"{r['tokens_per_answered_user']} | {r['users_per_s']} | {r['wall_s']} |")
    print(f"wrong model name: exit {wrong['exit_code']} after {wrong['requests_seen_by_server']} requests: {wrong['error']}")
    print(f"killed after {killed['answers_stored_before_kill']} stored answers and {killed['failures_stored_before_kill']} stored failures; "
          f"the resumed run read {killed['answers_read_on_resume']} and {killed['failures_read_on_resume']} from the cache and sent "
          f"{killed['requests_after_resume']} requests for the other users; canary hits: {result['canary_hits']}")
    print(json.dumps(result["checks"]))
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
