"""A real HTTP server on 127.0.0.1 speaking OpenAI chat completions, completions and model listing, with scripted faults.

Users are recognised by a `uNNNN` tag in the prompt. Faults on the first attempt, by NNNN % 10:
1 -> 429 with Retry-After (only when NNNN % 50 == 1; other 1s answer normally), 2 -> 500, 3 -> slower
than the client timeout, 4 -> malformed JSON, 5 -> empty answer, 6 -> an answer cut off by max_tokens
(finish_reason "length"). NNNN % 25 == 7 -> 500 every time. `slow_users` are slow on their first attempt too;
`invalid_users` always answer with an introduction and no content; `answers` maps a user number to the text it always
answers. Like the servers it stands for, it continues a final assistant message when asked with `continue_final_message`
(vLLM), answers a JSON object when given a JSON-schema `response_format`, and continues the prompt on /v1/completions.
Stop sequences are honoured (the answer ends before the first one), unless `overrun` answers past them, as
`transformers serve` does; `too_long_users` get llama.cpp's per-request 400 for a prompt longer than the context;
`error` = (status, body) answers every POST with that error; `pinned` refuses other model names with the 400 that
`transformers serve` sends. GET /v1/models lists `models` (or the pinned one) as owned by `owned_by`.
Every request's payload, path and start time are recorded per user.
"""

import json
import re
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, slow_seconds: float = 1.5, delay: float = 0.0, retry_after: int = 1, slow_users: set[int] = frozenset(),
                 faults: bool = True, invalid_users: set[int] = frozenset(), answers: dict[int, str] | None = None,
                 error: tuple[int, dict] | None = None, pinned: str | None = None, models: tuple[str, ...] = ("fake-gpt",),
                 owned_by: str = "fake-org", overrun: bool = False, too_long_users: set[int] = frozenset()):
        self.requests = defaultdict(list)  # user tag -> request times
        self.payloads = defaultdict(list)  # user tag -> request bodies
        self.paths = defaultdict(list)  # user tag -> request paths
        self.posts, self.gets = 0, 0  # every POST (tagged or not) and GET /v1/models
        self.answers, self.error, self.pinned, self.owned_by, self.overrun = answers or {}, error, pinned, owned_by, overrun
        self.models = (pinned,) if pinned else models
        self.intervals = []  # (user tag, attempt, start, end) of every request
        self.slow_users, self.faults, self.invalid_users, self.too_long_users = set(slow_users), faults, set(invalid_users), set(too_long_users)
        self.lock = threading.Lock()
        self.slow_seconds, self.delay, self.retry_after = slow_seconds, delay, retry_after
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def total(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.requests.values())

    def handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models":
                    return self.send(404, b'{"detail": "Not Found"}')
                with fake.lock:
                    fake.gets += 1
                data = [{"id": m, "object": "model", "created": 0, "owned_by": fake.owned_by} for m in fake.models]
                self.send(200, json.dumps({"object": "list", "data": data}).encode())

            def do_POST(self):
                start, self.tag_attempt = time.time(), (None, 0)
                try:
                    self.handle_post()
                finally:
                    with fake.lock:
                        fake.intervals.append((*self.tag_attempt, start, time.time()))

            def handle_post(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                completion = self.path.rstrip("/").endswith("/v1/completions")
                prompt = payload["prompt"] if completion else " ".join(m["content"] for m in payload["messages"])
                with fake.lock:
                    fake.posts += 1
                if fake.error:
                    return self.send(fake.error[0], json.dumps(fake.error[1]).encode())
                if fake.pinned and payload["model"] != fake.pinned:
                    return self.send(400, json.dumps({"detail": f"Server is pinned to '{fake.pinned}'; requested '{payload['model']}'."}).encode())
                tag = re.search(r"u(\d{4})", prompt).group(0)
                n = int(tag[1:])
                with fake.lock:
                    fake.requests[tag].append(time.time())
                    fake.payloads[tag].append(payload)
                    fake.paths[tag].append(self.path)
                    attempt = len(fake.requests[tag])
                self.tag_attempt = (tag, attempt)
                time.sleep(fake.delay)
                if n in fake.too_long_users:  # llama-server's answer to a prompt longer than its context, for this user only
                    return self.send(400, json.dumps({"error": {"code": 400, "type": "exceed_context_size_error",
                                                                "message": "the request exceeds the available context size, try increasing it"}}).encode())
                first, slow = attempt == 1, n in fake.slow_users
                if not fake.faults:
                    n = 10  # a user with no scripted fault
                if n % 25 == 7:
                    return self.send(500, b'{"error": {"message": "always broken"}}')
                if first and n % 10 == 1 and n % 50 == 1:
                    return self.send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": str(fake.retry_after)})
                if first and n % 10 == 2:
                    return self.send(500, b'{"error": {"message": "server error"}}')
                if first and (n % 10 == 3 or slow):
                    time.sleep(fake.slow_seconds)
                if first and n % 10 == 4:
                    return self.send(200, b'{"id": "x", "choices": [')
                continues = completion or (payload.get("continue_final_message") and payload["messages"][-1]["role"] == "assistant")
                content = f" gentle {tag} things." if continues else f"User {tag} prefers gentle {tag} things."
                content = "" if first and n % 10 == 5 else content
                if int(tag[1:]) in fake.invalid_users:
                    content = "The user's preferences are:"  # an introduction without content, every time
                content = fake.answers.get(int(tag[1:]), content)
                cut = first and n % 10 == 6
                content, finish = (f"User {tag} prefers gentle {tag}", "length") if cut else (content, "stop")  # valid text, but cut off
                if fake.overrun and payload.get("stop") and not cut:
                    content += " They also like bath salts.\nAnd more." if continues else "\nThey also like bath salts."
                elif payload.get("stop"):
                    ends = [content.find(s) for s in payload["stop"] if s in content]
                    content = content[:min(ends)] if ends else content
                if payload.get("response_format", {}).get("type") == "json_schema" and not cut:
                    content = json.dumps({"preference": content})
                usage = {"prompt_tokens": len(prompt) // 4, "completion_tokens": 9, "total_tokens": len(prompt) // 4 + 9}
                if completion:
                    choice = {"index": 0, "finish_reason": finish, "text": content, "logprobs": None}
                    body = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": payload["model"], "choices": [choice], "usage": usage}
                else:
                    choice = {"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": content}}
                    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": payload["model"], "choices": [choice], "usage": usage}
                self.send(200, json.dumps(body).encode())

        return Handler


def peak_overlap(intervals) -> int:
    """Most intervals open at the same moment."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak
