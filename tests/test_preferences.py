import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI, peak_overlap
from ulmrec_hf.common import StageArguments, UlmrecError, read_json
from ulmrec_hf.common import read_preference_file as load_import
from ulmrec_hf.preferences import (ANSWER_SCHEMA, OFFLINE_LABEL, AnswerError, PreferenceArguments, Throttle, accept_answer, continued,
                                   load_chat_template, user_text, validate_answer)
from ulmrec_hf.preferences import main as preferences
from ulmrec_hf.prepare import PrepareArguments
from ulmrec_hf.prepare import main as prepare

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
    prepare(StageArguments(run_dir=str(run)), PrepareArguments(input=str(raw)))
    return run


@pytest.fixture
def fresh_run(tagged_run, tmp_path, copy_stages):
    return copy_stages(tagged_run, tmp_path, ("prepare",))


def cli_args(run: Path, base_url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ulmrec_hf.cli", "preferences", "--run", str(run), "--backend", "openai", "--base_url", base_url,
            "--model", "fake-gpt", "--request_timeout", "0.5", "--max_retries", "3", "--backoff_base", "0.01", "--backoff_max", "5",
            "--concurrency", "8", *extra]


def stored(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "preferences" / "preferences.jsonl").read_text().splitlines()]
    return {r["user"]: r["preference"] for r in rows}


def cache_file(run: Path) -> Path:
    return run / "cache" / "preferences" / "responses.jsonl"


def test_faults_end_in_one_preference_or_a_listed_failure(fresh_run):
    run = fresh_run
    with FakeOpenAI() as server:
        proc = subprocess.run(cli_args(run, server.base_url), capture_output=True, text=True, timeout=300)
        requests, payloads = dict(server.requests), dict(server.payloads)
    assert proc.returncode == 2 and "users have no preference" in proc.stderr
    prefs, failures = stored(run), read_json(run / "preferences" / "failures.json")
    always_broken = {f"R{u:04d}" for u in range(N_USERS) if u % 25 == 7}
    assert set(failures) == always_broken and all("InternalServerError 500: always broken" in r["reason"] for r in failures.values())
    assert set(prefs) | set(failures) == {f"R{u:04d}" for u in range(N_USERS)} and not set(prefs) & set(failures)
    for user, text in prefs.items():
        assert text == f"User u{user[1:]} prefers gentle u{user[1:]} things."  # never the cut-off answer of the 6s
    for u in range(N_USERS):
        tag = f"u{u:04d}"
        expected = 4 if u % 25 == 7 else 2 if (u % 10 in (2, 3, 4, 5, 6) or u % 50 == 1) else 1
        assert len(requests[tag]) == expected, (tag, len(requests[tag]))
        assert all(p["max_tokens"] == 96 and "stop" not in p for p in payloads[tag])  # chat: an introduction and one sentence
        if u % 50 == 1 and u % 25 != 7:
            assert requests[tag][1] - requests[tag][0] >= 1.0  # Retry-After honoured
        if u % 10 == 3 and u % 25 != 7:  # a timeout (0.5 s) then at least request_timeout more (arrival times trail sends by ms)
            assert requests[tag][1] - requests[tag][0] >= 0.95
    summary = read_json(run / "preferences" / "summary.json")
    assert summary["done"] == N_USERS - len(always_broken) and summary["failed"] == len(always_broken)
    answers = sum(1 + (u % 10 in (5, 6)) for u in range(N_USERS) if u % 25 != 7)  # every 200 reply, the rejected ones included
    assert summary["completion_tokens"] == 9 * answers
    assert summary["requests"] == sum(len(v) for v in requests.values())
    assert summary["retries"]["invalid: answer cut off at max_tokens=96"] == sum(1 for u in range(N_USERS) if u % 10 == 6 and u % 25 != 7)
    assert summary["retries"]["timeout"] >= 1 and summary["retries"]["rate_limit"] >= 1
    assert summary["invalid_answer_retry"] == {"temperature": 0.7, "seed": "42 + attempt"}
    assert not (run / "preferences" / "_COMPLETE").exists()


