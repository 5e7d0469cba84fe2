"""What happens to a step's logits between the model and the sampler: penalties and logit bias.

Penalties read each row's tokens from the device's token history (``ModelRunner.history``: every
token of every running sequence by position, written from the step's own resolved inputs, so a
token sampled on the device counts in the next step without coming back to the host):
- repetition (transformers' definition): over prompt and output tokens, a positive logit is
  divided by the penalty, a negative one multiplied;
- presence and frequency (OpenAI's): over output tokens, ``logit -= presence * (count > 0) +
  frequency * count``.
Logit bias entries (the request's ``logit_bias``, and -inf for the stop tokens a request may not
sample before ``min_tokens``) are added last. Rows are processed a few at a time so the count
tensors stay small whatever the batch."""
from __future__ import annotations

import torch

_ROWS_PER_CHUNK_ELEMENTS = 1 << 22


def apply_penalties(logits: torch.Tensor, history: torch.Tensor, rows: torch.Tensor, prompt_lens: torch.Tensor,
                    gen_index: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor, span: int) -> None:
    """In place on float logits [S, V]. ``span`` (host value) bounds prompt + output lengths."""
    n_rows, vocab = logits.shape
    chunk = max(1, _ROWS_PER_CHUNK_ELEMENTS // vocab)
    for start in range(0, n_rows, chunk):
        part = slice(start, start + chunk)
        tokens = history[rows[part], :span].long()
        known = torch.arange(span, device=logits.device)[None, :] < (prompt_lens[part] + gen_index[part])[:, None]
        output = known & (torch.arange(span, device=logits.device)[None, :] >= prompt_lens[part][:, None])
        _penalise(logits[part], tokens, known, output, presence[part], frequency[part], repetition[part])


def _penalise(logits: torch.Tensor, tokens: torch.Tensor, known: torch.Tensor, output: torch.Tensor,
              presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> None:
    seen = torch.zeros_like(logits).scatter_add_(1, tokens, known.to(logits.dtype)) > 0
    counts = torch.zeros_like(logits).scatter_add_(1, tokens, output.to(logits.dtype))
    rp = repetition.to(logits.dtype)[:, None]
    logits.copy_(torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits))
    logits.sub_(presence.to(logits.dtype)[:, None] * (counts > 0) + frequency.to(logits.dtype)[:, None] * counts)


def apply_logit_bias(logits: torch.Tensor, samples: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor) -> None:
    """In place: logits[samples[i], tokens[i]] += values[i] (-inf bans)."""
    logits.index_put_((samples, tokens), values.to(logits.dtype), accumulate=True)


def record_history(history: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, query_start: torch.Tensor,
                   seq_rows: torch.Tensor) -> None:
    """history[row of each token's sequence, its position] = its (resolved) id. Tokens past the last
    sequence (a step padded to a graph's token count) go to the last row, which no sequence owns."""
    n_tokens, n_seqs = ids.shape[0], seq_rows.shape[0]
    flat = torch.arange(n_tokens, device=ids.device)
    token_seq = torch.searchsorted(query_start[1:], flat, right=True)
    rows = torch.where(token_seq < n_seqs, seq_rows[token_seq.clamp(max=n_seqs - 1)], history.shape[0] - 1)
    history[rows, positions] = ids.to(history.dtype)
