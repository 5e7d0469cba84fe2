import torch

from tandem.kernels.sampling import uniform_noise
from tandem.worker.sampler import SamplingTensors, sample, top_k_top_p_cutoff


def _tensors(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, gen_index=None, sort=False):
    seeds = torch.arange(n, dtype=torch.int64) * 7919 + 11 if seeds is None else seeds
    gen_index = torch.zeros(n, dtype=torch.int64) if gen_index is None else gen_index
    full = lambda v, dt: torch.full((n,), v, dtype=dt)  # noqa: E731
    return SamplingTensors(full(temperature, torch.float32), full(top_k, torch.int64), full(top_p, torch.float32),
                           full(min_p, torch.float32), seeds, gen_index, temperature > 0, sort)


def test_noise_is_uniform_and_depends_on_every_input():
    seeds = torch.randint(0, 2**62, (64,))
    u = uniform_noise(seeds, torch.randint(0, 1000, (64,)), 4096)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    same = uniform_noise(seeds[:1], torch.tensor([3]), 16)
    assert torch.equal(same, uniform_noise(seeds[:1], torch.tensor([3]), 16))
    assert not torch.equal(same, uniform_noise(seeds[:1], torch.tensor([4]), 16))
    assert not torch.equal(same, uniform_noise(seeds[:1] + 1, torch.tensor([3]), 16))


def test_greedy_rows_take_argmax():
    logits = torch.randn(8, 100)
    out = sample(logits, _tensors(8, temperature=0.0))
    assert torch.equal(out, logits.argmax(-1))


def test_sampling_follows_the_softmax_distribution():
    logits = torch.randn(1, 6) * 1.5
    n = 20000
    t = _tensors(n, temperature=0.7, seeds=torch.randint(0, 2**62, (n,)))
    counts = torch.bincount(sample(logits.expand(n, -1), t), minlength=6).float() / n
    expected = torch.softmax(logits[0] / 0.7, -1)
    assert (counts - expected).abs().max() < 0.015


def test_top_k_top_p_min_p_restrict_support():
    logits = torch.randn(1, 50)
    order = logits[0].argsort(descending=True)
    n = 4000
    seeds = torch.randint(0, 2**62, (n,))
    topk = sample(logits.expand(n, -1), _tensors(n, top_k=3, seeds=seeds, sort=True))
    assert set(topk.tolist()) == set(order[:3].tolist())
    probs = torch.softmax(logits[0], -1)
    nucleus = int((probs[order].cumsum(0) < 0.6).sum()) + 1
    topp = sample(logits.expand(n, -1), _tensors(n, top_p=0.6, seeds=seeds, sort=True))
    assert set(topp.tolist()) == set(order[:nucleus].tolist())
    minp = sample(logits.expand(n, -1), _tensors(n, min_p=0.3, seeds=seeds))
    assert set(minp.tolist()) <= set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())


def test_a_row_does_not_depend_on_its_batch():
    logits = torch.randn(5, 300)
    t = _tensors(5, temperature=1.3, top_k=40, top_p=0.9, seeds=torch.randint(0, 2**62, (5,)),
                 gen_index=torch.randint(0, 100, (5,)), sort=True)
    full = sample(logits, t)
    for i in range(5):
        one = SamplingTensors(*(getattr(t, f)[i:i + 1] for f in ("temperature", "top_k", "top_p", "min_p",
                                                                   "seeds", "gen_index")), True, True)
        assert sample(logits[i:i + 1], one).item() == full[i].item()


def test_full_path_matches_reduced_path():
    """The sort path with neutral settings must draw exactly what the cheaper path draws."""
    logits = torch.randn(16, 200)
    seeds = torch.randint(0, 2**62, (16,))
    assert torch.equal(sample(logits, _tensors(16, seeds=seeds)), sample(logits, _tensors(16, seeds=seeds, sort=True)))


def _cutoff_by_definition(row: torch.Tensor, t: float, k: int, p: float) -> float:
    """Walk the sorted row: keep the top k (ties at the k-th included), then the smallest prefix by
    probability at temperature t whose mass reaches p; the cutoff is the last kept value."""
    ranked = sorted(row.tolist(), reverse=True)
    if k > 0:
        kth = ranked[min(k, len(ranked)) - 1]
        ranked = [x for x in ranked if x >= kth]
    if k <= 0 and p >= 1.0:
        return float("-inf")
    probs = torch.tensor(ranked, dtype=torch.float64).div(t).softmax(0).tolist()
    mass, last = 0.0, ranked[0]
    for x, q in zip(ranked, probs):
        if mass >= p and p < 1.0:
            break
        mass, last = mass + q, x
    return last


def test_cutoff_matches_its_definition_with_ties():
    gen = torch.Generator().manual_seed(5)
    rows = (torch.randn(40, 300, generator=gen, dtype=torch.float64) * 2).round(decimals=1)  # many ties
    temperature = torch.rand(40, generator=gen, dtype=torch.float64) + 0.3
    top_k = torch.randint(-1, 40, (40,), generator=gen)
    top_p = torch.rand(40, generator=gen, dtype=torch.float64).clamp(min=0.05)
    top_p[::4] = 1.0
    got = top_k_top_p_cutoff(rows, temperature, top_k, top_p)
    for i in range(40):
        want = _cutoff_by_definition(rows[i], temperature[i].item(), top_k[i].item(), top_p[i].item())
        assert got[i].item() == want, (i, top_k[i].item(), top_p[i].item())
