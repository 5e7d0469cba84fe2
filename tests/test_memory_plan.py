"""What the KV cache plan leaves room for matches what the worker then allocates beside it."""
import torch

from tandem import LLM
from tandem.worker.model_runner import ModelRunner


def test_the_per_row_state_the_plan_reserves_is_what_the_runner_allocates():
    llm = LLM("random:tiny", device="cpu", kv_cache_tokens=256, max_num_seqs=3, max_model_len=200)
    worker = llm.engine.worker
    runner = worker.runner
    allocated = sum(t.numel() * t.element_size() for t in (runner.history, runner.next_tokens))
    assert runner.history.shape == (worker.num_rows + 1, 200) and runner.history.dtype == torch.int32
    assert ModelRunner.state_bytes(worker.num_rows + 1, 200) == allocated
