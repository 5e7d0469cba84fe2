"""The admission ramp (``TANDEM_ADMIT_RAMP=1``): a wave of waiting sequences joins over several steps
while the device has work, and outputs are those of admitting everything at once, in sync and in
async batching."""
from types import SimpleNamespace

import pytest

from differential import compare, make_case, run_case
from tandem.bench.fake_worker import FakeWorker
from tandem.config import EngineConfig
from tandem.engine import admission
from tandem.engine.admission import AdmissionRamp
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.scheduler import Scheduler
from tandem.sampling_params import SamplingParams


class _Planned(list):
    def __init__(self, num_decodes: int, prompt_chunks: list[int]) -> None:
        super().__init__(range(num_decodes + len(prompt_chunks)))
        self.chunks = [SimpleNamespace(num_tokens=n) for n in prompt_chunks]


def test_the_cap_follows_the_previous_steps_prefill():
    ramp = AdmissionRamp(enabled=True)
    assert ramp.limit(num_running=0) is None  # nothing on the device to hide behind
    ramp.planned(_Planned(40, []), admitted=0)  # a decode step
    assert ramp.limit(num_running=40) == admission.FIRST
    ramp.planned(_Planned(38, [2500, 2500]), admitted=2)
    assert ramp.limit(num_running=40) == 5000 // admission.TOKENS_PER_ADMISSION
    ramp.planned(_Planned(30, [16] * 10), admitted=10)  # short prompts: the count doubles
    assert ramp.limit(num_running=40) == 20
    ramp.planned(_Planned(0, []), admitted=0)  # an empty step changes nothing
    assert ramp.limit(num_running=40) == 20 and ramp.limit(num_running=0) is None
    off = AdmissionRamp(enabled=False)
    off.planned(_Planned(40, []), admitted=0)
    assert off.limit(num_running=40) is None


def _admissions_per_step(monkeypatch, ramp: str) -> list[int]:
    """A running batch of 4, then a wave of 40 prompts of 64 tokens: new sequences in each step."""
    monkeypatch.setenv("TANDEM_ADMIT_RAMP", ramp)
    config = EngineConfig.from_options("random:tiny", max_num_seqs=64, max_num_batched_tokens=4096)
    engine = LLMEngine(config, FakeWorker(config))
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"early{i}", None, params, prompt_token_ids=[7 + i] * 16)
    for _ in range(3):
        engine.step()
    for i in range(40):
        engine.add_request(f"wave{i}", None, params, prompt_token_ids=[(11 * i + j) % 200 + 3 for j in range(64)])
    counts = []
    while engine.has_unfinished_requests() and len(counts) < 12:
        before = engine.core.scheduler.num_admissions
        engine.step()
        counts.append(engine.core.scheduler.num_admissions - before)
    return [c for c in counts if c]


def test_a_wave_joins_in_a_ramp_while_decodes_run(monkeypatch):
    assert _admissions_per_step(monkeypatch, "0") == [40]
    # after a decode step: FIRST; after FIRST prompts of 64 tokens twice as many (more than 8 * 64 // 64)
    assert _admissions_per_step(monkeypatch, "1") == [admission.FIRST, 2 * admission.FIRST, 40 - 3 * admission.FIRST]


@pytest.mark.parametrize("seed", [1203, 1208, 1209, 1213, 1214, 1217])
def test_with_the_ramp_outputs_equal_those_without_it_in_sync_and_async(seed, monkeypatch):
    monkeypatch.setattr(admission, "FIRST", 1)  # the cases' small waves are ramped too
    monkeypatch.setattr(admission, "TOKENS_PER_ADMISSION", 1 << 20)
    held_back = []  # steps where the cap kept a waiting sequence out that would have had a row
    admit = Scheduler._admit_waiting

    def spy(self, out, budget, limit=None):
        held_back.append(limit is not None and len(self.waiting) > limit and len(self.running) + limit < self.max_num_seqs)
        return admit(self, out, budget, limit)

    monkeypatch.setattr(Scheduler, "_admit_waiting", spy)
    case = make_case(seed)
    reference = run_case(case, async_batching=False)
    monkeypatch.setenv("TANDEM_ADMIT_RAMP", "1")
    sync, asyn = run_case(case, async_batching=False), run_case(case, async_batching=True)
    assert any(held_back), "the cases never met the cap"
    assert not compare(case, sync, asyn), case.describe()
    problems = compare(case, reference, sync, names=("no ramp", "ramp"), aborts_may_differ=True)
    assert not problems, case.describe() + "\n" + "\n".join(problems)