def test_a_retry_after_an_invalid_answer_changes_the_request(fresh_run):
    run = fresh_run
    with FakeOpenAI() as server:
        subprocess.run(cli_args(run, server.base_url, "--max_users", "30"), capture_output=True, text=True, timeout=300)
        payloads = dict(server.payloads)
    for tag in ("u0005", "u0015", "u0006", "u0016"):  # empty answers and cut-off answers
        first, retry = payloads[tag]
        assert first["temperature"] == 0.0 and "seed" not in first
        assert retry["temperature"] == 0.7 and retry["seed"] == 43 and retry["messages"] == first["messages"]
    for tag in ("u0002", "u0003"):  # a 500 and a timeout: the same request again
        first, retry = payloads[tag]
        assert retry == first


def test_the_throttle_halves_after_a_timeout_and_grows_back():
    throttle = Throttle(8)
    throttle.timed_out()
    throttle.timed_out()
    assert throttle.limit == 2 and throttle.lowest == 2
    entered = []

    def worker():
        with throttle:
            entered.append(time.time())
            time.sleep(0.2)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(round(t - start, 1) for t in entered) == [0.0, 0.0, 0.2, 0.2]  # at most two in flight
    throttle.answered()
    assert throttle.limit == 2
    throttle.answered()
    assert throttle.limit == 3  # one more after `limit` answers


def test_concurrency_drops_after_timeouts(fresh_run):
    """Eight users whose first request is slower than the timeout: their eight retries must not hit the server together."""
    run = fresh_run
    with FakeOpenAI(slow_seconds=1.0, delay=0.1, slow_users=set(range(8)), faults=False) as server:
        subprocess.run(cli_args(run, server.base_url, "--max_users", "8", "--request_timeout", "0.3", "--backoff_base", "0.001"),
                       capture_output=True, text=True, timeout=300)
        intervals = list(server.intervals)
    summary = read_json(run / "preferences" / "summary.json")
    first = [(s, e) for _, attempt, s, e in intervals if attempt == 1]
    retries = [(s, e) for _, attempt, s, e in intervals if attempt > 1]
    assert peak_overlap(first) == 8 and len(retries) >= 8  # all eight were in flight, then all timed out
    assert summary["lowest_concurrency"] == 1 and summary["retries"]["timeout"] == 8
    assert peak_overlap(retries) <= 3  # one at a time after the timeouts, growing back by one per answered `limit`


def test_users_whose_answers_stay_invalid_are_remembered(fresh_run):
    run = fresh_run
    args = ("--max_users", "20", "--invalid_retries", "2")
    with FakeOpenAI(invalid_users={10, 12}, faults=False) as server:
        first = subprocess.run(cli_args(run, server.base_url, *args), capture_output=True, text=True, timeout=300)
        mark = time.time()
        again = subprocess.run(cli_args(run, server.base_url, *args), capture_output=True, text=True, timeout=300)
        asked_again = sum(1 for times in server.requests.values() for t in times if t > mark)
        failures = read_json(run / "preferences" / "failures.json")
        retried = subprocess.run(cli_args(run, server.base_url, *args, "--retry_failed", "true"), capture_output=True, text=True, timeout=300)
        asked_retry = {tag for tag, times in server.requests.items() if len(times) > 2}
    assert first.returncode == again.returncode == retried.returncode == 2
    assert set(failures) == {"R0010", "R0012"} and all("a list or an introduction" in r["reason"] and "--retry_failed" in r["reason"]
                                                       for r in failures.values())
    assert all(r["last_answer"] == "The user's preferences are:" for r in failures.values())  # what the model said, kept
    assert "--retry_failed true" in first.stderr and "fallback: offline-keywords" in first.stderr  # how to go on
    assert asked_again == 0  # the rerun costs nothing: answers and remembered failures come from the cache
    # asked again, each twice: the fake, like `transformers serve`, gives the retry the same answer, so no third request
    assert read_json(run / "preferences" / "summary.json")["requests"] == 4 and asked_retry == {"u0010", "u0012"}


