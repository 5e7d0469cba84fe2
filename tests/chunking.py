"""Random ways to cut a text into the deltas a stream would deliver (the parsers' tests)."""
from __future__ import annotations

import random


def chunkings(text: str, count: int, seed: int = 0) -> list[list[str]]:
    """``count`` random cuts of ``text`` (pieces of 0 to 12 characters, empty ones included, and one
    character at a time as the first), each adding up to ``text``."""
    rng = random.Random(seed)
    cuts = [list(text)]
    for _ in range(count - 1):
        pieces, i = [], 0
        while i < len(text):
            n = rng.choice([0, 1, 1, 2, 3, 5, 8, 12])
            pieces.append(text[i:i + n])
            i += n
        cuts.append(pieces)
    return cuts
