"""A request's token rules that only the host can decide, one sampled token at a time.

The device bans fixed token sets by itself (logit bias: single-token bad words, ``allowed_token_ids``,
stop tokens before ``min_tokens``). What depends on the tokens already generated goes through the
step's host mask (``engine.structured``), filled after the previous token is known:

- the grammar of ``structured_outputs`` (an xgrammar matcher, ``RequestGrammar``), and where the
  output starts with reasoning (``reasoning_start``/``reasoning_end``), the gate in front of it: free
  text until the reasoning ends, the grammar from the next token on;
- bad words of several tokens: a word's last token is banned where the output ends with the rest;
- while a grammar constrains a row, the fixed sets again (the mask must leave a token the device
  will not ban): a row left with no token ends its request with an error naming the conflict.

``advance`` is fed the known output tokens (never placeholders) it has not seen, in order; the
state is always that of exactly those tokens, whatever happened meanwhile (preemption recomputes
from the tokens; a token computed after the request ended never arrives).

A request's rules are described by a ``RulesSpec`` (plain data: what a grammar worker process
receives) and built from it with its grammar's matcher (``TokenRules.from_spec``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import numpy as np

from tandem.engine.structured.matcher import RequestGrammar
from tandem.sampling_params import SamplingParams

FREE, OPENING, REASONING, CONSTRAINED = "free", "opening", "reasoning", "constrained"


@dataclass
class FixedBans:
    """What the device bans anyway (logit bias, min_tokens)."""

    allowed: np.ndarray | None  # int32 mask words of allowed_token_ids minus the single bad words
    banned: list[int]  # single-token bad words (when no allowed_token_ids)
    stops: list[int]  # banned before min_tokens: stop_token_ids, and EOS unless ignore_eos
    min_tokens: int

    @property
    def plain(self) -> bool:
        """None of them can clear a bit of a grammar's mask (min_tokens aside: see ``TokenRules.fill``)."""
        return self.allowed is None and not self.banned and not self.min_tokens


@dataclass
class TokenRules:
    grammar: RequestGrammar | None
    bad_sequences: list[tuple[int, ...]]  # bad words of two or more tokens
    fixed: FixedBans
    reasoning_start: int | None = None  # the token that may open the output's reasoning
    reasoning_end: tuple[int, ...] = ()  # the tokens that close it
    num_accepted: int = 0  # output tokens seen
    state: str = field(init=False)
    #: only a grammar, already constraining, nothing else of the host's: the batched path (``manager``:
    #: one call accepts a step's tokens, one fills its rows); kept as the state changes (read per row)
    plain: bool = field(init=False)
    _output: list[int] = field(init=False, default_factory=list)  # the last tokens, for bad words and the gate
    _matched: int = field(init=False, default=0)  # tokens the grammar's matcher took (``rollback`` counts back)
    _saved: tuple | None = field(init=False, default=None)  # the state before ``speculate``

    def __post_init__(self) -> None:
        if self.grammar is None:
            state = FREE
        elif self.reasoning_end:
            state = OPENING if self.reasoning_start is not None else REASONING
        else:
            state = CONSTRAINED
        self._set_state(state)

    def _set_state(self, state: str) -> None:
        self.state = state
        self.plain = state == CONSTRAINED and not self.bad_sequences and self.fixed.plain

    @property
    def terminated(self) -> bool:
        """The grammar accepted a stop token: the output is complete."""
        return self.state == CONSTRAINED and self.grammar.terminated

    @classmethod
    def from_spec(cls, spec: RulesSpec, grammar: RequestGrammar | None) -> TokenRules:
        allowed = None if spec.allowed is None else np.frombuffer(spec.allowed, np.int32).copy()
        fixed = FixedBans(allowed, list(spec.banned), list(spec.stops), spec.min_tokens)
        return cls(grammar, [tuple(s) for s in spec.bad_sequences], fixed, spec.reasoning_start,
                   tuple(spec.reasoning_end))

    def advance(self, tokens: list[int]) -> int | None:
        """Feed these new tokens (the next ones of the output); returns the first one the grammar
        rejects (it stops there), or None."""
        for token in tokens:
            if not self._take(token):
                return token
        keep = max([len(s) for s in self.bad_sequences] + [len(self.reasoning_end), 1])
        del self._output[:-keep]
        return None

    def speculate(self, tokens: list[int]) -> bool:
        """Feed proposed tokens until ``rollback``: the state in which a speculating step's later rows
        are masked (each after the proposals before it). False if one is rejected, or follows a
        completed grammar (the rows after it are never accepted: that proposal cannot be drawn)."""
        if self._saved is None:
            self._saved = (self.state, self.num_accepted, list(self._output), self._matched)
        for token in tokens:
            if self.terminated or not self._take(token):
                return False
        return True

    @property
    def known(self) -> int:
        """Output tokens seen, proposals fed by ``speculate`` aside."""
        return self.num_accepted if self._saved is None else self._saved[1]

    def rollback(self) -> None:
        """Back to the state before ``speculate``."""
        if self._saved is None:
            return
        state, self.num_accepted, self._output, matched = self._saved
        self._saved = None
        if self._matched > matched:
            self.grammar.matcher.rollback(self._matched - matched)
        self._matched = matched
        self._set_state(state)

    def _take(self, token: int) -> bool:
        if self.state == OPENING:
            self._set_state(REASONING if token == self.reasoning_start else CONSTRAINED)
        elif self.state == REASONING:
            self._output.append(token)
            if self._ends_with(self.reasoning_end):
                self._set_state(CONSTRAINED)
            self.num_accepted += 1
            return True
        if self.state == CONSTRAINED:
            if not self.grammar.matcher.accept_token(token):
                return False
            self._matched += 1
        self._output.append(token)
        self.num_accepted += 1
        return True

    def fill(self, mask: np.ndarray, row: int, gen_index: int) -> bool:
        """mask[row] = the tokens allowed next; False if the rules together leave none."""
        if self.state == CONSTRAINED or self.state == OPENING:
            self.grammar.fill(mask, row)
            if self.state == OPENING:
                _set(mask[row], self.reasoning_start)
        else:
            mask[row] = -1
        self._apply_fixed(mask[row], gen_index)  # the device bans these too: here to see if any token is left
        for seq in self.bad_sequences:
            if self._ends_with(seq[:-1]):
                _clear(mask[row], seq[-1])
        return bool(mask[row].any())

    def _apply_fixed(self, words: np.ndarray, gen_index: int) -> None:
        fixed = self.fixed
        if fixed.allowed is not None:
            words &= fixed.allowed
        for token in fixed.banned:
            _clear(words, token)
        if gen_index < fixed.min_tokens:
            for token in fixed.stops:
                _clear(words, token)

    def _ends_with(self, tokens: tuple[int, ...]) -> bool:
        n = len(tokens)
        return n <= len(self._output) and tuple(self._output[len(self._output) - n:]) == tuple(tokens)


