"""``TANDEM_PIECEWISE_MAX_TOKENS``: which token counts the piecewise graphs capture."""
import pytest

from tandem.worker.piecewise_graphs import LARGE_BUCKETS, TOKEN_BUCKETS, token_buckets


def test_the_default_stops_at_512(monkeypatch):
    monkeypatch.delenv("TANDEM_PIECEWISE_MAX_TOKENS", raising=False)
    assert token_buckets() == TOKEN_BUCKETS and TOKEN_BUCKETS[-1] == 512


@pytest.mark.parametrize("top", [1024, 2048, 4096, 8192])
def test_a_larger_maximum_adds_buckets_about_1_4x_apart(monkeypatch, top):
    monkeypatch.setenv("TANDEM_PIECEWISE_MAX_TOKENS", str(top))
    buckets = token_buckets()
    assert buckets[-1] == top and buckets[:len(TOKEN_BUCKETS)] == TOKEN_BUCKETS
    assert all(b / a <= 1.5 for a, b in zip(buckets[len(TOKEN_BUCKETS) - 1:], buckets[len(TOKEN_BUCKETS):]))
    assert set(buckets) - set(TOKEN_BUCKETS) == {t for t in LARGE_BUCKETS if t <= top}


@pytest.mark.parametrize("value", ["600", "big", "0"])
def test_other_values_are_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("TANDEM_PIECEWISE_MAX_TOKENS", value)
    with pytest.raises(ValueError, match="TANDEM_PIECEWISE_MAX_TOKENS"):
        token_buckets()


def test_the_graphs_take_the_buckets_up_to_the_step_budget(monkeypatch):
    from types import SimpleNamespace

    from tandem.worker.piecewise_graphs import PiecewiseGraphs

    monkeypatch.setenv("TANDEM_PIECEWISE_MAX_TOKENS", "8192")
    runner = SimpleNamespace(model=SimpleNamespace(kv_spec=SimpleNamespace(layers=[])))
    assert PiecewiseGraphs(runner, 2048, pool=None).sizes == TOKEN_BUCKETS + (768, 1024, 1536, 2048)
