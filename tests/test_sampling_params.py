"""SamplingParams validates every field's type and range, naming the field."""
import math

import numpy as np
import pytest

from tandem.sampling_params import SamplingParams

BAD = [
    dict(temperature=-0.1), dict(temperature=math.nan), dict(temperature=math.inf), dict(temperature="0.5"),
    dict(top_p=0.0), dict(top_p=1.5), dict(top_p=math.nan), dict(top_k=-2), dict(top_k=2.5), dict(top_k=True),
    dict(min_p=2.0), dict(min_p=-math.inf), dict(max_tokens=0), dict(max_tokens=3.0), dict(max_tokens="8"),
    dict(n=0), dict(n=1.0), dict(seed=1.5), dict(seed="42"), dict(stop=[""]), dict(stop=3), dict(stop=["a", 1]),
    dict(stop_token_ids=[-1]), dict(stop_token_ids=[1.0]), dict(stop_token_ids=5), dict(ignore_eos=1),
    dict(detokenize="yes"), dict(min_tokens=-1), dict(logprobs=-1), dict(presence_penalty=math.nan),
    dict(repetition_penalty=0.0), dict(repetition_penalty=5e-324),  # 0 as the device's float32
]


@pytest.mark.parametrize("bad", BAD, ids=lambda d: f"{next(iter(d))}={next(iter(d.values()))!r}")
def test_invalid_values_raise_value_error_naming_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**bad)


def test_valid_values_normalise():
    p = SamplingParams(temperature=0, top_k=-1, stop="x", stop_token_ids=(4, 5), seed=-3, max_tokens=None)
    assert p.greedy and p.effective_temperature == 0.0 and p.effective_top_k == 0
    assert p.stop_strings == ["x"] and p.stop_token_ids == [4, 5]
    assert SamplingParams(temperature=1).effective_temperature == 1.0  # ints are fine for float fields
    # past float32's range the device's temperature is its largest value, never inf (inf / inf = NaN)
    assert SamplingParams(temperature=1e308).effective_temperature == float(np.finfo(np.float32).max)
