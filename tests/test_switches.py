"""The environment switches (``tandem/switches.py``): each takes only its listed values, a bad one
fails when an engine starts, naming the variable, and the README lists them as the code does."""
import re
from pathlib import Path

import pytest

from tandem.bench.fake_worker import FakeWorker
from tandem.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.switches import DURATIONS, SWITCHES, check_switches, duration_s, flag, switch

ROOT = Path(__file__).parents[1]


@pytest.fixture
def unset(monkeypatch):
    for s in SWITCHES:
        monkeypatch.delenv(s.name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("s", SWITCHES, ids=lambda s: s.name)
def test_each_switch_takes_its_values_and_refuses_others(s, unset):
    assert switch(s.name) == s.default
    unset.setenv(s.name, "")  # set but empty, as `VAR= cmd` leaves it: the default
    assert switch(s.name) == s.default
    for value in s.values:
        unset.setenv(s.name, value)
        assert switch(s.name) == value
    unset.setenv(s.name, s.values[-1] + "x")
    with pytest.raises(ValueError, match=f"{s.name} must be .* not '{s.values[-1]}x'"):
        check_switches()


def test_flags_read_one_as_on(unset):
    assert not flag("TANDEM_GEMV") and flag("TANDEM_PIECEWISE")
    unset.setenv("TANDEM_GEMV", "1")
    unset.setenv("TANDEM_PIECEWISE", "0")
    assert flag("TANDEM_GEMV") and not flag("TANDEM_PIECEWISE")


def test_a_bad_switch_stops_an_engine_at_start_even_where_nothing_reads_it(unset):
    """The piecewise graphs exist only on CUDA, yet a CPU engine refuses a bad bucket limit too."""
    unset.setenv("TANDEM_PIECEWISE_MAX_TOKENS", "600")
    config = EngineConfig.from_options("random:tiny", max_num_seqs=2, max_model_len=64)
    with pytest.raises(ValueError, match="TANDEM_PIECEWISE_MAX_TOKENS must be 512, 1024, 2048, 4096 or 8192"):
        LLMEngine(config, FakeWorker(config))
    from tandem.runtime import create_worker

    with pytest.raises(ValueError, match="TANDEM_PIECEWISE_MAX_TOKENS"):  # before the model loads
        create_worker(EngineConfig.from_options("random:tiny", device="cpu"))


def test_switches_are_read_only_through_the_module():
    """No other module reads a switch from the environment itself (and so skips its check)."""
    names = {s.name for s in SWITCHES} | set(DURATIONS)
    readers = {}
    for path in (ROOT / "tandem").rglob("*.py"):
        if path.name != "switches.py":
            found = set(re.findall(r"environ[^\n]*?[\"'](TANDEM_[A-Z0-9_]+)", path.read_text())) & names
            if found:
                readers[str(path.relative_to(ROOT))] = sorted(found)
    assert readers == {}


def test_the_readme_lists_every_switch_with_its_values():
    rows = re.findall(r"^\| `(TANDEM_[A-Z0-9_]+)` \| (.+?) \| (.+?) \|$", (ROOT / "README.md").read_text(), re.M)
    listed = {name: tuple(re.findall(r"`([^`]+)`", values)) for name, values, _ in rows}
    assert listed == {s.name: s.values for s in SWITCHES}


@pytest.mark.parametrize("raw", ["soon", "0", "-5", "nan", "inf"])
def test_a_duration_is_a_positive_number_of_seconds(raw, unset):
    unset.delenv("TANDEM_TP_TIMEOUT_S", raising=False)
    assert duration_s("TANDEM_TP_TIMEOUT_S") == 1800.0
    unset.setenv("TANDEM_TP_TIMEOUT_S", "2.5")
    assert duration_s("TANDEM_TP_TIMEOUT_S") == 2.5
    unset.setenv("TANDEM_TP_TIMEOUT_S", raw)
    with pytest.raises(ValueError, match=f"TANDEM_TP_TIMEOUT_S must be a positive number of seconds, not '{raw}'"):
        check_switches()
