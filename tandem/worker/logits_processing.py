"""What happens to a step's logits between the model and the sampler: penalties and logit bias.

Penalties read each row's tokens from the device's token history (``ModelRunner.history``: every
token of every running sequence by position, written from the step's own resolved inputs, so a
token sampled on the device counts in the next step without coming back to the host):
- repetition (transformers' definition): over prompt and output tokens, a positive logit is
  divided by the penalty, a negative one multiplied;
- presence and frequency (OpenAI's): over output tokens, ``logit -= presence * (count > 0) +
  frequency * count``.
Logit bias entries (the request's ``logit_bias``, -inf for its bad words and for the stop tokens it
may not sample before ``min_tokens``, +inf marks for its ``allowed_token_ids``) are applied last.

Penalties touch only the tokens in a row's history, so they work on [rows, span] tensors, never
[rows, vocab] ones, in a constant number of ops whatever the batch (each eager op costs the host
microseconds on a GPU): key each known position as ``2 * token + is_output``, sort each row's keys
so equal tokens form runs (prompt positions first), count a run's output positions as the distance
between the first keys >= 2 * token + 1 and >= 2 * token + 2, gather those logits, penalise them
from their original values and scatter them back. A token repeated in the history is written once
per occurrence, always with the same value, so the result does not depend on the scatter's order.
On CUDA two Triton kernels around the sort do the same (``tandem.kernels.penalties``)."""
from __future__ import annotations

import torch

from tandem.worker.sampler import use_kernels

# history tokens (rows x span) one pass handles: bounds the int64 [rows, span] temporaries to a few
# tens of MB; larger steps (very long penalised contexts at large batches) take several passes
_PENALTY_ELEMENTS = 1 << 21


def apply_penalties(logits: torch.Tensor, history: torch.Tensor, rows: torch.Tensor, prompt_lens: torch.Tensor,
                    gen_index: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor, span: int) -> None:
    """In place on float logits [S, V]. ``span`` (host value) bounds prompt + output lengths."""
    one_pass = _fused_pass if use_kernels(logits) else _torch_pass
    n_rows = logits.shape[0]
    per_pass = max(1, _PENALTY_ELEMENTS // max(1, span))
    if n_rows <= per_pass:
        one_pass(logits, history, rows, prompt_lens, gen_index, presence, frequency, repetition, span)
        return
    for start in range(0, n_rows, per_pass):
        part = slice(start, start + per_pass)
        one_pass(logits[part], history, rows[part], prompt_lens[part], gen_index[part], presence[part],
                 frequency[part], repetition[part], span)


def _fused_pass(logits: torch.Tensor, history: torch.Tensor, rows: torch.Tensor, prompt_lens: torch.Tensor,
                gen_index: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor,
                span: int) -> None:
    from tandem.kernels.penalties import fused_penalties

    fused_penalties(logits, history, rows, prompt_lens, gen_index, presence, frequency, repetition, span)


def _torch_pass(logits: torch.Tensor, history: torch.Tensor, rows: torch.Tensor, prompt_lens: torch.Tensor,
                gen_index: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor,
                span: int) -> None:
    n_known = prompt_lens + gen_index
    tokens, counts = _output_counts(history[rows, :span], prompt_lens, n_known)
    dtype = logits.dtype
    original = logits.gather(1, tokens)
    rp = repetition.to(dtype)[:, None]
    # every run holds a known token unless the row knows none (a graph's padding rows)
    seen = (n_known > 0)[:, None]
    value = torch.where(seen, torch.where(original > 0, original / rp, original * rp), original)
    c = counts.to(dtype)
    # the same expression as over a [rows, vocab] count tensor, so the same rounding
    value = value - (presence.to(dtype)[:, None] * (c > 0) + frequency.to(dtype)[:, None] * c)
    logits.scatter_(1, tokens, value)


def _output_counts(history: torch.Tensor, prompt_lens: torch.Tensor,
                   n_known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """history [R, L] -> each row's known tokens sorted ([R, L] int64), and for each one how often
    its token occurs among the row's output positions."""
    pos = torch.arange(history.shape[1], device=history.device)
    known = pos < n_known[:, None]
    output = known & (pos >= prompt_lens[:, None])
    # positions past what a row knows take its first token as a prompt position: known whenever the
    # row knows anything, so they join that token's run and add nothing to its count
    keys = torch.where(known, 2 * history.long() + output, 2 * history[:, :1].long())
    keys = keys.sort(dim=1).values
    first_output = torch.searchsorted(keys, keys | 1)
    return keys >> 1, torch.searchsorted(keys, (keys | 1) + 1) - first_output


def apply_logit_bias(logits: torch.Tensor, samples: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor,
                     allowed_tokens: bool = False) -> None:
    """In place: logits[samples[i], tokens[i]] += values[i] (-inf bans). With ``allowed_tokens`` (the
    host saw a +inf entry in the step), a +inf entry adds nothing but marks its token allowed, and a
    row with any such mark gets -inf on every token it does not mark (``allowed_token_ids``)."""
    if allowed_tokens:
        allowed = torch.isposinf(values)
        _keep_only_allowed(logits, samples, tokens, allowed)
        values = values.masked_fill(allowed, 0.0)
    logits.index_put_((samples, tokens), values.to(logits.dtype), accumulate=True)


def _keep_only_allowed(logits: torch.Tensor, samples: torch.Tensor, tokens: torch.Tensor,
                       allowed: torch.Tensor) -> None:
    """Without a sync (no boolean selection): entries that mark nothing write to a spare column, and
    every write stores True, so repeated (row, token) pairs need no ordering."""
    n_rows, vocab = logits.shape
    marked = torch.zeros(n_rows, vocab + 1, dtype=torch.bool, device=logits.device)
    marked[samples, torch.where(allowed, tokens, vocab)] = True
    restricted = torch.zeros(n_rows, 2, dtype=torch.bool, device=logits.device)
    restricted[samples, allowed.long()] = True
    logits.masked_fill_(restricted[:, 1:] & ~marked[:, :vocab], float("-inf"))


def record_history(history: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, query_start: torch.Tensor,
                   seq_rows: torch.Tensor) -> None:
    """history[row of each token's sequence, its position] = its (resolved) id. Tokens past the last
    sequence (a step padded to a graph's token count) go to the last row, which no sequence owns."""
    n_tokens, n_seqs = ids.shape[0], seq_rows.shape[0]
    if n_tokens == n_seqs:  # one token per sequence (decode): token i is sequence i's
        history[seq_rows, positions] = ids.to(history.dtype)
        return
    flat = torch.arange(n_tokens, device=ids.device)
    token_seq = torch.searchsorted(query_start[1:], flat, right=True)
    rows = torch.where(token_seq < n_seqs, seq_rows[token_seq.clamp(max=n_seqs - 1)], history.shape[0] - 1)
    history[rows, positions] = ids.to(history.dtype)
