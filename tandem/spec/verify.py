"""Verification rules on the device, in torch.

The engine's proposers are deterministic (n-gram lookup, a greedy draft): q is one-hot, and rejection
sampling's rule (accept x with probability min(1, p(x) / q(x)) = p(x), else draw from
norm(max(0, p - q)), p without x) is realised exactly by drawing y from p with the sampler's seeded
noise and accepting x when y == x: P(out = x) = p(x), P(out = y) = p(y) for y != x. The draw is the
one the non-speculative run makes at that output index, so the tokens are the same, greedy or
seeded (``accept_by_match``; the host applies the same rule to the returned tokens,
``engine.spec_path.accepted_count``).

``rejection_sample`` is the general rule for a proposer whose proposals are sampled from a
distribution q that is not one-hot (an EAGLE-style head sampling its drafts; not built): the same
output distribution p, tested by a chi-square test, but not the same tokens as the non-speculative
run (the coupling is different)."""
from __future__ import annotations

import torch


def accept_by_match(drawn: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
    """drawn [R, k + 1] (the target's draw at each position), proposals [R, k] -> [R] accepted
    counts (0..k): the leading proposals equal to the draws. The tokens a row gains are
    ``drawn[r, :count + 1]``."""
    match = (drawn[:, :-1] == proposals).to(torch.int64)
    return match.cumprod(dim=1).sum(dim=1)


def rejection_sample(p: torch.Tensor, q: torch.Tensor, proposals: torch.Tensor, uniform: torch.Tensor,
                     resample_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al., Chen et al.) for one row's k proposals.

    p: [k + 1, V] the target's probabilities at each position (the last: after every proposal);
    q: [k, V] the proposer's; proposals: [k] drawn from q; uniform: [k] in [0, 1); resample_noise:
    [k + 1, V] Exp(1) draws for the exponential race that samples a distribution.
    Returns (tokens [k + 1], count): the row gains ``tokens[:count + 1]``, the accepted proposals
    and one token drawn from norm(max(0, p - q)) at the first rejection (from p after all k)."""
    k = proposals.shape[0]
    idx = torch.arange(k, device=p.device)
    p_x, q_x = p[idx, proposals], q[idx, proposals]
    accept = uniform * q_x < p_x  # u < p / q without dividing by a zero q
    count = int(accept.to(torch.int64).cumprod(0).sum()) if k else 0
    if count < k:
        residual = (p[count] - q[count]).clamp(min=0)
        residual = residual / residual.sum() if residual.sum() > 0 else p[count]
    else:
        residual = p[k]
    # exponential race: argmax residual / E is a draw from residual
    extra = torch.argmax(residual / resample_noise[count])
    tokens = torch.cat([proposals[:count], extra.view(1), proposals.new_zeros(k - count)])
    return tokens, torch.tensor(count)
