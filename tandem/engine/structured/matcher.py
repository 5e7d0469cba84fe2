"""One request's grammar state: an xgrammar matcher advanced only with tokens the host has received.

The matcher never sees an optimistic placeholder: ``advance`` feeds it the request's known output
tokens (``Sequence.output_token_ids``) from where it stopped, in order. So it is always in the state
of exactly those tokens, whatever happened meanwhile: a preempted request is recomputed from its
tokens and keeps its matcher as it is; a token computed after the request finished (EOS found one
step late, an abort) never reaches it, since the scheduler drops such tokens."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import xgrammar


class RequestGrammar:
    def __init__(self, compiled: xgrammar.CompiledGrammar, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids or None)
        self.num_accepted = 0  # output tokens fed to the matcher

    def advance(self, output_token_ids: list[int]) -> int | None:
        """Feed the tokens it has not seen; returns the first one the grammar rejects (then it stops
        there), or None."""
        for i in range(self.num_accepted, len(output_token_ids)):  # (no slice: no list made per step)
            if not self.matcher.accept_token(output_token_ids[i]):
                return output_token_ids[i]
            self.num_accepted += 1
        return None

    @property
    def terminated(self) -> bool:
        """It accepted a stop token: the output is complete."""
        return self.matcher.is_terminated()

    def fill(self, mask: np.ndarray, row: int) -> None:
        """mask[row] = the tokens allowed next (bit t of word t // 32)."""
        self.matcher.fill_next_token_bitmask(mask, row)
