"""Environment switches: the settings that are not options (which kernel runs, experiments kept off
until a GPU shows them faster). Each has a fixed list of values (a duration: a positive number of
seconds); every one is checked when an engine starts (``check_switches``), so a typo fails at once,
naming the variable, instead of quietly leaving the default in place. Torch-free and importing
nothing of tandem: every layer may read it."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Switch:
    name: str
    values: tuple[str, ...]  # the first is the default
    meaning: str

    @property
    def default(self) -> str:
        return self.values[0]

    def expected(self) -> str:
        return " or ".join((", ".join(self.values[:-1]), self.values[-1]))


SWITCHES = (
    Switch("TANDEM_ATTENTION", ("auto", "triton", "sdpa"), "attention backend: Triton kernels on CUDA, SDPA elsewhere"),
    Switch("TANDEM_SAMPLER", ("auto", "triton", "torch"), "sampling stage: Triton kernels on CUDA, torch elsewhere"),
    Switch("TANDEM_MOE", ("auto", "triton", "reference"), "MoE experts: the fused kernel on CUDA, the reference elsewhere"),
    Switch("TANDEM_W4A16", ("auto", "triton"), "4-bit weights: the W4A16 kernel on CUDA, dequantized at load elsewhere"),
    Switch("TANDEM_GEMV", ("0", "1"), "the Triton one-row GEMV for bf16 projections at batch 1"),
    Switch("TANDEM_GATED_DOWN", ("0", "1"), "the W4A16 down projection computing SiLU as it reads its input"),
    Switch("TANDEM_PDL", ("0", "1"), "programmatic dependent launch for the kernels that support it (Hopper)"),
    Switch("TANDEM_PIECEWISE", ("1", "0"), "piecewise CUDA graphs for prefill and mixed steps"),
    Switch("TANDEM_PIECEWISE_MAX_TOKENS", ("512", "1024", "2048", "4096", "8192"),
           "the largest step the piecewise graphs capture"),
    Switch("TANDEM_ADMIT_RAMP", ("0", "1"), "admit a wave of waiting prompts over several steps"),
    Switch("TANDEM_TP_ALLREDUCE", ("auto", "nccl"), "tensor parallelism's all-reduce: one-shot where it sums like NCCL"),
)
_BY_NAME = {s.name: s for s in SWITCHES}
#: settings in seconds: name -> (default, meaning)
DURATIONS = {"TANDEM_TP_TIMEOUT_S": (1800.0, "tensor parallelism's rendezvous and collective timeout")}


def switch(name: str) -> str:
    """The switch's value (its default when unset or empty); a value not in its list raises."""
    s = _BY_NAME[name]
    value = os.environ.get(name) or s.default
    if value not in s.values:
        raise ValueError(f"{name} must be {s.expected()}, not {value!r} ({s.meaning})")
    return value


def flag(name: str) -> bool:
    """A 0/1 switch's value."""
    return switch(name) == "1"


def duration_s(name: str) -> float:
    """A duration setting's value (its default when unset or empty); anything but a positive number raises."""
    default, meaning = DURATIONS[name]
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, not {raw!r} ({meaning})")
    return value


def check_switches() -> None:
    """Every switch and duration at once, so a bad value fails when an engine starts, not when (or
    whether) the code that reads it runs."""
    for s in SWITCHES:
        switch(s.name)
    for name in DURATIONS:
        duration_s(name)
