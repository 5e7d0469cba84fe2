"""Stop strings found in time linear in the text: an Aho-Corasick automaton over a request's stop
strings, fed only the characters each step adds.

A text is scanned once, whatever the number and length of its stop strings: per character, one
transition (amortized: failure links are followed at most as often as characters were read). The
state reached is the longest end of the text that is the beginning of some stop string, which is
what a stream must hold back while the request runs (later text could complete a stop string, and
the cut would remove it).

One automaton serves every text with the same stop strings (the ``n`` choices of a request, or
concurrent requests with the same list) for as long as one of them runs; see ``automaton_for``.

The caps (``check_stop_strings``) bound what one request can make the API process build and hold:
at most ``max_stop_strings`` strings of at most ``max_stop_string_length`` characters each."""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopHit:
    """A stop string found in a text: it starts at ``start`` and has ``length`` characters."""
    start: int
    length: int


class StopAutomaton:
    """The trie of a set of stop strings with failure links. Node 0 is the root (the empty string);
    a node stands for the prefix of a stop string that leads to it."""

    def __init__(self, stops: Sequence[str]) -> None:
        if not stops or not all(stops):
            raise ValueError("stop strings must be a non-empty list of non-empty strings")
        self.children: list[dict[str, int]] = [{}]
        self.depth = [0]
        ends: set[int] = set()
        for stop in stops:
            ends.add(self._insert(stop))
        self.fail = [0] * len(self.depth)
        # the longest stop string ending at each node (itself or a suffix of it); 0 for none
        self.match = [0] * len(self.depth)
        self._link(ends)

    def _insert(self, stop: str) -> int:
        node = 0
        for char in stop:
            child = self.children[node].get(char)
            if child is None:
                child = len(self.depth)
                self.children[node][char] = child
                self.children.append({})
                self.depth.append(self.depth[node] + 1)
            node = child
        return node

    def _link(self, ends: set[int]) -> None:
        """Breadth first, so a node's failure target (shorter) is complete before the node; the
        root's children fail to the root."""
        queue = list(self.children[0].values())
        for node in queue:
            self.match[node] = self.depth[node] if node in ends else self.match[self.fail[node]]
            for char, child in self.children[node].items():
                self.fail[child] = self.next(self.fail[node], char)
                queue.append(child)

    def next(self, state: int, char: str) -> int:
        """The state after reading ``char``: the longest stop-string prefix ending there."""
        children, fail = self.children, self.fail
        while True:
            target = children[state].get(char)
            if target is not None:
                return target
            if state == 0:
                return 0
            state = fail[state]


class StopScanner:
    """One text's progress through an automaton. ``feed`` the text's new characters as they come;
    the first hit ends the text's use (the request stops there)."""

    def __init__(self, automaton: StopAutomaton) -> None:
        self.automaton = automaton
        self.state = 0
        self.length = 0  # characters fed so far

    @property
    def pending(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string (before any
        hit, never a whole one): what a stream holds back."""
        return self.automaton.depth[self.state]

    def feed(self, chunk: str) -> StopHit | None:
        """Read ``chunk``; the leftmost stop string that its characters complete, if any (of those
        that start at the same place, the shortest: it ends first)."""
        step, match = self.automaton.next, self.automaton.match
        state, best = self.state, None
        for end, char in enumerate(chunk, self.length + 1):
            state = step(state, char)
            found = match[state]
            # the longest stop string ending here starts leftmost of those ending here
            if found and (best is None or end - found < best.start):
                best = StopHit(end - found, found)
        self.state, self.length = state, self.length + len(chunk)
        return best


_live: weakref.WeakValueDictionary[tuple[str, ...], StopAutomaton] = weakref.WeakValueDictionary()


def automaton_for(stops: Sequence[str]) -> StopAutomaton:
    """The automaton of these stop strings, built once and shared while any text uses it."""
    key = tuple(stops)
    automaton = _live.get(key)
    if automaton is None:
        automaton = _live[key] = StopAutomaton(key)
    return automaton


def check_stop_strings(stops: Sequence[str], max_count: int, max_length: int) -> None:
    """Refuse more than ``max_count`` stop strings, or one longer than ``max_length`` characters,
    with a ``ValueError`` naming ``SamplingParams.stop`` (the server's 400 names the field)."""
    if len(stops) > max_count:
        raise ValueError(f"SamplingParams.stop has {len(stops)} strings; at most {max_count} are allowed "
                         "(engine option max_stop_strings)")
    longest = max(map(len, stops), default=0)
    if longest > max_length:
        raise ValueError(f"SamplingParams.stop has a string of {longest} characters; at most {max_length} "
                         "are allowed (engine option max_stop_string_length)")
