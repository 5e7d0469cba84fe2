"""``TANDEM_STEP_LOG``: a served run's idle time between steps, the gaps while the core had no work
left out."""
import json
import random
import time
from types import SimpleNamespace

import httpx

from server_utils import ServerProcess
from tandem.bench.metrics import idle_breakdown
from tandem.bench.step_log import StepRecord
from tandem.contract.worker import StepInterval
from tandem.server.step_gaps import StepGapLog


class _Worker:
    def __init__(self, intervals: list[StepInterval]) -> None:
        self.intervals, self.timing = intervals, False

    def start_timing(self) -> None:
        self.timing = True

    def stop_timing(self) -> list[StepInterval]:
        return self.intervals


def test_gaps_across_an_idle_stretch_are_left_out(tmp_path):
    rng = random.Random(5)
    spans, t = [], 10.0
    for step in range(40):
        gap = 5.0 if step == 20 else rng.uniform(0.0, 0.002)  # the core sat without requests before step 20
        start = t + gap
        t = start + rng.uniform(0.001, 0.003)
        spans.append(StepInterval(step, start, t))
    worker = _Worker(list(reversed(spans)))  # in any order
    core = SimpleNamespace(observers=[], worker=worker)
    log = StepGapLog(core, tmp_path / "gaps.json")
    assert worker.timing and core.observers == [log.log]
    log.idle_marks.append(spans[19].end + 1.0)
    log.write()
    out = json.loads((tmp_path / "gaps.json").read_text())
    working = [(a, b) for a, b in zip(spans, spans[1:]) if b.step_id != 20]
    idle = sum(b.start - a.end for a, b in working)
    busy = sum(s.end - s.start for s in spans)
    assert out["steps"] == 40 and abs(out["idle_s"] - idle) < 1e-9 and abs(out["busy_s"] - busy) < 1e-9
    assert abs(out["idle_fraction"] - idle / (idle + busy)) < 1e-9
    longest = sorted((b.start - a.end for a, b in working), reverse=True)[:10]
    assert [round(g["gap_ms"], 6) for g in out["largest_gaps"]] == [round(g * 1e3, 6) for g in longest]
    split = out["idle_breakdown"]  # no step records here: every step counts as decode only
    assert abs(sum(c["idle_ms"] for c in split["by_gap_ms"].values()) - idle * 1e3) < 1e-6
    assert abs(split["before_decode_ms"] - idle * 1e3) < 1e-6 and split["before_prefill_ms"] == 0


def test_the_idle_time_splits_by_gap_size_and_by_the_step_after_each_gap():
    rng = random.Random(11)
    sizes_ms = [rng.choice((0.01, 0.1, 0.5, 2.0, 9.0)) * rng.uniform(0.9, 1.1) for _ in range(60)]
    spans, t = [StepInterval(0, 0.0, 0.002)], 0.002
    for step, gap in enumerate(sizes_ms, start=1):
        spans.append(StepInterval(step, t + gap / 1e3, t + gap / 1e3 + 0.002))
        t = spans[-1].end
    prefill = {s for s in range(1, 61) if rng.random() < 0.3}
    records = {s: StepRecord(s, 64 if s in prefill else 8, 8, 7 if s in prefill else 8, 8, 512, 512, 0.0, 0, 0, 0)
               for s in range(61)}
    split = idle_breakdown([spans[:30], spans[30:]], records)  # the gap between the segments is not counted
    counted = [(step, gap) for step, gap in enumerate(sizes_ms, start=1) if step != 30]
    for top, label in ((0.05, "<0.05"), (0.2, "0.05-0.2"), (1.0, "0.2-1"), (5.0, "1-5"), (1e9, ">=5")):
        lower = {"<0.05": 0, "0.05-0.2": 0.05, "0.2-1": 0.2, "1-5": 1.0, ">=5": 5.0}[label]
        mine = [gap for _, gap in counted if lower <= gap < top]
        assert split["by_gap_ms"][label]["gaps"] == len(mine) and mine
        assert abs(split["by_gap_ms"][label]["idle_ms"] - sum(mine)) < 1e-6
    assert abs(split["before_prefill_ms"] - sum(g for s, g in counted if s in prefill)) < 1e-6
    assert abs(split["before_decode_ms"] - sum(g for s, g in counted if s not in prefill)) < 1e-6


def test_a_server_writes_its_step_gaps_on_shutdown(tmp_path, monkeypatch):
    path = tmp_path / "gaps.json"
    monkeypatch.setenv("TANDEM_STEP_LOG", str(path))
    server = ServerProcess("--model", "random:tiny", "--max-num-seqs", "8")
    try:
        for burst in range(2):  # two bursts with the server idle for 1.5 s between them
            time.sleep(1.5 * burst)
            for i in range(4):
                r = httpx.post(server.url + "/v1/completions", timeout=60,
                               json={"prompt": [3 + i, 9, 27], "max_tokens": 12, "ignore_eos": True})
                assert r.status_code == 200, r.text
    finally:
        assert server.stop() == 0, server.log()
    out = json.loads(path.read_text())
    assert out["steps"] >= 8 * 12 // 8 and out["busy_s"] > 0 and out["largest_gaps"]
    # the stretches without a request (1.5 s between the bursts; between sequential requests) are not in it
    assert all(g["gap_ms"] < 1000 for g in out["largest_gaps"])
    assert any(g["host_ms"] and "schedule_after" in g["host_ms"] for g in out["largest_gaps"])


def test_under_data_parallelism_each_core_names_its_own_file(tmp_path, monkeypatch):
    core = SimpleNamespace(observers=[], worker=_Worker([]))
    monkeypatch.setenv("TANDEM_STEP_LOG", str(tmp_path / "gaps.json"))
    assert StepGapLog.from_env(core).path == tmp_path / "gaps.json"
    monkeypatch.setenv("TANDEM_DATA_PARALLEL_RANK", "3")
    assert StepGapLog.from_env(core).path == tmp_path / "gaps.rank3.json"
    monkeypatch.delenv("TANDEM_STEP_LOG")
    assert StepGapLog.from_env(core) is None
