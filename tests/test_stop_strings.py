"""Stop strings in linear time (issue 21): the automaton gives exactly the semantics of the former
per-token scan (compared with a brute-force copy of it on random texts, stop sets and chunkings),
the caps on stop strings refuse oversized lists, and a served request with stop strings at the caps
neither takes long nor stalls ``/health``."""
from __future__ import annotations

import asyncio
import json
import os
import random
import string
import threading
import time

import httpx
import pytest

from reliability_utils import assert_at_rest, assert_error_body, record, stream_completion
from server_utils import ServerProcess
from tandem.config import EngineConfig
from tandem.engine.output_processor import OutputProcessor
from tandem.engine.scheduler import StepDeltas
from tandem.engine.stop_strings import StopAutomaton, StopHit, StopScanner, automaton_for, check_stop_strings
from tandem.sampling_params import SamplingParams
from tandem.tokenizer import ByteTokenizer

MAX_STOPS = EngineConfig.max_stop_strings
MAX_STOP_LEN = EngineConfig.max_stop_string_length


# --- the former scan, as the reference --------------------------------------------------------
def _reference_cut(text: str, num_new: int, stops: list[str], include: bool) -> str | None:
    """The text cut at the first stop string the newest ``num_new`` characters complete, or None."""
    search_from = max(0, len(text) - num_new - max(len(s) for s in stops) + 1)
    hits = [(i, s) for s in stops if (i := text.find(s, search_from)) >= 0]
    if not hits:
        return None
    index, stop = min(hits)
    return text[:index + len(stop) if include else index]


def _reference_pending(text: str, stops: list[str]) -> int:
    """The longest end of ``text`` that is the beginning (short of the whole) of a stop string."""
    return max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
               default=0)


def _cut(text: str, hit: StopHit, include: bool) -> str:
    return text[:hit.start + hit.length if include else hit.start]


# --- the automaton against the reference ---------------------------------------------------------
ALPHABETS = ["ab", "abc", "a\u00e9\u4e2d\U0001f600", "ab \n"]


def _random_case(rng: random.Random) -> tuple[list[str], str, list[str]]:
    """(stops, text, the text in chunks): small alphabets, so stops overlap, nest and recur."""
    alphabet = rng.choice(ALPHABETS)
    word = lambda lo, hi: "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    stops = [word(1, 5) for _ in range(rng.randint(1, 6))]
    if rng.random() < 0.5:  # a stop that is a prefix, or an extension, of another
        base = rng.choice(stops)
        stops.append(base[:rng.randint(1, len(base))] if rng.random() < 0.5 else base + word(1, 3))
    text = word(0, 40)
    cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, len(text) + 1)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]  # empty chunks included
    return stops, text, chunks


def test_the_automaton_matches_the_former_scan_on_random_inputs():
    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs each run; the seed is in any failure
    rng = random.Random(seed)
    hits = 0
    for case in range(10_000):
        stops, _, chunks = _random_case(rng)
        scanner, text = StopScanner(StopAutomaton(stops)), ""
        for chunk in chunks:
            text += chunk
            hit = scanner.feed(chunk)
            where = (seed, case, stops, chunks, text)
            for include in (False, True):
                expected = _reference_cut(text, len(chunk), stops, include) if chunk else None
                assert (None if hit is None else _cut(text, hit, include)) == expected, where
            if hit is not None:
                hits += 1
                break
            assert scanner.pending == _reference_pending(text, stops), where
    assert hits > 2000  # the cases do reach stop strings


