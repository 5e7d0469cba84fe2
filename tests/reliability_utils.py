"""Shared checks of the reliability tests: error bodies that leak nothing, a server back at rest,
process memory, streaming clients with deadlines, and the figures docs/RELIABILITY.md reports.

Set ``TANDEM_RELIABILITY_LOG=path`` to have each test append its figures there as JSON lines."""
from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from server_utils import ROOT, metric, wait_until

# what a server-side traceback or path looks like; echoed user input is not a leak
_LEAKS = re.compile("|".join(map(re.escape, [
    "Traceback (most recent call last)", 'File "', str(ROOT), sys.prefix, "site-packages", "/tandem/"])))


def assert_no_leak(text: str) -> None:
    found = _LEAKS.search(text)
    assert found is None, f"an error body leaks {found.group(0)!r}: {text[:300]}"


def assert_error_body(text: str, status: int | None = None) -> dict[str, Any]:
    """OpenAI's error shape, and nothing of the server's insides."""
    assert_no_leak(text)
    body = json.loads(text)
    assert set(body) == {"error"}, text[:300]
    assert set(body["error"]) == {"message", "type", "param", "code"}, text[:300]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


def check_response(status: int, text: str, streamed: bool) -> None:
    """Any response the fuzzers see: no 5xx; errors in the shape; a stream ends with [DONE] and each
    event is JSON (an error event too)."""
    assert status < 500, f"{status}: {text[:300]}"
    if status >= 400:
        assert_error_body(text)
        return
    if streamed:
        events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", text[-300:]
        for event in events[:-1]:
            payload = json.loads(event)
            if "error" in payload:
                assert_error_body(event)


def at_rest(url: str) -> bool:
    """Nothing running or waiting in the core, no KV block held, no per-request state in the API."""
    names = ("tandem:num_requests_running", "tandem:num_requests_waiting", "tandem:kv_cache_usage_perc",
             "tandem:api_open_requests", "tandem:api_output_states")
    return all(metric(url, name) == 0 for name in names)


def assert_at_rest(url: str, timeout: float = 10) -> None:
    assert wait_until(lambda: at_rest(url), timeout), httpx.get(url + "/metrics", timeout=5).text[-2000:]
    assert httpx.get(url + "/health", timeout=5).status_code == 200


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


def record(name: str, **figures: Any) -> None:
    """Append this test's figures to $TANDEM_RELIABILITY_LOG (the numbers docs/RELIABILITY.md quotes)."""
    path = os.environ.get("TANDEM_RELIABILITY_LOG")
    print(f"[reliability] {name}: {figures}")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}) + "\n")


@dataclass
class Outcome:
    """How one streamed completion ended, as its client saw it."""

    status: int  # the HTTP status; 0 if it did not end before its deadline
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None  # the message of an error body or error event
    error_type: str | None = None  # its type: "service_unavailable" for a 503, "internal_server_error" for a 500
    done: bool = False  # the stream ended with data: [DONE]
    seconds: float = 0.0

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.done and self.error is None and self.finish_reason is not None


async def stream_completion(http: httpx.AsyncClient, body: dict[str, Any], deadline_s: float) -> Outcome:
    """POST a streamed completion and read it to the end (checking every event's shape), or give up at
    the deadline: an ``Outcome`` with status 0 is a hang."""
    start = time.monotonic()
    try:
        outcome = await asyncio.wait_for(_read_stream(http, {**body, "stream": True}), deadline_s)
    except asyncio.TimeoutError:
        outcome = Outcome(0, error="no end before the deadline")
    outcome.seconds = time.monotonic() - start
    return outcome


async def _read_stream(http: httpx.AsyncClient, body: dict[str, Any]) -> Outcome:
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode()
            error = assert_error_body(text)["error"]
            return Outcome(resp.status_code, error=error["message"], error_type=error["type"])
        out = Outcome(200)
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                out.done = True
            elif "error" in (payload := json.loads(data)):
                error = assert_error_body(data)["error"]
                out.error, out.error_type = error["message"], error["type"]
            else:
                for choice in payload["choices"]:
                    out.text += choice["text"]
                    out.finish_reason = choice["finish_reason"] or out.finish_reason
        return out
