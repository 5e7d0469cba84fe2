"""Tensor parallelism with structured output: a step with grammar-constrained rows, on every rank.

Such a step takes its own path through ``StreamExecutor`` (CUDA's executor): ``submit`` enqueues only
its forward (``_forward``, not ``_run``) and ``provide_mask`` its sampling. Under tensor parallelism it
must still receive rank 0's packed inputs before its forward's collectives, every rank must sample it
through rank 0's mask, and a drain (an interrupted ``generate``: ``abort_all``) that samples it
unconstrained on rank 0 must do so on every rank, since sampling gathers the logits. Two ranks over
gloo, launched as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: rank 0 runs the engine,
rank 1 the follower loop), run their steps through ``TPStreamExecutor`` with CUDA's streams and events
stubbed out (``cuda_stub``), or through the CPU executors (their forward path is covered by
``test_tensor_parallel.py``; here their drain). Constrained (a JSON schema, a choice) and
unconstrained requests in one batch, greedy and seeded, sync and async, each followed by an
interruption while a step waits for its mask: the tokens equal one process's. A rank that computes on
stale inputs changes tokens (or indexes out of range); a rank left out of a collective fails within
the group's collective timeout (45 s here) instead of hanging."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_tp_torchrun import _free_port, communicate_all

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 150

_RANK = """
import os, sys
sys.path.insert(0, "tests")
import cuda_stub
cuda_stub.install()
from tandem.parallel.executors import TPStreamExecutor
from tandem.parallel.rank_worker import RankWorker

if sys.argv[1] == "streams":  # every rank runs its steps as on CUDA (the streams and events are no-ops)
    RankWorker._make_executor = lambda self, async_batching: TPStreamExecutor(
        self.runner, not async_batching, self.config.max_num_seqs, self.graphs, self.piecewise)
if os.environ["RANK"] != "0":
    from tandem.parallel.follower import main
    sys.exit(main())

from tandem import LLM, SamplingParams
from tandem.structured_outputs import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 300},
                                           "ok": {"type": "boolean"}}, "required": ["n", "ok"],
          "additionalProperties": False}
CHOICE = StructuredOutputsParams(choice=["yes", "no", "maybe", "n/a"])
JSON = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
PROMPTS = [[(7 * i + 3 * j) % 440 + 5 for j in range(n)] for i, n in enumerate((5, 17, 30, 3, 11))]
PARAMS = [SamplingParams(temperature=0, max_tokens=24, structured_outputs=JSON),
          SamplingParams(temperature=0.9, seed=11, max_tokens=24, structured_outputs=JSON),
          SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),  # unconstrained, in the same steps
          SamplingParams(temperature=1.2, top_k=20, seed=12, max_tokens=8, structured_outputs=CHOICE),
          SamplingParams(temperature=0, max_tokens=8, structured_outputs=CHOICE)]
SETTINGS = dict(device="cpu", dtype="float64", max_num_batched_tokens=16, block_size=8, max_model_len=96)

def tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]

def interrupt_while_a_mask_is_awaited(llm):
    # abort_all (an interrupted generate) while a constrained step's sampling waits for its mask:
    # every rank drains it, and the group runs on in step
    engine, core = llm.engine, llm.engine.core
    engine.add_request("cut", None, PARAMS[0], prompt_token_ids=PROMPTS[2])
    for _ in range(50):
        engine.step()
        newest = core.in_flight[-1] if core.in_flight else None
        if newest is not None and newest.masked is not None and not newest.masked.provided:
            break
    else:
        raise AssertionError("no constrained step waited for its mask")
    engine.abort_all()

masked = []  # the grammar masks rank 0 was given
real_provide = RankWorker.provide_mask
RankWorker.provide_mask = lambda self, step_id, mask: (masked.append(mask is not None),
                                                        real_provide(self, step_id, mask))[1]

one = LLM("random:tiny", async_batching=False, **SETTINGS)
expected = tokens(one)
one.engine.shutdown()
llm = LLM("random:tiny", tensor_parallel_size=2, async_batching=False, **SETTINGS)
try:
    sync = tokens(llm)
    interrupt_while_a_mask_is_awaited(llm)
    llm.engine.core.set_async(True)
    asyn = tokens(llm)
    interrupt_while_a_mask_is_awaited(llm)
    again = tokens(llm)
finally:
    llm.engine.shutdown()
assert sync == expected, ("sync", expected, sync)
assert asyn == expected, ("async", expected, asyn)
assert again == expected, ("after an interruption", expected, again)
assert len(masked) > 10, masked  # constrained steps ran
print("ok", sum(map(len, expected)))
"""


@pytest.mark.parametrize("executor", ["streams", "cpu"])
def test_tp2_constrained_steps_give_the_tokens_of_tp1(executor):
    """``streams``: every rank's steps through ``TPStreamExecutor`` (CUDA's path); ``cpu``: the CPU
    executors, whose forward path ``test_tensor_parallel.py`` covers, here for the interruptions."""
    port = _free_port()
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "TANDEM_TP_TIMEOUT_S": "45", "OMP_NUM_THREADS": "1",  # a stuck collective fails, not hangs
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK, executor], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in (0, 1)]
    outs = communicate_all(ranks, TIMEOUT_S)
    (out, err), (_, follower_err) = outs
    assert ranks[0].returncode == 0 and out.startswith("ok"), out[-2000:] + err[-4000:] + follower_err[-2000:]
    assert ranks[1].returncode == 0, follower_err[-4000:]