@pytest.mark.parametrize("chunks, stops, cut, kept", [
    (["abcd"], ["abcd", "bc"], "", "abcd"),  # in one chunk, the leftmost start wins over the first end
    (["a", "b", "c", "d"], ["abcd", "bc"], "a", "abc"),  # fed one by one, "bc" is complete first
    (["xab", "c"], ["abc", "ab"], "x", "xab"),  # a stop that is a prefix of another: the shorter ends first
    (["x", "abc"], ["abc", "ab"], "x", "xab"),
    (["ST", "", "OP"], ["STOP"], "", "STOP"),  # the whole text is a stop string: nothing left
    (["\u4e2d\U0001f600", "\u00e9"], ["\U0001f600\u00e9"], "\u4e2d", "\u4e2d\U0001f600\u00e9"),
])
def test_chosen_cuts(chunks, stops, cut, kept):
    scanner, text, hit = StopScanner(StopAutomaton(stops)), "", None
    for chunk in chunks:
        text += chunk
        hit = scanner.feed(chunk)
        if hit is not None:
            break
    assert hit is not None and _cut(text, hit, False) == cut and _cut(text, hit, True) == kept


def test_pending_is_the_held_back_end():
    scanner = StopScanner(StopAutomaton(["STOP", "TOPS", "xy"]))
    assert [(scanner.feed(c), scanner.pending) for c in ["a S", "T", "O", "x"]] == [
        (None, 1), (None, 2), (None, 3), (None, 1)]


def test_one_automaton_per_stop_list_while_in_use():
    first = automaton_for(["a", "bc"])
    assert automaton_for(["a", "bc"]) is first and automaton_for(("a", "bc")) is first
    assert automaton_for(["bc", "a"]) is not first
    with pytest.raises(ValueError):
        StopAutomaton(["a", ""])


def test_the_output_processor_streams_what_the_former_scan_did():
    """Token by token through ``OutputProcessor``: each streamed text is the text less its held-back
    end, and the request stops on the token (and with the text) the former scan gave."""
    rng = random.Random(7)
    tok, checked = ByteTokenizer(), 0
    for _ in range(400):
        stops, text, _ = _random_case(random.Random(rng.random()))
        if not text.isascii():
            continue  # one byte token per character
        checked += 1
        include = rng.random() < 0.5
        proc = OutputProcessor(tok)
        proc.add("r", None, [1], SamplingParams(stop=stops, max_tokens=100, include_stop_str_in_output=include),
                 stream=True)
        so_far = ""
        for char in text:
            so_far += char
            step = proc.process(StepDeltas(["r"], [ord(char)]))
            expected = _reference_cut(so_far, 1, stops, include)
            streamed = step.outputs[0].outputs[0]
            if expected is not None:
                assert step.stopped == ["r"] and streamed.text == expected and streamed.finish_reason == "stop"
                break
            held = 0 if include else _reference_pending(so_far, stops)
            assert streamed.text == so_far[:len(so_far) - held], (stops, text)
    assert checked > 200


# --- caps ----------------------------------------------------------------------------------------
def test_caps_refuse_with_the_field_and_the_cap():
    check_stop_strings(["x" * MAX_STOP_LEN] * MAX_STOPS, MAX_STOPS, MAX_STOP_LEN)
    with pytest.raises(ValueError, match=rf"^SamplingParams\.stop has {MAX_STOPS + 1} strings; at most {MAX_STOPS}"):
        check_stop_strings(["x"] * (MAX_STOPS + 1), MAX_STOPS, MAX_STOP_LEN)
    with pytest.raises(ValueError, match=rf"^SamplingParams\.stop .* {MAX_STOP_LEN + 1} characters; at most "
                                         rf"{MAX_STOP_LEN}"):
        check_stop_strings(["x", "y" * (MAX_STOP_LEN + 1)], MAX_STOPS, MAX_STOP_LEN)
    for name in ("max_stop_strings", "max_stop_string_length"):
        with pytest.raises(ValueError, match=name):
            EngineConfig("random:tiny", **{name: 0})


