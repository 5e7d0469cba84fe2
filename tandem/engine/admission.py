"""How many waiting sequences one step may admit while the device has work: the admission ramp.

Admitting a sequence costs the host tens to a hundred microseconds (its prefix hashes, blocks, row
and first chunk). When a batch that started together finishes together (equal lengths: every
benchmark, and bursts on a server), the next step admits a whole wave at once, and the host plans it
while the device runs a short decode step: measured on the H100 (1B model, 64 sequences), each such
wave left the device idle 5-6 ms, which was the run's whole idle time (benchmarks/RESULTS.md).

With the ramp, a step planned after one that carried no prefill admits at most ``FIRST`` sequences;
after one that did, at most one per ``TOKENS_PER_ADMISSION`` of its prefill tokens (the longer
device step hides more admissions), or twice the previous step's admissions if that is more (short
prompts make short steps, but a burst of them still joins in a few steps). With no sequence running
there is nothing on the device to hide behind: no cap. The cap follows the schedule alone, never a
clock, so a run is planned the same way on any machine.

Off by default (``TANDEM_ADMIT_RAMP=1`` turns it on) until the H100 shows the idle time gone
without a cost in throughput."""
from __future__ import annotations

from tandem.engine.plan import SchedulerOutput

FIRST = 8
TOKENS_PER_ADMISSION = 64


class AdmissionRamp:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._prefill_tokens = 0  # of the last step that had any sequence
        self._admitted = 0  # by that step

    def limit(self, num_running: int) -> int | None:
        """The most sequences this step may admit while ``num_running`` run (None: no cap)."""
        if not self.enabled or num_running == 0:
            return None
        return max(FIRST, self._prefill_tokens // TOKENS_PER_ADMISSION, 2 * self._admitted)

    def planned(self, out: SchedulerOutput, admitted: int) -> None:
        """The step just planned, ``admitted`` of its sequences new; an empty one changes nothing.
        Its chunks' tokens are counted only with the ramp on: the step loop pays nothing otherwise."""
        if self.enabled and len(out):
            self._prefill_tokens = sum(item.num_tokens for item in out.chunks)  # not the decode block
            self._admitted = admitted