def test_budget_stop_leaves_a_resumable_cache(fresh_run):
    run = fresh_run
    with FakeOpenAI() as server:
        proc = subprocess.run(cli_args(run, server.base_url, "--max_users", "40", "--token_budget", "2500"), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2 and "stopped by the token budget (2500)" in proc.stderr
        summary = read_json(run / "preferences" / "summary.json")
        assert summary["prompt_tokens"] + summary["completion_tokens"] <= 2500
        assert 0 < summary["not_asked_budget"] < 40
        answered = {json.loads(line)["user"] for line in cache_file(run).read_text().splitlines()}
        assert answered and not (run / "preferences" / "_COMPLETE").exists()
        mark = time.time()
        again = subprocess.run(cli_args(run, server.base_url, "--max_users", "40"), capture_output=True, text=True, timeout=300)
        asked_again = {tag for tag, times in server.requests.items() if any(t > mark for t in times)}
    assert again.returncode == 2  # user 7 always fails
    assert not asked_again & {f"u{u[1:]}" for u in answered}
    assert read_json(run / "preferences" / "summary.json")["cached"] == len(answered)


def test_killed_run_resumes_without_repeating_requests(fresh_run):
    run = fresh_run
    cache = cache_file(run)
    with FakeOpenAI(delay=0.05, slow_seconds=0.6) as server:
        proc = subprocess.Popen(cli_args(run, server.base_url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and (not cache.exists() or len(cache.read_text().splitlines()) < 60):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
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
    assert read_json(run / "preferences" / "summary.json")["cached"] >= len(done_before)


def test_offline_keywords_covers_everyone_and_is_labelled(fresh_run):
    preferences(StageArguments(run_dir=str(fresh_run)), PreferenceArguments(backend="offline-keywords"))
    prefs = stored(fresh_run)
    assert len(prefs) == N_USERS and all(p.startswith(OFFLINE_LABEL) for p in prefs.values())
    assert "lovely" in prefs["R0000"] or "scent" in prefs["R0000"]


def test_import_reports_missing_users(fresh_run, tmp_path):
    (tmp_path / "prefs.json").write_text(json.dumps({f"R{u:04d}": f"likes {u}" for u in range(N_USERS - 2)} | {"stranger": "x"}))
    with pytest.raises(UlmrecError, match="2 of 300 users have no preference"):
        preferences(StageArguments(run_dir=str(fresh_run)), PreferenceArguments(backend="import", import_file=str(tmp_path / "prefs.json")))
    assert read_json(fresh_run / "preferences" / "failures.json") == {"R0298": {"reason": f"not in {tmp_path / 'prefs.json'}"},
                                                                      "R0299": {"reason": f"not in {tmp_path / 'prefs.json'}"}}


def test_import_names_the_line_of_a_bad_byte(tmp_path):
    lines = [json.dumps({"user": f"U{i}", "preference": "likes soap"}).encode() for i in range(50)]
    lines[36] = b'{"user": "U36", "preference": "likes caf\xe9"}'
    (tmp_path / "prefs.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(UlmrecError, match=r"prefs\.jsonl:37: not UTF-8 text"):
        load_import(str(tmp_path / "prefs.jsonl"))


def test_answer_validation():
    prompt = "Here are a user's product reviews, newest first, each with its star rating:\n- (5 stars) I adore this lavender soap a lot"
    assert validate_answer('  "Likes lavender soap and mild shampoo."  ', prompt, 100) == "Likes lavender soap and mild shampoo."
    for bad in ("", "   ", "x" * 101, "- (5 stars) I adore this lavender soap a lot", "1.", "Likes (4 stars) soap and more things",
                "The user's preferences are:", "This user's preferences are: 1. good strings 2. cheap picks 3. tuners"):
        with pytest.raises(AnswerError):
            validate_answer(bad, prompt, 100)


def test_salvage_takes_one_sentence_out_of_an_introduction_or_a_one_item_list():
    review = "I adore this lavender soap, it lathers well and the scent lasts all day"
    prompt = f"Here are a user's product reviews, newest first, each with its star rating:\n- (5 stars) I adore this lavender soap a lot\n- (4 stars) {review}\n- {review.upper()}"
    sentence = "The user likes lavender soap and mild shampoo."
    for answer in (f"Here is the user's preference in one sentence: {sentence}", f"Sure! {sentence}", f"1. {sentence}",
                   f"The user's preferences are: - {sentence}", f"Sure! Here is a summary of their tastes. {sentence}"):
        assert accept_answer(answer, prompt, 200) == (sentence, True), answer
    assert accept_answer(sentence, prompt, 200) == (sentence, False)
    assert accept_answer("The user likes three things: soap, shampoo and brushes.", prompt, 200)[1] is False  # a colon inside a sentence
    for bad in (f"{sentence} They dislike strong perfume.", f"Here is the answer: {sentence} They dislike strong perfume.",
                "The user's preferences are: 1. lavender soap 2. mild shampoo", "1. lavender soap and bath salts 2. mild shampoo",
                "Here is the answer: - (5 stars) I adore this lavender soap a lot", "The user's preferences are:"):
        with pytest.raises(AnswerError):
            accept_answer(bad, prompt, 200)
    # a review echoed without its "- (N stars) " or "- " marker, or a part of one, is an echo, not a salvaged sentence
    for echo in (f"Here is the answer: {review}.", f"Sure! {review.upper()}", review, review[:50]):
        with pytest.raises(AnswerError, match="echoes the prompt"):
            accept_answer(echo, prompt, 200)


@pytest.mark.parametrize("mode", ["chat", "prefill", "json_schema", "completion"])
def test_each_answering_mode_sends_its_own_request(fresh_run, tiny_llm, mode):
    run = fresh_run
    with FakeOpenAI(faults=False, overrun=True) as server:  # answers run past the stop sequences: the client cuts them there
        proc = subprocess.run(cli_args(run, server.base_url, "--max_users", "3", "--answer_mode", mode, "--tokenizer", tiny_llm),
                              capture_output=True, text=True, timeout=300)
        payloads, paths, gets = dict(server.payloads), dict(server.paths), server.gets
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = payloads["u0000"][0]
    assert first["model"] == "fake-gpt" and first["max_tokens"] == (96 if mode == "chat" else 64) and first["temperature"] == 0.0 and gets == 0
    endpoint = "/v1/completions" if mode == "completion" else "/v1/chat/completions"
    assert all(p == [endpoint] for p in paths.values()) and len(paths) == 3
    messages = first.get("messages", [])
    if mode == "chat":
        assert [m["role"] for m in messages] == ["system", "user"] and "stop" not in first
        assert not {"response_format", "continue_final_message", "add_generation_prompt"} & set(first)
    if mode == "prefill":  # vLLM's and SGLang's names; llama.cpp and Ollama continue a final assistant message anyway
        assert [m["role"] for m in messages] == ["system", "user", "assistant"] and messages[-1]["content"] == "The user prefers"
        assert first["continue_final_message"] is True and first["add_generation_prompt"] is False and first["stop"] == ["\n"]
    if mode == "json_schema":
        assert first["response_format"] == ANSWER_SCHEMA and "stop" not in first
    if mode == "completion":  # the prompt as the model's chat template renders it, ending in the prefilled answer
        assert "messages" not in first and first["stop"] == ["\n"]
        assert "You summarise shoppers' tastes" in first["prompt"] and "u0000" in first["prompt"]
        assert first["prompt"].endswith("<|im_start|>assistant\nThe user prefers")
    continues = mode in ("prefill", "completion")
    assert stored(run)["R0000"] == ("The user prefers gentle u0000 things." if continues else "User u0000 prefers gentle u0000 things.")
    summary = read_json(run / "preferences" / "summary.json")
    assert summary["answer_mode"] == mode and summary["answer_mode_source"] == "set by answer_mode"
    assert summary["answers_by_mode"] == {mode: 3}


@pytest.mark.parametrize("owned_by,expected", [("vllm", "prefill"), ("llamacpp", "prefill"), ("HuggingFaceTB", "completion"),
                                               ("openai", "chat")])
def test_the_answering_mode_is_detected_once_and_recorded(fresh_run, tiny_llm, owned_by, expected):
    run = fresh_run
    model = tiny_llm if expected == "completion" else "fake-gpt"  # a local folder with a chat template
    args = ("--max_users", "4", "--model", model)
    with FakeOpenAI(faults=False, owned_by=owned_by, models=(model, "other-model")) as server:
        first = subprocess.run(cli_args(run, server.base_url, *args), capture_output=True, text=True, timeout=300)
        gets, posts, summary = server.gets, server.posts, read_json(run / "preferences" / "summary.json")
        again = subprocess.run(cli_args(run, server.base_url, *args, "--overwrite"), capture_output=True, text=True, timeout=300)
        rerun = (server.gets - gets, server.posts - posts)
    assert first.returncode == again.returncode == 0, first.stderr[-3000:]
    assert gets == 1 and posts == 4  # one GET /v1/models for the whole run
    assert summary["answer_mode"] == expected and f"owned_by '{owned_by}'" in summary["answer_mode_source"]
    assert summary["answers_by_mode"] == {expected: 4}
    assert rerun == (0, 0)  # every answer is in the cache: nothing to detect, nothing to ask
    again_summary = read_json(run / "preferences" / "summary.json")
    assert again_summary["cached"] == 4 and again_summary["answer_mode"] is None and again_summary["answers_by_mode"] == {expected: 4}


@pytest.mark.parametrize("status,body,message", [
    (400, {"detail": "Server is pinned to '/models/smol'; requested 'fake-gpt'."}, "BadRequestError 400: Server is pinned to '/models/smol'"),
    (401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}, "AuthenticationError 401: Incorrect API key"),
    (422, {"detail": [{"loc": ["body", "continue_final_message"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}]},
     "UnprocessableEntityError 422: body.continue_final_message: Extra inputs are not permitted")])
def test_the_same_client_error_on_the_first_requests_stops_the_stage(fresh_run, status, body, message):
    run = fresh_run
    with FakeOpenAI(error=(status, body)) as server:
        proc = subprocess.run(cli_args(run, server.base_url, "--max_users", "40", "--concurrency", "4"), capture_output=True, text=True,
                              timeout=300)
        posts = server.posts
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    assert posts == 4  # the first window of `concurrency` requests came back, then nothing more went out
    assert "stopped after 4 requests: all 4 requests of the first window got the same error and none was answered" in proc.stderr
    assert not cache_file(run).exists()
    if status == 401:
        assert "Check the API key in $OPENAI_API_KEY" in proc.stderr


def test_a_wrong_model_name_lists_the_served_models(fresh_run):
    with FakeOpenAI(pinned="/models/SmolLM2-135M-Instruct", owned_by="HuggingFaceTB") as server:
        proc = subprocess.run(cli_args(fresh_run, server.base_url, "--max_users", "30", "--concurrency", "4", "--answer_mode", "chat"),
                              capture_output=True, text=True, timeout=300)
        posts = server.posts
    assert proc.returncode == 2 and posts == 4
    assert "Server is pinned to '/models/SmolLM2-135M-Instruct'; requested 'fake-gpt'." in proc.stderr
    assert "not among the models the server offers (GET /v1/models): /models/SmolLM2-135M-Instruct" in proc.stderr


def salvage_in_chat(run, answers: dict):
    """Five users asked in chat mode, one retry after an invalid answer: (the process, requests per user, payloads per user)."""
    with FakeOpenAI(faults=False, answers=answers) as server:
        proc = subprocess.run(cli_args(run, server.base_url, "--max_users", "5", "--answer_mode", "chat", "--invalid_retries", "1"),
                              capture_output=True, text=True, timeout=300)
        return proc, {tag: len(times) for tag, times in server.requests.items()}, dict(server.payloads)


def test_salvaged_answers_are_labelled_and_counted(fresh_run):
    run = fresh_run
    answers = {0: "Here is the user's preference in one sentence: User u0000 likes gentle soaps and mild scents.",
               1: "1. User u0001 likes gentle soaps and mild scents.",
               2: "User u0002 likes gentle soaps. They dislike strong scents.",
               3: "The user's preferences are: 1. gentle soaps 2. mild scents and soft brushes"}
    proc, asked, _ = salvage_in_chat(run, answers)
    assert proc.returncode == 2
    prefs, failures = stored(run), read_json(run / "preferences" / "failures.json")
    assert prefs["R0000"] == "User u0000 likes gentle soaps and mild scents." and prefs["R0001"] == "User u0001 likes gentle soaps and mild scents."
    assert set(failures) == {"R0002", "R0003"} and asked["u0002"] == asked["u0003"] == 2  # rejected, retried once, rejected
    assert "more than one sentence" in failures["R0002"]["reason"] and failures["R0002"]["last_answer"] == answers[2]
    assert failures["R0003"]["last_answer"] == answers[3]
    rows = {r["user"]: r for r in map(json.loads, (run / "preferences" / "preferences.jsonl").read_text().splitlines())}
    assert [u for u, r in rows.items() if r.get("salvaged")] == ["R0000", "R0001"]
    entries = {e["user"]: e for e in map(json.loads, cache_file(run).read_text().splitlines())}
    assert entries["R0000"]["salvaged"] is True and entries["R0000"]["salvaged_from"] == answers[0] and "salvaged" not in entries["R0004"]
    assert read_json(run / "preferences" / "summary.json")["salvaged"] == 2


def test_review_budget_keeps_newest_first():
    row = {"items": [1, 2, 3], "reviews": ["old " * 30, "mid " * 30, "new " * 30], "ratings": [1.0, 3.0, 5.0]}
    text, cut = user_text(row, "reviews", {}, budget_chars=300)
    assert text.startswith("- (5 stars) new") and "mid" in text and "old" not in text
    assert cut == {"entries_used": 2, "entries_total": 3}


def test_missing_api_key_is_one_clear_error(fresh_run, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UlmrecError, match=r"no API key in \$OPENAI_API_KEY"):
        preferences(StageArguments(run_dir=str(fresh_run)), PreferenceArguments(backend="openai"))


def test_import_beauty_preferences(tmp_path, shared_data):
    folder = shared_data("amazon-beauty-ulmrec")
    prepare(StageArguments(run_dir=str(tmp_path)), PrepareArguments(input=str(folder / "dataset.json")))
    args = PreferenceArguments(backend="import", import_file=str(folder / "preferences.json"))
    with pytest.raises(UlmrecError, match="43 of 22332 users have no preference.*empty preference in the imported file"):
        preferences(StageArguments(run_dir=str(tmp_path)), args)
    args.fallback = "offline-keywords"  # the authors' file has 43 empty sentences
    preferences(StageArguments(run_dir=str(tmp_path), overwrite=True), args)
    prefs = stored(tmp_path)
    assert len(prefs) == 22332
    labelled = [p for p in prefs.values() if p.startswith(OFFLINE_LABEL)]
    assert len(labelled) == 43 and read_json(tmp_path / "preferences" / "summary.json")["fallbacks"] == 43


@pytest.mark.parametrize("concurrency,too_long", [(4, {0, 1}), (1, {0})])
def test_a_client_error_of_single_users_fails_only_them(fresh_run, concurrency, too_long):
    run = fresh_run  # llama.cpp's 400 for a prompt longer than the context: the request is fine, these users' prompts are not
    with FakeOpenAI(faults=False, too_long_users=too_long) as server:
        proc = subprocess.run(cli_args(run, server.base_url, "--max_users", "8", "--concurrency", str(concurrency), "--answer_mode", "chat"),
                              capture_output=True, text=True, timeout=300)
        asked = {tag: len(times) for tag, times in server.requests.items()}
    assert proc.returncode == 2 and f"{len(too_long)} of 8 users have no preference" in proc.stderr, proc.stderr[-3000:]
    failures = read_json(run / "preferences" / "failures.json")
    assert set(failures) == {f"R{u:04d}" for u in too_long}
    assert all(r["reason"] == "BadRequestError 400: the request exceeds the available context size, try increasing it" for r in failures.values())
    assert set(stored(run)) == {f"R{u:04d}" for u in range(8)} - set(failures)
    assert asked == {f"u{u:04d}": 1 for u in range(8)}  # a client error is not retried
    # the advice: --retry_failed needs nothing else; a changed setting needs --overwrite, which keeps the answer cache
    assert "--retry_failed true" in proc.stderr and "--overwrite" in proc.stderr and "the answer cache" in proc.stderr


def test_with_concurrency_1_two_requests_decide(fresh_run):
    with FakeOpenAI(error=(400, {"detail": "Server is pinned to '/models/smol'; requested 'fake-gpt'."})) as server:
        proc = subprocess.run(cli_args(fresh_run, server.base_url, "--max_users", "10", "--concurrency", "1"), capture_output=True,
                              text=True, timeout=300)
        posts = server.posts
    assert proc.returncode == 2 and posts == 2
    assert "stopped after 2 requests: all 2 requests of the first window got the same error" in proc.stderr


def test_an_introduction_on_its_own_line_is_salvaged_in_chat_mode(fresh_run):
    run = fresh_run
    answers = {0: "Here is the sentence:\nUser u0000 likes gentle soaps and mild scents.",
               1: "Sure! Here is the user's preference:\n\nUser u0001 likes gentle soaps and mild scents.\n\nI hope this helps!",
               2: "The user's preferences are:\n1. gentle soaps\n2. mild scents and soft brushes",
               3: "Here is the answer: Review 0 by u0003: the scent was too strong."}  # a review without its "- (N stars) " marker
    proc, _, payloads = salvage_in_chat(run, answers)
    first = payloads["u0000"][0]
    assert proc.returncode == 2 and "stop" not in first and first["max_tokens"] == 96
    prefs, failures = stored(run), read_json(run / "preferences" / "failures.json")
    assert prefs["R0000"] == "User u0000 likes gentle soaps and mild scents." and prefs["R0001"] == "User u0001 likes gentle soaps and mild scents."
    assert set(failures) == {"R0002", "R0003"} and "echoes the prompt" in failures["R0003"]["reason"]
    assert failures["R0002"]["last_answer"] == answers[2] and failures["R0003"]["last_answer"] == answers[3]
    entries = {e["user"]: e for e in map(json.loads, cache_file(run).read_text().splitlines())}
    assert entries["R0000"]["salvaged_from"] == answers[0] and entries["R0001"]["salvaged_from"] == answers[1]
    assert read_json(run / "preferences" / "summary.json")["salvaged"] == 2


def test_a_sentence_is_not_cut_at_an_abbreviation(fresh_run):
    run = fresh_run
    answers = {0: " strings by D.R. Strings, e.g. light gauges. They also like picks.\nAnd tuners."}
    with FakeOpenAI(faults=False, answers=answers) as server:  # the fake honours stop sequences, as vLLM does
        proc = subprocess.run(cli_args(run, server.base_url, "--max_users", "2", "--answer_mode", "prefill"), capture_output=True, text=True,
                              timeout=300)
        first = server.payloads["u0000"][0]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert first["stop"] == ["\n"]  # no ". ": "D.R. " and "e.g. " would end the answer there
    assert stored(run)["R0000"] == "The user prefers strings by D.R. Strings, e.g. light gauges."  # the client keeps the first sentence


def test_an_empty_continuation_is_an_empty_answer():
    for blank in (None, "", "  \n"):
        with pytest.raises(AnswerError, match="empty answer") as caught:
            continued("The user prefers", blank)
        assert not (caught.value.answer or "").strip()  # the raw reply, nothing invented
    assert continued("The user prefers", " gentle soaps") == "The user prefers gentle soaps"  # nothing added, not even a full stop
    assert continued("The user prefers", "The user prefers gentle soaps.") == "The user prefers gentle soaps."


def tiny_tokenizer(folder: Path, adds_bos: bool) -> str:
    """A word-level tokenizer whose chat template starts with `{{ bos_token }}`, with or without BOS added on encoding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(80))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}[assistant] {% endif %}")
    fast.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("adds_bos", [True, False])
def test_a_completion_prompt_holds_bos_once(tmp_path, adds_bos):
    render = load_chat_template(PreferenceArguments(answer_mode="completion", tokenizer=tiny_tokenizer(tmp_path, adds_bos)))
    prompt = render([{"role": "system", "content": "w1"}, {"role": "user", "content": "w2"}])
    # the server encodes the prompt with the tokenizer's special tokens: BOS comes from the text or from the tokenizer, not both
    assert prompt == ("" if adds_bos else "<s>") + "[system] w1\n[user] w2\n[assistant] "


def test_another_answer_mode_reads_answers_stored_in_any_mode(fresh_run):
    run = fresh_run
    with FakeOpenAI(faults=False) as server:
        first = subprocess.run(cli_args(run, server.base_url, "--max_users", "4", "--answer_mode", "prefill"), capture_output=True, text=True,
                               timeout=300)
        posts = server.posts
        again = subprocess.run(cli_args(run, server.base_url, "--max_users", "6", "--answer_mode", "chat", "--overwrite"),
                               capture_output=True, text=True, timeout=300)
        asked_again = {tag for tag, payloads in server.payloads.items() if len(payloads) > 1 or int(tag[1:]) >= 4}
    assert first.returncode == again.returncode == 0, again.stderr[-3000:]
    assert posts == 4 and server.posts == 6 and asked_again == {"u0004", "u0005"}  # only the two new users, in chat mode
    summary = read_json(run / "preferences" / "summary.json")
    assert summary["cached"] == 4 and summary["answers_by_mode"] == {"prefill": 4, "chat": 2}
    rows = {r["user"]: r for r in map(json.loads, (run / "preferences" / "preferences.jsonl").read_text().splitlines())}
    assert [rows[f"R{u:04d}"]["answer_mode"] for u in range(6)] == ["prefill"] * 4 + ["chat"] * 2
    assert rows["R0000"]["preference"] == "The user prefers gentle u0000 things."


def test_the_same_invalid_answer_twice_is_not_asked_a_third_time(fresh_run):
    with FakeOpenAI(faults=False, invalid_users={0}) as server:  # like `transformers serve`, the fake ignores temperature and seed
        proc = subprocess.run(cli_args(fresh_run, server.base_url, "--max_users", "2", "--answer_mode", "chat", "--invalid_retries", "3"),
                              capture_output=True, text=True, timeout=300)
        asked = len(server.requests["u0000"])
    assert proc.returncode == 2 and asked == 2
    failure = read_json(fresh_run / "preferences" / "failures.json")["R0000"]
    assert "the same answer came back to a retry" in failure["reason"] and failure["last_answer"] == "The user's preferences are:"
    assert read_json(fresh_run / "preferences" / "summary.json")["identical_answers"] == 1


def test_the_api_key_is_redacted_from_server_messages(fresh_run):
    key = "sk-canary-redact-0123456789abcdef"
    body = {"error": {"message": f"Incorrect API key provided: {key[:8]}****************cdef ({key}).", "type": "invalid_request_error"}}
    with FakeOpenAI(error=(401, body)) as server:
        proc = subprocess.run(cli_args(fresh_run, server.base_url, "--max_users", "10"), capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OPENAI_API_KEY": key})
    assert proc.returncode == 2 and "AuthenticationError 401: Incorrect API key provided: [API key] ([API key])." in proc.stderr
    assert key[:8] not in proc.stderr and key[-6:] not in proc.stderr


def test_the_stage_writes_preferences_jsonl_atomically(fresh_run, monkeypatch):
    """preferences.jsonl goes through the atomic writer (temporary file, then rename), as every other output does."""
    from ulmrec_hf import common

    written, real = [], common.atomic_open
    monkeypatch.setattr(common, "atomic_open", lambda path: written.append(Path(path).name) or real(path))
    preferences(StageArguments(run_dir=str(fresh_run)), PreferenceArguments(backend="offline-keywords"))
    assert "preferences.jsonl" in written
