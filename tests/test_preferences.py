import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import shared
from fake_openai import FakeOpenAI
from ulmrec_hf.common import RunArguments, UlmrecError, read_json
from ulmrec_hf.prepare import PrepareArguments
from ulmrec_hf.prepare import main as prepare
from ulmrec_hf.preferences import OFFLINE_LABEL, PreferenceArguments, validate_answer, AnswerError, user_text
from ulmrec_hf.preferences import main as preferences

N_USERS = 300


@pytest.fixture(scope="module")
def tagged_run(tmp_path_factory) -> Path:
    """300 users whose reviews carry a unique `uNNNN` tag, prepared from raw 2018 files."""
    raw = tmp_path_factory.mktemp("raw")
    rows = [{"reviewerID": f"R{u:04d}", "asin": f"I{(u + k * 7) % 30:02d}", "overall": 1 + (u + k) % 5, "unixReviewTime": 1000 + k,
             "reviewText": f"Review {k} by u{u:04d}: the scent was {'lovely' if k % 2 else 'too strong'}.", "summary": "s"}
            for u in range(N_USERS) for k in range(5)]
    (raw / "Toys_5.json.gz").write_bytes(gzip.compress("\n".join(json.dumps(r) for r in rows).encode()))
    (raw / "meta_Toys.json.gz").write_bytes(gzip.compress("\n".join(json.dumps({"asin": f"I{i:02d}", "title": f"Toy {i}"}) for i in range(30)).encode()))
    run = tmp_path_factory.mktemp("run")
    prepare(RunArguments(run_dir=str(run)), PrepareArguments(input=str(raw)))
    return run


def fresh_run(tagged_run: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(tagged_run / "data", tmp_path / "data")
    return tmp_path


def cli_args(run: Path, base_url: str) -> list[str]:
    return [sys.executable, "-m", "ulmrec_hf.cli", "preferences", "--run", str(run), "--preference_backend", "openai",
            "--base_url", base_url, "--preference_model", "fake-gpt", "--request_timeout", "0.5", "--max_retries", "3",
            "--backoff_base", "0.01", "--backoff_max", "5", "--concurrency", "8"]


def stored(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "preferences" / "preferences.jsonl").read_text().splitlines()]
    return {r["user"]: r["preference"] for r in rows}


def test_faults_end_in_one_preference_or_a_listed_failure(tagged_run, tmp_path):
    run = fresh_run(tagged_run, tmp_path)
    with FakeOpenAI() as server:
        proc = subprocess.run(cli_args(run, server.base_url), capture_output=True, text=True, timeout=300)
        requests = dict(server.requests)
    assert proc.returncode == 2 and "users have no preference" in proc.stderr
    prefs, failures = stored(run), read_json(run / "preferences" / "failures.json")
    always_broken = {f"R{u:04d}" for u in range(N_USERS) if u % 25 == 7}
    assert set(failures) == always_broken and all("500" in r for r in failures.values())
    assert set(prefs) | set(failures) == {f"R{u:04d}" for u in range(N_USERS)} and not set(prefs) & set(failures)
    for user, text in prefs.items():
        assert text == f"User u{user[1:]} prefers gentle u{user[1:]} things."
    for u in range(N_USERS):
        tag = f"u{u:04d}"
        expected = 4 if u % 25 == 7 else 2 if (u % 10 in (2, 3, 4, 5) or u % 50 == 1) else 1
        assert len(requests[tag]) == expected, (tag, len(requests[tag]))
        if u % 50 == 1 and u % 25 != 7:
            assert requests[tag][1] - requests[tag][0] >= 1.0  # Retry-After honoured
    summary = read_json(run / "preferences" / "summary.json")
    assert summary["done"] == N_USERS - len(always_broken) and summary["failed"] == len(always_broken)
    assert summary["tokens_completion_tokens"] == 9 * summary["done"]
    assert not (run / "preferences" / "_COMPLETE").exists()


