"""Host-side handling of a sampled token: append, detokenize incrementally, check stop conditions."""
from __future__ import annotations

from tandem.engine.sequence import Sequence
from tandem.outputs import CompletionOutput, RequestOutput


def _check_stop_strings(seq: Sequence, new_text: str) -> bool:
    """Truncate ``seq.text`` at the first stop string that the new text completes."""
    stops = seq.params.stop_strings
    longest = max(len(s) for s in stops)
    search_from = max(0, len(seq.text) - len(new_text) - longest + 1)
    hits = [(i, s) for s in stops if (i := seq.text.find(s, search_from)) >= 0]
    if not hits:
        return False
    index, stop = min(hits)
    seq.text = seq.text[:index + len(stop) if seq.params.include_stop_str_in_output else index]
    return True


def append_token(seq: Sequence, token: int, eos_token_ids: frozenset[int]) -> str | None:
    """Add a sampled token; return the finish reason if the sequence is now done."""
    seq.output_token_ids.append(token)
    p = seq.params
    if seq.detokenizer is not None:
        new_text = seq.detokenizer.add([token])
        seq.text += new_text
        if new_text and p.stop_strings and _check_stop_strings(seq, new_text):
            return "stop"
    if token in p.stop_token_ids or (not p.ignore_eos and token in eos_token_ids):
        return "stop"
    if len(seq.output_token_ids) >= seq.max_new_tokens:
        return "length"
    return None


def request_output(seq: Sequence) -> RequestOutput:
    completion = CompletionOutput(0, seq.text, list(seq.output_token_ids), seq.finish_reason)
    return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], seq.finished, seq.error)
