"""One step of host token rules over a batch of requests: feed each the tokens it has not seen,
then fill the next step's mask rows.

The engine's process (``manager``, without grammar workers) and every grammar worker process
(``grammar_worker``) run this same code on ``TokenRules``, so a mask is the same bit for bit
wherever it was filled. Plain grammars (``TokenRules.plain``) with one new token each, a decode
step's usual case, are accepted in one xgrammar call, and their rows filled in one."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tandem.engine.structured.rules import TokenRules

if TYPE_CHECKING:
    import xgrammar

ACCEPTED, STOPPED, REJECTED = 0, 1, 2  # what advancing did to a request
EMPTY, MISMATCH = 1, 2  # what went wrong filling a row: no token left; its rules saw another number of tokens


def advance(batch: list[tuple[TokenRules, list[int]]], stop_set: frozenset[int]) -> list[tuple[int, int, int]]:
    """Feed each rules its new tokens; per entry (outcome, rejected token, its output index). A
    grammar can only terminate by taking a stop token (``stop_set``: the matchers' stop tokens)."""
    out = [(ACCEPTED, -1, -1)] * len(batch)
    plain: list[int] = []
    for i, (rules, tokens) in enumerate(batch):
        if rules.plain and len(tokens) == 1:
            plain.append(i)
            continue
        rejected = rules.advance(tokens)
        if rejected is not None:
            out[i] = (REJECTED, rejected, rules.num_accepted)
        elif rules.terminated:
            out[i] = (STOPPED, -1, -1)
    if plain:
        import xgrammar as xgr

        tokens = [batch[i][1][0] for i in plain]
        taken = xgr.BatchGrammarMatcher.batch_accept_token([batch[i][0].grammar.matcher for i in plain], tokens)
        for i, ok, token in zip(plain, taken, tokens):
            rules = batch[i][0]
            if not ok:
                out[i] = (REJECTED, token, rules.num_accepted)
                continue
            rules.num_accepted += 1
            if (token in stop_set or not stop_set) and rules.terminated:
                out[i] = (STOPPED, -1, -1)
    return out


def fill(rows: list[tuple[int, TokenRules | None, int, tuple[int, ...]]], mask: np.ndarray,
         batch_fill: xgrammar.BatchGrammarMatcher) -> list[tuple[int, int, int]]:
    """Fill ``mask[row]`` for each (row, rules, output index the row samples, the proposals before it
    in its step: a speculating sequence's rows after its first); rules None: the request ended, the
    row allows everything (its token is dropped). A row after a proposal its rules cannot take
    allows everything too: that proposal is masked out of the row before, so this row's draw is
    never accepted. Returns the entries that went wrong: (entry, EMPTY, 0) where the rules leave no
    token, (entry, MISMATCH, tokens seen)."""
    problems: list[tuple[int, int, int]] = []
    plain: list[int] = []
    plain_rows: list[int] = []
    ahead_of: dict[int, tuple[TokenRules, tuple[int, ...], bool]] = {}  # id(rules) -> its proposals fed, all taken
    for i, (row, rules, gen_index, ahead) in enumerate(rows):
        if rules is None:
            mask[row] = -1
        elif rules.known + len(ahead) != gen_index:
            mask[row] = -1
            problems.append((i, MISMATCH, rules.known))
        elif ahead:
            if not _feed_ahead(rules, ahead, ahead_of):
                mask[row] = -1
            elif not rules.fill(mask, row, gen_index):
                mask[row] = -1
                problems.append((i, EMPTY, 0))
        elif rules.plain:
            plain.append(i)
            plain_rows.append(row)
        elif not rules.fill(mask, row, gen_index):
            mask[row] = -1
            problems.append((i, EMPTY, 0))
    for rules, _, _ in ahead_of.values():  # the plain rows below are filled in the state of the known tokens
        rules.rollback()
    if plain:
        batch_fill.batch_fill_next_token_bitmask([rows[i][1].grammar.matcher for i in plain], mask, plain_rows)
    return problems


def _feed_ahead(rules: TokenRules, ahead: tuple[int, ...], fed: dict) -> bool:
    """Bring ``rules`` to the state after the known tokens and ``ahead`` (a sequence's rows come in
    order, each one proposal further: usually one more token). False if a proposal was not taken."""
    _, done, ok = fed.get(id(rules), (rules, (), True))
    if ahead[:len(done)] != done:
        rules.rollback()
        done, ok = (), True
    if ok:
        ok = rules.speculate(list(ahead[len(done):]))
    fed[id(rules)] = (rules, ahead, ok)
    return ok