def test_killed_run_resumes_without_repeating_requests(tagged_run, tmp_path):
    run = fresh_run(tagged_run, tmp_path)
    cache = run / "preferences" / "cache.jsonl"
    with FakeOpenAI(delay=0.05, slow_seconds=0.6) as server:
        proc = subprocess.Popen(cli_args(run, server.base_url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and (not cache.exists() or len(cache.read_text().splitlines()) < 60):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = time.time()
        done_before = {json.loads(line)["user"] for line in cache.read_text().splitlines() if line.endswith("}")}
        assert 60 <= len(done_before) < N_USERS - 12
        time.sleep(0.7)  # let requests of the killed process drain
        mark = time.time()
        again = subprocess.run(cli_args(run, server.base_url), capture_output=True, text=True, timeout=300)
        after = {tag for tag, times in server.requests.items() if any(t > mark for t in times)}
    assert again.returncode == 2
    assert not after & {f"u{u[1:]}" for u in done_before}
    prefs, failures = stored(run), read_json(run / "preferences" / "failures.json")
    assert len(prefs) + len(failures) == N_USERS and len(failures) == 12
    assert killed_at < mark


def test_offline_keywords_covers_everyone_and_is_labelled(tagged_run, tmp_path):
    run = fresh_run(tagged_run, tmp_path)
    preferences(RunArguments(run_dir=str(run)), PreferenceArguments(preference_backend="offline-keywords"))
    prefs = stored(run)
    assert len(prefs) == N_USERS and all(p.startswith(OFFLINE_LABEL) for p in prefs.values())
    assert "lovely" in prefs["R0000"] or "scent" in prefs["R0000"]


def test_import_reports_missing_users(tagged_run, tmp_path):
    run = fresh_run(tagged_run, tmp_path)
    (tmp_path / "prefs.json").write_text(json.dumps({f"R{u:04d}": f"likes {u}" for u in range(N_USERS - 2)} | {"stranger": "x"}))
    with pytest.raises(UlmrecError, match="2 of 300 users have no preference"):
        preferences(RunArguments(run_dir=str(run)), PreferenceArguments(preference_backend="import", preferences_file=str(tmp_path / "prefs.json")))
    assert read_json(run / "preferences" / "failures.json") == {"R0298": f"not in {tmp_path / 'prefs.json'}", "R0299": f"not in {tmp_path / 'prefs.json'}"}


def test_answer_validation():
    prompt = "Here are a user's product reviews, newest first, each with its star rating:\n- (5 stars) I adore this lavender soap a lot"
    assert validate_answer('  "Likes lavender soap and mild shampoo."  ', prompt, 100) == "Likes lavender soap and mild shampoo."
    for bad in ("", "   ", "x" * 101, "- (5 stars) I adore this lavender soap a lot", "1.", "Likes (4 stars) soap and more things"):
        with pytest.raises(AnswerError):
            validate_answer(bad, prompt, 100)


def test_review_budget_keeps_newest_first():
    row = {"items": [1, 2, 3], "reviews": ["old " * 30, "mid " * 30, "new " * 30], "ratings": [1.0, 3.0, 5.0]}
    text, cut = user_text(row, "reviews", {}, budget_chars=300)
    assert text.startswith("- (5 stars) new") and "mid" in text and "old" not in text
    assert cut == {"entries_used": 2, "entries_total": 3}


def test_missing_api_key_is_one_clear_error(tagged_run, tmp_path, monkeypatch):
    run = fresh_run(tagged_run, tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UlmrecError, match=r"no API key in \$OPENAI_API_KEY"):
        preferences(RunArguments(run_dir=str(run)), PreferenceArguments(preference_backend="openai"))


def test_import_beauty_preferences(tmp_path):
    folder = shared("amazon-beauty-ulmrec")
    prepare(RunArguments(run_dir=str(tmp_path)), PrepareArguments(input=str(folder / "dataset.json")))
    args = PreferenceArguments(preference_backend="import", preferences_file=str(folder / "preferences.json"))
    with pytest.raises(UlmrecError, match="43 of 22332 users have no preference.*empty preference in the imported file"):
        preferences(RunArguments(run_dir=str(tmp_path)), args)
    args.preference_fallback = "offline-keywords"  # the authors' file has 43 empty sentences
    preferences(RunArguments(run_dir=str(tmp_path)), args)
    prefs = stored(tmp_path)
    assert len(prefs) == 22332
    labelled = [p for p in prefs.values() if p.startswith(OFFLINE_LABEL)]
    assert len(labelled) == 43 and read_json(tmp_path / "preferences" / "summary.json")["fallbacks"] == 43