class RulesSpec(msgspec.Struct, array_like=True):
    """A request's rules as plain data (``TokenRules.from_spec`` adds the grammar's matcher)."""

    bad_sequences: list[list[int]]  # bad words of two or more tokens
    allowed: bytes | None  # int32 mask words of allowed_token_ids minus the single bad words
    banned: list[int]  # single-token bad words (when no allowed_token_ids)
    stops: list[int]  # banned before min_tokens
    min_tokens: int
    reasoning_start: int | None
    reasoning_end: list[int]


def rules_spec(params: SamplingParams, num_words: int, eos_token_ids: frozenset[int]) -> RulesSpec:
    seqs = params.bad_words_token_ids or []
    singles = sorted({s[0] for s in seqs if len(s) == 1})
    allowed = None
    if params.allowed_token_ids is not None:
        allowed = token_words(sorted(set(params.allowed_token_ids) - set(singles)), num_words).tobytes()
    stops = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids)))
    spec = params.structured_outputs
    start, end = (None, ()) if spec is None or spec.reasoning_ids is None else spec.reasoning_ids
    return RulesSpec([list(s) for s in seqs if len(s) > 1], allowed, [] if allowed is not None else singles, stops,
                     params.min_tokens, start, list(end))


def rules_for(params: SamplingParams, grammar: RequestGrammar | None, num_words: int,
              eos_token_ids: frozenset[int]) -> TokenRules:
    """A request's rules (its grammar, if any, already compiled and matched)."""
    return TokenRules.from_spec(rules_spec(params, num_words, eos_token_ids), grammar)


def token_words(tokens: list[int], num_words: int) -> np.ndarray:
    """An int32 mask with exactly these tokens allowed."""
    words = np.zeros(num_words, np.uint32)
    for token in tokens:
        words[token >> 5] |= np.uint32(1 << (token & 31))
    return words.view(np.int32)


def _set(words: np.ndarray, token: int) -> None:
    words.view(np.uint32)[token >> 5] |= np.uint32(1 << (token & 31))


def _clear(words: np.ndarray, token: int) -> None:
    words.view(np.uint32)[token >> 5] &= ~np.uint32(1 << (token & 31))
