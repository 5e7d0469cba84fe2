"""Rotary position embeddings: float32 cos/sin tables per position (non-interleaved, rotate-half layout)
and their application to q and k.

The types are transformers' ``rope_type`` values. Each is computed here from its definition, in the
order of operations transformers uses, so that the frequencies and the attention factor equal the
installed transformers' bit for bit (``tests/test_rotary.py`` compares them on random configs). With
d the rotated dims of a head and inv_freq_i = theta^(-2i/d), i < d/2:

- ``default``: inv_freq.
- ``linear`` (position interpolation): positions divided by ``factor``, i.e. inv_freq / factor.
- ``llama3``: frequencies whose wavelength exceeds original/low_freq_factor are divided by ``factor``,
  those under original/high_freq_factor are kept, a linear blend in original/wavelength between.
- ``yarn``: per frequency, a blend of inv_freq (extrapolation) and inv_freq / factor (interpolation),
  weighted by a ramp over the dims that turn between ``beta_fast`` and ``beta_slow`` times within the
  original length (``truncate``, on by default, widens the ramp to whole dims); cos and sin are
  multiplied by the attention factor: ``attention_factor`` if given, else 0.1 ln(factor) + 1 (the
  ratio of 0.1 mscale ln(factor) + 1 to 0.1 mscale_all_dim ln(factor) + 1 when both are set).
- ``longrope``: inv_freq / short_factor (per frequency); cos and sin times ``attention_factor`` if
  given, else sqrt(1 + ln(factor) / ln(original)) (1 when factor <= 1).
- ``dynamic`` (dynamic NTK): the base raised with the sequence length past max_position_embeddings;
  at or below it, inv_freq.

Position-dependent types. transformers recomputes ``dynamic`` frequencies once a sequence grows past
max_position_embeddings, and switches ``longrope`` from its short to its long factors once a sequence
grows past original_max_position_embeddings: the frequencies then depend on each sequence's current
length. Keys already rotated into a paged KV cache (and shared between sequences by prefix caching)
cannot follow that, and transformers' own ``generate`` mixes both sets in one sequence that crosses the
length. Within that length both types are fixed and exact: ``dynamic`` is ``default`` and ``longrope``
uses its short factors. So tandem builds those tables only: a max_model_len beyond the length is refused
at load, and without one given max_model_len defaults to it (``model_config.rope_position_limit``).

Partial rotary (``partial_rotary_factor`` < 1): the tables cover the rotated dims only (pass
int(head_dim * partial_rotary_factor) as ``dim``; every type's frequencies are over that dim, as in
transformers), and ``apply_rope`` rotates the first that many dims of each head and passes the rest
through."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from tandem.model.model_config import check_rope_positions

Scaling = dict[str, Any]


def _powers(dim: int, theta: float) -> torch.Tensor:
    """theta^(2i/d), i < d/2: the wavelengths / 2 pi of plain rope."""
    return theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)


def _default(dim: int, theta: float, scaling: Scaling) -> tuple[torch.Tensor, float]:
    return 1.0 / _powers(dim, theta), 1.0


def _linear(dim: int, theta: float, scaling: Scaling) -> tuple[torch.Tensor, float]:
    return 1.0 / _powers(dim, theta) / scaling["factor"], 1.0


def _dynamic(dim: int, theta: float, scaling: Scaling) -> tuple[torch.Tensor, float]:
    """NTK-aware base for a sequence of ``length``; exact only at length <= max_position_embeddings
    (``original_max_position_embeddings`` here), where the base is theta itself."""
    factor, length = scaling["factor"], scaling["original_max_position_embeddings"]
    base = theta * ((factor * length / length) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / _powers(dim, base), 1.0


def _llama3(dim: int, theta: float, scaling: Scaling) -> tuple[torch.Tensor, float]:
    inv_freq = 1.0 / _powers(dim, theta)
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled), 1.0


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_attention_factor(scaling: Scaling, factor: float) -> float:
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor, 1)


def _yarn_ramp(dim: int, theta: float, scaling: Scaling) -> torch.Tensor:
    """Per frequency, 0 where it turns more than beta_fast times within the original length (kept),
    1 where fewer than beta_slow (interpolated), linear between."""
    original = scaling["original_max_position_embeddings"]

    def dim_turning(times: float) -> float:  # the (fractional) dim whose wavelength is original / times
        return dim * math.log(original / (times * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(scaling.get("beta_fast") or 32), dim_turning(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    return torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)


def _yarn(dim: int, theta: float, scaling: Scaling) -> tuple[torch.Tensor, float]:
    factor = scaling["factor"]
    powers = _powers(dim, theta)
    kept = 1 - _yarn_ramp(dim, theta, scaling)  # weight of the unscaled frequency
    inv_freq = 1.0 / (factor * powers) * (1 - kept) + 1.0 / powers * kept
    return inv_freq, _yarn_attention_factor(scaling, factor)


def _longrope(dim: int, theta: float, scaling: Scaling) -> tuple[torch.Tensor, float]:
    """The short factors: what transformers uses for sequences within the original length."""
    short = scaling["short_factor"]
    if len(short) != dim // 2:
        raise ValueError(f"rope_scaling short_factor has {len(short)} entries; longrope over {dim} rotated dims "
                         f"needs {dim // 2}")
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return 1.0 / (torch.tensor(short, dtype=torch.float32) * _powers(dim, theta)), attention


_FREQUENCIES: dict[str, Callable[[int, float, Scaling], tuple[torch.Tensor, float]]] = {
    "default": _default, "linear": _linear, "dynamic": _dynamic, "llama3": _llama3, "yarn": _yarn,
    "longrope": _longrope}


def rope_inv_freq(dim: int, theta: float, scaling: Scaling | None) -> tuple[torch.Tensor, float]:
    """Float32 inverse frequencies [dim // 2] and the attention factor that multiplies cos and sin.
    ``scaling``: ``ModelConfig.rope_scaling`` (``model_config`` resolves the values transformers
    derives, such as a missing factor or original length); None for plain rope."""
    return _FREQUENCIES["default" if scaling is None else scaling["rope_type"]](dim, theta, scaling or {})


def rope_cos_sin(dim: int, theta: float, scaling: Scaling | None, max_positions: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 tables [max_positions, dim] of cos and sin (times the type's attention factor),
    rotate-half layout. ``dim``: the rotated dims of a head (head_dim unless rotary is partial)."""
    check_rope_positions(scaling, max_positions)
    inv_freq, attention = rope_inv_freq(dim, theta, scaling)
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if attention != 1.0:
        cos, sin = cos * attention, sin * attention
    return cos.to(device), sin.to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, rotated dims] already in x's dtype. Dims past the tables'
    width (partial rotary) pass through unrotated."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = rot // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
