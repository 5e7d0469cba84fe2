"""The server's processes: a signal shuts it down cleanly (in-flight requests end with an error, exit
0, the core gone), a dead core is noticed (errors, /health 503, exit 1), and the core never
outlives the API process. Each test starts its own server on the random:tiny preset."""
from __future__ import annotations

import os
import signal
import socket
import threading

import httpx
import pytest

from server_utils import ServerProcess, metric, pid_alive, wait_until
from tandem.cli import main

BODY = {"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True}


def _start() -> ServerProcess:
    return ServerProcess("--model", "random:tiny", "--max-model-len", "1100")


def _stream_in_background(url: str) -> tuple[threading.Thread, list[str], threading.Event]:
    """A streaming request whose event lines are collected; the event is set once tokens flow."""
    lines: list[str] = []
    flowing = threading.Event()

    def run() -> None:
        with httpx.stream("POST", url + "/v1/completions", json={**BODY, "stream": True}, timeout=60) as resp:
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) >= 3:
                    flowing.set()
        flowing.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, lines, flowing


def _assert_ended_with_an_error_event(lines: list[str], words: str) -> None:
    assert lines[-1] == "data: [DONE]"
    assert lines[-2].startswith('data: {"error":') and words in lines[-2], lines[-3:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_aborts_in_flight_requests_and_exits_0(sig):
    server = _start()
    core = server.core_pid()
    try:
        thread, lines, flowing = _stream_in_background(server.url)
        assert flowing.wait(30)
        plain: list[httpx.Response] = []
        waiter = threading.Thread(target=lambda: plain.append(
            httpx.post(server.url + "/v1/completions", json=BODY, timeout=60)), daemon=True)
        waiter.start()
        assert wait_until(lambda: metric(server.url, "tandem:num_requests_running") == 2, 10)
        assert server.stop(sig) == 0, server.log()
        thread.join(10)
        waiter.join(10)
    finally:
        server.kill()
    _assert_ended_with_an_error_event(lines, "shutting down")
    assert plain[0].status_code == 503 and "shutting down" in plain[0].json()["error"]["message"]
    assert wait_until(lambda: not pid_alive(core), 5)
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)


def test_a_dead_core_fails_requests_and_the_server_exits_1():
    server = _start()
    try:
        thread, lines, flowing = _stream_in_background(server.url)
        assert flowing.wait(30)
        os.kill(server.core_pid(), signal.SIGKILL)
        thread.join(10)
        _assert_ended_with_an_error_event(lines, "engine core process died")
        assert '"type":"service_unavailable"' in lines[-2]  # a 503, as for any request once the core is gone
        health = httpx.get(server.url + "/health", timeout=2)  # before the server exits
        assert health.status_code == 503
        refused = httpx.post(server.url + "/v1/completions", json=BODY, timeout=5)
        assert refused.status_code == 503 and "engine core" in refused.json()["error"]["message"]
        assert server.proc.wait(30) == 1
    finally:
        server.kill()


def test_the_core_dies_with_the_api_process():
    server = _start()
    core = server.core_pid()
    server.proc.kill()  # SIGKILL: no chance to clean up
    server.proc.wait(10)
    assert wait_until(lambda: not pid_alive(core), 5)


def test_cli_errors_exit_2_before_loading_anything(capsys):
    assert main(["serve", "--model", "random:tiny", "--max-num-waiting", "-1"]) == 2
    assert "--max-num-waiting" in capsys.readouterr().err
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        assert main(["serve", "--model", "random:tiny", "--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    finally:
        taken.close()
    assert main(["serve", "--model", "random:nothing", "--port", "0"]) == 2
    assert "tandem: error:" in capsys.readouterr().err
