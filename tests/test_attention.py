import random

import torch
import torch.nn.functional as F

from tandem.model.attention import AttentionInputs, step_attention
from tandem.model.attention.base import AttentionSpec
from tandem.model.layers.kv import store_kv


def _reference(q, k, v, q_pos, window):
    """Dense causal attention for one sequence: q [n, Hq, D] at positions q_pos; k, v [L, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    kp = torch.arange(k.shape[0])
    mask = kp[None, :] <= q_pos[:, None]
    if window:
        mask &= q_pos[:, None] - kp[None, :] < window
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1).reshape(q.shape[0], -1)


def _check(seq_specs, hq=6, hkv=2, d=16, bs=4, window=None, seed=0):
    """seq_specs: list of (context_before, new_tokens)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = 1 + sum(-(-(c + n) // bs) for c, n in seq_specs) + 3
    cache = torch.randn(2, num_blocks * bs, hkv, d)  # garbage everywhere it should not read
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    tables, full_kv, q_all, slots, positions, seq_lens, q_lens = [], [], [], [], [], [], []
    for ctx, n in seq_specs:
        total = ctx + n
        blocks = [free.pop() for _ in range(-(-total // bs))]
        tables.append(blocks)
        k, v = torch.randn(total, hkv, d), torch.randn(total, hkv, d)
        full_kv.append((k, v))
        for i in range(ctx):  # earlier context already in the cache
            cache[0, blocks[i // bs] * bs + i % bs] = k[i]
            cache[1, blocks[i // bs] * bs + i % bs] = v[i]
        q_all.append(torch.randn(n, hq, d))
        slots += [blocks[i // bs] * bs + i % bs for i in range(ctx, total)]
        positions += list(range(ctx, total))
        seq_lens.append(total)
        q_lens.append(n)
    width = max(len(t) for t in tables)
    inputs = AttentionInputs(torch.tensor(slots), torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                             torch.tensor([0] + q_lens).cumsum(0), torch.tensor(seq_lens), torch.tensor(positions),
                             max(q_lens), bs)
    new_k = torch.cat([k[c:] for (k, _), (c, _) in zip(full_kv, seq_specs)])
    new_v = torch.cat([v[c:] for (_, v), (c, _) in zip(full_kv, seq_specs)])
    store_kv(cache, new_k, new_v, inputs.slot_mapping)
    out = step_attention(inputs).attend(torch.cat(q_all), cache, AttentionSpec(d ** -0.5, window))
    refs = [_reference(q, k, v, torch.arange(c, c + n), window)
            for q, (k, v), (c, n) in zip(q_all, full_kv, seq_specs)]
    torch.testing.assert_close(out, torch.cat(refs), rtol=1e-5, atol=1e-5)


def test_mixed_prefill_chunks_and_decodes():
    _check([(0, 7), (5, 1), (9, 4), (0, 1), (13, 1)])


def test_decode_only_gqa_group_of_four():
    _check([(11, 1), (2, 1), (30, 1)], hq=8, hkv=2, d=24, bs=8, seed=1)


def test_sliding_window():
    _check([(10, 6), (20, 1)], window=5, seed=2)
