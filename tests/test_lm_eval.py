"""Acceptance: lm-eval's ``local-completions`` runs a small generation task (defined locally, see
scripts/lm_eval_smoke.py) against the test server. Marked slow (about 10 s: lm-eval's imports);
skipped where lm-eval is not installed (``pip install "lm-eval[api]"``)."""
import importlib.util
import json
from pathlib import Path

import pytest

from server_utils import SERVER_KEY, metric

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (importlib.util.find_spec("lm_eval") and importlib.util.find_spec("tenacity")),
                                 reason='lm-eval is not installed (pip install "lm-eval[api]")')]

SCRIPT = Path(__file__).parents[1] / "scripts" / "lm_eval_smoke.py"


def _script():
    spec = importlib.util.spec_from_file_location("lm_eval_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lm_eval_local_completions_runs_a_generation_task(server, tmp_path):
    served = metric(server.url, "tandem:e2e_request_latency_seconds_count")
    done = _script().run(server.url, "tiny", SERVER_KEY, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tandem_smoke" in done.stdout and "exact_match" in done.stdout
    (samples,) = (tmp_path / "results").rglob("samples_tandem_smoke_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 8 and all(isinstance(r["resps"][0][0], str) for r in rows)
    assert metric(server.url, "tandem:e2e_request_latency_seconds_count") - served >= 8


def _results(folder):
    (path,) = (folder / "results").rglob("results_*.json")
    return json.loads(path.read_text())["results"]


def _loglikelihoods(folder):
    (samples,) = (folder / "results").rglob("samples_tandem_mc_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return {row["doc_id"]: [float(r[0][0]) for r in row["resps"]] for row in rows}


def test_lm_eval_loglikelihood_task_matches_transformers(server, tmp_path, checkpoint_dir):
    """A multiple-choice task scored by loglikelihood: through the server (echo + logprobs on token-id
    prompts) and with transformers' own model; the same accuracy and per-choice loglikelihoods."""
    script = _script()
    ours = script.run(server.url, "tiny", SERVER_KEY, tmp_path / "ours", task="tandem_mc")
    assert ours.returncode == 0, ours.stderr[-3000:]
    ref = script.run_hf(checkpoint_dir("llama"), tmp_path / "hf", task="tandem_mc")
    assert ref.returncode == 0, ref.stderr[-3000:]
    acc = _results(tmp_path / "ours")["tandem_mc"]["acc,none"]
    assert acc == _results(tmp_path / "hf")["tandem_mc"]["acc,none"]
    ours_ll, ref_ll = _loglikelihoods(tmp_path / "ours"), _loglikelihoods(tmp_path / "hf")
    assert len(ours_ll) == 16
    for doc, values in ours_ll.items():
        assert values == pytest.approx(ref_ll[doc], abs=1e-3)
