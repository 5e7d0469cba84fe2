"""The sort-based penalties against a straightforward reference: one row at a time, counts from
torch.bincount over the row's known history (prompt + output for repetition, output for presence
and frequency)."""
import pytest
import torch

from tandem.worker import logits_processing
from tandem.worker.logits_processing import apply_penalties


def _reference(logits, history, rows, prompt_lens, gen_index, presence, frequency, repetition):
    out = logits.clone()
    vocab = logits.shape[1]
    for i in range(logits.shape[0]):
        p, n = int(prompt_lens[i]), int(prompt_lens[i] + gen_index[i])
        known = history[rows[i], :n].long()
        seen = torch.bincount(known, minlength=vocab) > 0
        counts = torch.bincount(known[p:], minlength=vocab).to(logits.dtype)
        row, rp = out[i], repetition[i].to(logits.dtype)
        row.copy_(torch.where(seen, torch.where(row > 0, row / rp, row * rp), row))
        row.sub_(presence[i].to(logits.dtype) * (counts > 0) + frequency[i].to(logits.dtype) * counts)
    return out


def _case(seed: int, n_rows: int, vocab: int, width: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    # a small token range so histories repeat tokens; logits of both signs and a few exact zeros
    history = torch.randint(0, min(vocab, 12), (n_rows + 3, width), generator=g, dtype=torch.int32)
    history[::2] = torch.randint(0, vocab, (history[::2].shape), generator=g, dtype=torch.int32)
    logits = (torch.randn(n_rows, vocab, generator=g) * 3).to(dtype)
    logits[:, ::7] = 0.0
    rows = torch.randperm(n_rows + 3, generator=g)[:n_rows]
    prompt_lens = torch.randint(0, width // 2, (n_rows,), generator=g)
    gen_index = torch.randint(0, width // 2, (n_rows,), generator=g)
    prompt_lens[0], gen_index[0] = 0, 0  # a padding row: knows nothing
    gen_index[1] = 0  # prompt only: repetition applies, presence and frequency do not
    presence = (torch.rand(n_rows, generator=g) * 4 - 2)
    frequency = (torch.rand(n_rows, generator=g) * 4 - 2)
    repetition = torch.rand(n_rows, generator=g) * 1.5 + 0.5
    presence[2], frequency[2], repetition[2] = 0.0, 0.0, 1.0  # a row without penalties
    span = int((prompt_lens + gen_index).max())
    return logits, history, rows, prompt_lens, gen_index, presence.float(), frequency.float(), repetition.float(), span


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_penalties_match_the_bincount_reference(dtype, seed):
    logits, history, rows, plen, gen, pres, freq, rep, span = _case(seed, 9, 50 + 37 * seed, 40, dtype)
    want = _reference(logits, history, rows, plen, gen, pres, freq, rep)
    got = logits.clone()
    apply_penalties(got, history, rows, plen, gen, pres, freq, rep, span)
    assert torch.equal(got, want)


def test_penalties_in_passes_match_one_pass(monkeypatch):
    logits, history, rows, plen, gen, pres, freq, rep, span = _case(7, 11, 64, 30, torch.float32)
    one = logits.clone()
    apply_penalties(one, history, rows, plen, gen, pres, freq, rep, span)
    for rows_per_pass in (1, 3, 4):
        monkeypatch.setattr(logits_processing, "_PENALTY_ELEMENTS", rows_per_pass * span)
        passes = logits.clone()
        apply_penalties(passes, history, rows, plen, gen, pres, freq, rep, span)
        assert torch.equal(passes, one)


def test_history_past_the_known_positions_is_ignored():
    logits, history, rows, plen, gen, pres, freq, rep, span = _case(8, 6, 40, 24, torch.float32)
    got = logits.clone()
    apply_penalties(got, history, rows, plen, gen, pres, freq, rep, span)
    scrambled = history.clone()
    for i, r in enumerate(rows.tolist()):
        n = int(plen[i] + gen[i])
        scrambled[r, n:] = torch.randint(0, 40, (history.shape[1] - n,), dtype=torch.int32)
    again = logits.clone()
    apply_penalties(again, scrambled, rows, plen, gen, pres, freq, rep, span)
    assert torch.equal(again, got)


def test_penalised_request_chunked_among_unpenalised_decodes_sees_its_whole_history():
    """The token history is recorded only in steps that may need it: a sampled row is penalised, or
    a sequence samples nothing (a penalised prompt's middle chunks, here beside unpenalised decodes).
    Reference: the prompt prefilled in one step, which also samples, so its history is all there."""
    from tandem import LLM, SamplingParams

    gen = torch.Generator().manual_seed(2)  # a prompt whose repetition penalty changes the second token
    prompt = torch.randint(3, 500, (40,), generator=gen).tolist()
    penalised = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=2.0,
                               presence_penalty=1.5, frequency_penalty=1.5)
    plain = SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True)
    options = dict(dtype="float32", device="cpu", kv_cache_tokens=2048, block_size=4, async_batching=False)
    whole = LLM("random:tiny", max_num_batched_tokens=256, **options)
    want = whole.generate([prompt], penalised, use_tqdm=False)[0].outputs[0].token_ids
    assert want != whole.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                  use_tqdm=False)[0].outputs[0].token_ids  # the penalties change something
    chunked = LLM("random:tiny", max_num_batched_tokens=8, **options)
    outs = chunked.generate([[5, 6], [7, 8], prompt], [plain, plain, penalised], use_tqdm=False)
    assert outs[2].outputs[0].token_ids == want
