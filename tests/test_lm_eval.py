"""Acceptance: lm-eval's ``local-completions`` runs a small generation task (defined locally, see
scripts/lm_eval_smoke.py) against the test server, and a loglikelihood task whose scores match
transformers' own. Both tasks go through one lm-eval run against the server (its imports are most of
its time). Marked slow (about 10 s a run: lm-eval's imports); skipped where lm-eval is not installed
(``pip install "lm-eval[api]"``)."""
import importlib.util
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from server_utils import SERVER_KEY, metric

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (importlib.util.find_spec("lm_eval") and importlib.util.find_spec("tenacity")),
                                 reason='lm-eval is not installed (pip install "lm-eval[api]")')]

SCRIPT = Path(__file__).parents[1] / "scripts" / "lm_eval_smoke.py"
SERVED = "tandem:e2e_request_latency_seconds_count"


def _script():
    spec = importlib.util.spec_from_file_location("lm_eval_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Ours:
    done: subprocess.CompletedProcess
    folder: Path
    served: float  # requests the server completed during the run


@pytest.fixture(scope="module")
def ours(server, tmp_path_factory: pytest.TempPathFactory) -> Ours:
    """One lm-eval run against the server with both tasks."""
    folder = tmp_path_factory.mktemp("lm_eval_ours")
    before = metric(server.url, SERVED)
    done = _script().run(server.url, "tiny", SERVER_KEY, folder, task="tandem_smoke,tandem_mc")
    return Ours(done, folder, metric(server.url, SERVED) - before)


def _samples(folder: Path, task: str) -> list[dict]:
    (samples,) = (folder / "results").rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in samples.read_text().splitlines()]


def test_lm_eval_local_completions_runs_a_generation_task(ours):
    assert ours.done.returncode == 0, ours.done.stderr[-3000:]
    assert "tandem_smoke" in ours.done.stdout and "exact_match" in ours.done.stdout
    rows = _samples(ours.folder, "tandem_smoke")
    assert len(rows) == 8 and all(isinstance(r["resps"][0][0], str) for r in rows)
    # every request lm-eval made, the 8 generations and one per choice scored, reached the server
    scored = sum(len(row["resps"]) for row in _samples(ours.folder, "tandem_mc"))
    assert ours.served >= 8 + scored


def _results(folder):
    (path,) = (folder / "results").rglob("results_*.json")
    return json.loads(path.read_text())["results"]


def _loglikelihoods(folder):
    return {row["doc_id"]: [float(r[0][0]) for r in row["resps"]] for row in _samples(folder, "tandem_mc")}


def test_lm_eval_loglikelihood_task_matches_transformers(ours, tmp_path, checkpoint_dir):
    """A multiple-choice task scored by loglikelihood: through the server (echo + logprobs on token-id
    prompts) and with transformers' own model; the same accuracy and per-choice loglikelihoods."""
    assert ours.done.returncode == 0, ours.done.stderr[-3000:]
    ref = _script().run_hf(checkpoint_dir("llama"), tmp_path / "hf", task="tandem_mc")
    assert ref.returncode == 0, ref.stderr[-3000:]
    acc = _results(ours.folder)["tandem_mc"]["acc,none"]
    assert acc == _results(tmp_path / "hf")["tandem_mc"]["acc,none"]
    ours_ll, ref_ll = _loglikelihoods(ours.folder), _loglikelihoods(tmp_path / "hf")
    assert len(ours_ll) == 16
    for doc, values in ours_ll.items():
        assert values == pytest.approx(ref_ll[doc], abs=1e-3)
