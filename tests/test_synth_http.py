"""The OpenAI-compatible HTTP backend against a real HTTP server on 127.0.0.1 that misbehaves on
cue: 5xx, 429 with Retry-After, slow replies (timeouts), dropped connections, 4xx."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from embedforge.data_synth.backends.base import GenerationParams
from embedforge.data_synth.backends.openai_http import OpenAIHTTPBackend, backoff_delay, parse_retry_after

MSG = [{"role": "user", "content": "hi"}]


class CueServer:
    """Each request takes the next cue: ("ok", text) | ("status", code) | ("429", retry_after) |
    ("slow", seconds) | ("drop",). When the cues run out, it answers ok."""

    def __init__(self, cues=(), delay: float = 0.0, responder=None):
        self.cues = list(cues)
        self.responder = responder  # body -> reply text, used once the cues run out
        self.delay = delay
        self.requests: list[dict] = []
        self.times: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                    server.times.append(time.monotonic())
                    if server.cues:
                        cue = server.cues.pop(0)
                    elif server.responder:
                        cue = ("ok", server.responder(body))
                    else:
                        cue = ("ok", f"reply {len(server.requests)}")
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    if cue[0] == "drop":
                        self.connection.close()
                        return
                    if cue[0] == "slow":
                        time.sleep(cue[1])
                        cue = ("ok", "late")
                    if cue[0] == "ok":
                        self._send(
                            200,
                            {"choices": [{"index": 0, "message": {"role": "assistant", "content": cue[1]}}]},
                        )
                    elif cue[0] == "429":
                        self._send(429, {"error": "rate limited"}, {"Retry-After": str(cue[1])})
                    else:
                        self._send(cue[1], {"error": f"status {cue[1]}"})
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def backend(url, **kw):
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    kw.setdefault("api_key_env", None)
    return OpenAIHTTPBackend("served-model", url, **kw)


def test_request_body_follows_the_openai_schema():
    with CueServer([("ok", '{"query": "x"}')]) as srv:
        result = backend(srv.url).generate([MSG], GenerationParams(0.7, 0.9, 33, json_mode=True), seeds=[5])[
            0
        ]
    assert result.ok and result.text == '{"query": "x"}' and result.attempts == 1
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["body"] == {
        "model": "served-model",
        "messages": MSG,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 33,
        "stream": False,
        "seed": 5,
        "response_format": {"type": "json_object"},
    }


SCHEMA = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"],
          "additionalProperties": False}


def test_a_schema_is_sent_as_response_format_json_schema():
    with CueServer([("ok", '{"query": "x"}')]) as srv:
        b = backend(srv.url)
        result = b.generate([MSG], GenerationParams(json_schema=json.dumps(SCHEMA)))[0]
    assert result.ok and b.structured_mode == "json_schema"
    assert srv.requests[0]["body"]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True},
    }


def test_a_server_that_rejects_response_format_gets_json_object_then_none():
    """400 to json_schema, 422 to json_object: the same request goes out again at once with a
    weaker format (no retry spent), and later requests start at the level the server accepted."""
    cues = [("status", 400), ("status", 422), ("ok", '{"query": "x"}'), ("ok", '{"query": "y"}')]
    with CueServer(cues) as srv:
        b = backend(srv.url, max_retries=0)
        params = GenerationParams(json_schema=json.dumps(SCHEMA))
        first = b.generate([MSG], params)[0]
        second = b.generate([MSG], params)[0]
    assert first.ok and first.attempts == 1 and second.text == '{"query": "y"}'
    formats = [r["body"].get("response_format", {}).get("type") for r in srv.requests]
    assert formats == ["json_schema", "json_object", None, None]
    assert b.structured_mode == "prompt"


def test_a_rejection_without_response_format_is_not_a_format_problem():
    with CueServer([("status", 400), ("ok", "never")]) as srv:
        b = backend(srv.url, max_retries=3)
        result = b.generate([MSG], GenerationParams())[0]
    assert result.error == "http_error" and len(srv.requests) == 1 and b.structured_mode == "json_schema"


def test_5xx_and_dropped_connections_are_retried_until_success():
    with CueServer([("status", 500), ("drop",), ("status", 503), ("ok", "fine")]) as srv:
        result = backend(srv.url, max_retries=4).generate([MSG], GenerationParams())[0]
    assert result.ok and result.text == "fine" and result.attempts == 4


def test_retries_are_bounded_and_the_last_cause_is_reported():
    with CueServer([("status", 502)] * 10) as srv:
        result = backend(srv.url, max_retries=2).generate([MSG], GenerationParams())[0]
    assert (result.error, result.attempts, len(srv.requests)) == ("http_error", 3, 3)
    assert "HTTP 502" in result.detail


def test_4xx_is_not_retried():
    with CueServer([("status", 404), ("ok", "never")]) as srv:
        result = backend(srv.url, max_retries=3).generate([MSG], GenerationParams())[0]
    assert result.error == "http_error" and len(srv.requests) == 1


def test_429_waits_for_retry_after():
    with CueServer([("429", 1), ("ok", "after the pause")]) as srv:
        began = time.monotonic()
        result = backend(srv.url).generate([MSG], GenerationParams())[0]
    assert result.text == "after the pause"
    assert srv.times[1] - srv.times[0] >= 0.95  # honoured, although the backoff alone would be ~0.01 s
    assert time.monotonic() - began < 5


def test_429_exhausted_is_counted_as_rate_limited():
    with CueServer([("429", 0)] * 5) as srv:
        result = backend(srv.url, max_retries=1).generate([MSG], GenerationParams())[0]
    assert result.error == "rate_limited" and len(srv.requests) == 2


def test_timeout_is_retried_then_reported():
    with CueServer([("slow", 1.0), ("slow", 1.0)]) as srv:
        result = backend(srv.url, timeout_s=0.3, max_retries=1).generate([MSG], GenerationParams())[0]
    assert result.error == "timeout" and result.attempts == 2


def test_unreachable_server_is_a_connection_error():
    with CueServer() as srv:
        url = srv.url
    result = backend(url, max_retries=1).generate([MSG], GenerationParams())[0]
    assert result.error == "connection_error"


def test_concurrency_limit_is_respected_and_used():
    with CueServer(delay=0.15) as srv:
        results = backend(srv.url, concurrency=3).generate([MSG] * 9, GenerationParams())
    assert all(r.ok for r in results)
    assert srv.max_in_flight == 3


def test_api_key_is_sent_but_never_logged(monkeypatch, caplog):
    monkeypatch.setenv("EF_TEST_KEY", "sk-secret-123")
    caplog.set_level(logging.DEBUG)
    with CueServer([("status", 500), ("ok", "x")]) as srv:
        b = backend(srv.url, api_key_env="EF_TEST_KEY")
        result = b.generate([MSG], GenerationParams())[0]
    assert srv.requests[0]["headers"]["Authorization"] == "Bearer sk-secret-123"
    assert "sk-secret-123" not in caplog.text and "sk-secret-123" not in repr(vars(b)) + result.detail


def test_retry_after_parsing_and_backoff_bounds():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    rng = random.Random(0)
    for attempt in range(8):
        delay = backoff_delay(attempt, 0.5, 4.0, rng)
        cap = min(4.0, 0.5 * 2**attempt)
        assert cap / 2 <= delay <= cap


def answer(body):
    user = body["messages"][-1]["content"]
    if "People who might search" in user:
        character = user.split("\n1. ", 1)[1].split("\n", 1)[0]
        return json.dumps({"character": character, "question_type": "summary", "difficulty": "phd"})
    return '{"query": "an overview of how rivers shape valleys"}'


def test_synth_command_over_http(tmp_path, capsys):
    from embedforge.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"id": i, "text": f"Rivers carve valleys over time, case {i}."}) + "\n"
            for i in range(5)
        )
    )
    out = tmp_path / "out"
    args = [
        "synth",
        "--corpus",
        str(corpus),
        "--backend",
        "openai",
        "--model",
        "served-model",
        "--output",
        str(out),
        "--concurrency",
        "3",
        "--max-retries",
        "0",
        "--api-key-env",
        "EF_UNSET_KEY",
    ]
    with CueServer(responder=answer) as srv:
        assert main([*args, "--base-url", srv.url]) == 0
    assert all(r["body"]["model"] == "served-model" for r in srv.requests) and len(srv.requests) == 10
    rows = [json.loads(x) for x in (out / "pairs-00000-of-00001.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {r["provenance"]["sampled"]["difficulty"] for r in rows} == {"phd"}
    assert "| summary | 5 | 100.0% |" in (out / "coverage.md").read_text()
    # more passages, no server: the run stops, exits 1, and keeps the 5 finished rows
    corpus.write_text(corpus.read_text() + json.dumps({"id": 9, "text": "Glaciers too."}) + "\n")
    with CueServer() as dead:
        url = dead.url
    assert main([*args, "--base-url", url]) == 1
    assert "1 passages pending" in capsys.readouterr().err
    assert len((out / "pairs-00000-of-00001.jsonl").read_text().splitlines()) == 5