def test_the_offline_engine_applies_its_caps():
    from tandem import LLM

    llm = LLM("random:tiny", device="cpu", max_model_len=64, kv_cache_tokens=256, max_stop_strings=2,
              max_stop_string_length=3)
    with pytest.raises(ValueError, match="SamplingParams.stop has 3 strings; at most 2"):
        llm.generate(["hi"], SamplingParams(stop=["a", "b", "c"], max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="SamplingParams.stop has a string of 4 characters; at most 3"):
        llm.generate(["hi"], SamplingParams(stop=["abcd"], max_tokens=2), use_tqdm=False)
    out = llm.generate(["hi"], SamplingParams(stop=["abc", "d"], max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].finish_reason in ("stop", "length")


# --- the issue's acceptance, against a real server -----------------------------------------------
N = 64  # the issue's n; the server below runs all 64 choices in one batch
MAX_TOKENS = 256


@pytest.fixture(scope="module")
def stop_server():
    proc = ServerProcess("--model", "random:tiny", "--device", "cpu", "--max-model-len", "512",
                         "--max-num-seqs", str(N))
    yield proc
    assert proc.stop() == 0, proc.log()


class _HealthPoller:
    """Polls /health from a thread until stopped: the longest answer and the longest gap between
    answers (a blocked event loop shows in both)."""

    def __init__(self, url: str) -> None:
        self.url, self.longest, self.gap, self.polls = url, 0.0, 0.0, 0
        self.statuses: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            last = time.monotonic()
            while not self._stop.is_set():
                start = time.monotonic()
                self.statuses.add(http.get(self.url + "/health").status_code)
                now = time.monotonic()
                self.longest, self.gap, last = max(self.longest, now - start), max(self.gap, now - last), now
                self.polls += 1
                self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def _stops(count: int, length: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(string.ascii_letters) for _ in range(length)) for _ in range(count)]


def test_the_issues_request_is_refused_fast(stop_server):
    body = {"prompt": "Hello", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True, "n": N,
            "stop": _stops(35_000, 100, 1)}
    content = json.dumps(body).encode()
    assert 3_500_000 < len(content) < 4 * 1024 * 1024  # under the default body cap: the stop cap refuses it
    poller = _HealthPoller(stop_server.url)
    start = time.monotonic()
    resp = httpx.post(stop_server.url + "/v1/completions", content=content, timeout=120,
                      headers={"Content-Type": "application/json"})
    seconds = time.monotonic() - start
    poller.stop()
    assert resp.status_code == 400, resp.text[:300]
    error = assert_error_body(resp.text)["error"]
    assert error["param"] == "stop" and f"at most {MAX_STOPS}" in error["message"], error
    record("stop_strings_refused", seconds=round(seconds, 3), health_longest_s=round(poller.longest, 3),
           health_gap_s=round(poller.gap, 3))
    assert seconds < 10, seconds  # 148.9 s before the caps
    assert_at_rest(stop_server.url)


def test_a_request_at_the_caps_is_fast_and_health_stays_responsive(stop_server):
    """The issue asks for 2 s; on a loaded 2-core CPU the same request without stop strings alone can
    take longer, so the bound is 2 s or twice that baseline, whichever is larger (the former scan
    took minutes on this request)."""
    body = {"prompt": "Hello", "max_tokens": MAX_TOKENS, "ignore_eos": True, "n": N}

    async def run(body):
        async with httpx.AsyncClient(base_url=stop_server.url, timeout=60) as http:
            return await stream_completion(http, body, deadline_s=60)

    baseline = asyncio.run(run(body))
    poller = _HealthPoller(stop_server.url)
    outcome = asyncio.run(run({**body, "stop": _stops(MAX_STOPS, MAX_STOP_LEN, 2)}))
    poller.stop()
    record("stop_strings_at_caps", seconds=round(outcome.seconds, 3), without_stops_s=round(baseline.seconds, 3),
           health_longest_s=round(poller.longest, 3), health_gap_s=round(poller.gap, 3), health_polls=poller.polls)
    assert baseline.completed and outcome.completed and outcome.finish_reason == "length", outcome
    assert outcome.seconds < max(2.0, 2 * baseline.seconds), (outcome.seconds, baseline.seconds)
    assert poller.statuses == {200} and poller.polls >= 3 and poller.longest < 0.5, (poller.longest, poller.gap)
    assert_at_rest(stop_server.url)
