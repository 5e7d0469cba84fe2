"""Logprob entries travel flat (``LogprobEntries``), are kept per step as arrays (``LogprobChunk``) and
read per request through ``LogprobSeries``: the dicts read back are the entries given, a view does
not see later tokens, and mixed numbers of alternatives per request stay apart."""
import numpy as np

from tandem.contract.step import Logprobs
from tandem.engine.deltas import LogprobEntries
from tandem.engine.logprob_output import LogprobChunk
from tandem.outputs import Logprob, LogprobSeries


def _found(rng: np.random.Generator, n: int, k: int) -> Logprobs:
    return Logprobs(rng.normal(size=n).astype(np.float32), rng.integers(1, 50, n),
                    rng.permutation(100)[:n * k].reshape(n, k), np.sort(rng.normal(size=(n, k)), axis=1)[:, ::-1])


def test_entries_read_back_as_the_dicts_they_describe():
    rng = np.random.default_rng(3)
    found = _found(rng, 4, 5)
    entries = LogprobEntries()
    tokens, ks = np.array([7, 8, 9, 10]), np.array([5, 0, 2, 5])
    entries.add_rows(["a", "b", "c", "d"], np.arange(4), tokens, found, np.array([3, 2, 1, 0]), ks)
    chunk = LogprobChunk(entries)
    series = {rid: LogprobSeries(lambda t: f"t{t}") for rid in "abcd"}
    for j, rid in enumerate(entries.request_ids):
        series[rid].add(chunk, j)
    for j, (rid, row) in enumerate(zip("abcd", [3, 2, 1, 0])):
        got = series[rid][0]
        want = {int(tokens[j]): Logprob(float(found.logprob[row]), int(found.rank[row]), f"t{tokens[j]}")}
        for rank, (alt, value) in enumerate(zip(found.top_ids[row, :ks[j]], found.top_logprobs[row, :ks[j]]), 1):
            want.setdefault(int(alt), Logprob(float(value), rank, f"t{alt}"))
        assert got == want and list(got)[0] == tokens[j] and len(got) <= ks[j] + 1


def test_a_view_keeps_its_length_while_the_series_grows():
    rng = np.random.default_rng(4)
    series = LogprobSeries(lambda t: None)
    for step in range(3):
        entries = LogprobEntries()
        entries.add_rows(["r"], np.array([0]), np.array([step]), _found(rng, 1, 2), np.array([0]), np.array([2]))
        series.add(LogprobChunk(entries), 0)
        if step == 0:
            view = series.view()
    assert len(view) == 1 and len(series) == 3
    assert view[-1] == series[0] and series[1:] == [series[1], series[2]]
    assert series == list(series) and series != list(series)[:2]
