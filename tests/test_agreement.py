"""benchmarks/agreement.py: the greedy agreement of a quantized model with bf16 (issue 25's sanity bound)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import agreement  # noqa: E402

COMMON = dict(device="cpu", max_model_len=64)


def test_a_model_agrees_with_itself_everywhere():
    ref = agreement.reference("random:tiny", COMMON, requests=3, prompt_len=12, tokens=10)
    same = agreement.measure("random:tiny", COMMON, ref)
    assert (same.free_running, same.teacher_forced, same.positions) == (1.0, 1.0, 30)


def test_four_bit_weights_disagree_somewhere_and_forcing_judges_each_position_alone():
    ref = agreement.reference("random:tiny", COMMON, requests=4, prompt_len=16, tokens=16)
    int4 = agreement.measure("random:tiny", dict(COMMON, quantization="int4"), ref)
    assert int4.positions == 64 and int4.free_running < 1.0
    # a free run that left bf16's text at position j counts every later position against it; forced,
    # each position is judged on bf16's text, so on these flat random logits it agrees more
    assert int4.teacher_forced > int4.free_running
