"""Piecewise CUDA graphs for prefill and mixed steps of up to a few hundred tokens.

Such steps cannot replay one whole-step graph: the attention kernel's grid depends on how the
tokens split into sequences. Everything between two attentions can, though: for a token count
(the step padded to a bucket), segment 0 is the embedding and layer 0 up to its attention,
segment i the rest of layer i-1 and layer i up to its attention, and the last segment the rest of
the last layer and the final norm. Attention runs eagerly between segments on static buffers;
the logits and the sampler run eagerly after. One replay replaces the dozen launches of a segment,
which matters where the host's launches, not the GPU, set a small model's step time.

Static inputs are the step's first three token fields (ids, positions, KV slots: the step contract
packs them first, so their offsets depend only on the token count); q, the attention output, the
residual and the final hidden state live in static buffers each segment reads and writes. Only a
model that offers its forward in those pieces (``LayeredCausalLM``) is captured this way."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tandem.contract.step import StepInputs
from tandem.model.attention import select_backend, step_attention
from tandem.model.base import CausalLM, LayeredCausalLM
from tandem.switches import switch
from tandem.worker.model_runner import Forwarded, ModelRunner, StepTensors

logger = logging.getLogger(__name__)

TOKEN_BUCKETS = (16, 32, 64, 128, 256, 384, 512)
# past 512 tokens, each about 1.4x the one before (a step pads at most that much)
LARGE_BUCKETS = (768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def token_buckets() -> tuple[int, ...]:
    """The token counts captured: up to ``TANDEM_PIECEWISE_MAX_TOKENS`` (default 512; 1024, 2048,
    4096 or 8192 add the larger buckets up to it). Mixed steps of thousands of tokens otherwise run
    eagerly, and on the H100 a 1B model's eager 8K-token step took 11-13 ms of launches
    (benchmarks/RESULTS.md); off until measured end to end."""
    top = int(switch("TANDEM_PIECEWISE_MAX_TOKENS"))
    return TOKEN_BUCKETS + tuple(t for t in LARGE_BUCKETS if t <= top)


@dataclass
class _Bucket:
    tokens: int
    data: torch.Tensor  # [3 * tokens] int64: input ids, positions, KV slots
    q: torch.Tensor  # [T, Hq, D]
    attn_out: torch.Tensor  # [T, Hq * D]
    residual: torch.Tensor  # [T, H]
    hidden: torch.Tensor  # [T, H] the final norm's output
    ids: torch.Tensor  # [T] the input ids with pending tokens resolved (the sampling stage records them)
    graphs: list[torch.cuda.CUDAGraph]  # one per segment; empty: segments run eagerly (CPU tests)


class PiecewiseGraphs:
    def __init__(self, runner: ModelRunner, max_tokens: int, pool) -> None:
        self.runner = runner
        self.model = runner.model
        self.specs = self.model.kv_spec.layers
        self.pool = pool
        self.buckets: dict[int, _Bucket] = {}
        self.sizes = tuple(t for t in token_buckets() if t <= max_tokens)

    @staticmethod
    def applies(model: CausalLM, device: torch.device) -> bool:
        """Only for a model split at its attentions, where prefill steps take the Triton varlen kernel
        (which reads padded token batches)."""
        return isinstance(model, LayeredCausalLM) and select_backend(2, device).name == "triton-varlen"

    @property
    def num_segments(self) -> int:
        return len(self.specs) + 1

    def capture(self, stream: torch.cuda.Stream) -> None:
        t0 = time.perf_counter()
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))  # inputs written on the default stream
        with torch.cuda.stream(stream):
            for tokens in reversed(self.sizes):
                b = self.buckets[tokens] = self._new_bucket(tokens)
                for i in range(self.num_segments):
                    self._segment(b, i)  # warm-up: kernels compile outside the capture
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                        self._segment(b, i)
                    b.graphs.append(graph)
        stream.synchronize()
        logger.info("captured piecewise graphs for %s tokens (%d segments each) in %.1f s", list(self.sizes),
                    self.num_segments, time.perf_counter() - t0)

    def prepare_eager(self) -> None:
        """Buckets whose segments run eagerly: the same code path without capture (for tests)."""
        self.buckets = {tokens: self._new_bucket(tokens) for tokens in self.sizes}

    def _new_bucket(self, tokens: int) -> _Bucket:
        cfg, dev, dtype = self.model.config, self.runner.device, self.model.dtype
        return _Bucket(tokens, torch.zeros(3 * tokens, dtype=torch.int64, device=dev),
                       torch.zeros(tokens, cfg.num_heads, cfg.head_dim, dtype=dtype, device=dev),
                       torch.zeros(tokens, cfg.q_size, dtype=dtype, device=dev),
                       torch.zeros(tokens, cfg.hidden_size, dtype=dtype, device=dev),
                       torch.zeros(tokens, cfg.hidden_size, dtype=dtype, device=dev),
                       torch.zeros(tokens, dtype=torch.int64, device=dev), [])

    def _segment(self, b: _Bucket, i: int) -> None:
        """Everything between attention i-1 and attention i, on the bucket's static buffers."""
        m, n = self.model, b.tokens
        ids, positions, slots = b.data[:n], b.data[n:2 * n], b.data[2 * n:]
        if i == 0:
            b.ids.copy_(self.runner.resolve_pending(ids))
            hidden, residual = m.embed(b.ids), None
        else:
            hidden, residual = m.after_attention(i - 1, b.attn_out, b.residual)
        if i == len(self.specs):
            b.hidden.copy_(m.final_norm(hidden, residual))
            return
        q, residual = m.before_attention(i, hidden, residual, positions, self.runner.kv_cache[i], slots)
        b.q.copy_(q)
        b.residual.copy_(residual)

    def lookup(self, step: StepInputs) -> _Bucket | None:
        return None if step.shape.is_decode else self.buckets.get(step.shape.num_tokens)

    def run(self, b: _Bucket, data: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """On the current (compute) stream: one step through the bucket's graphs -> sampled ids."""
        return self.runner.finish_forwarded(self.forward(b, data, step), step.shape, step.sampler)

    def forward(self, b: _Bucket, data: torch.Tensor, step: StepInputs) -> Forwarded:
        """The step up to its sampling stage (the bucket's buffers hold its hidden states until the
        bucket's next step, which the compute stream runs after this one's sampling)."""
        runner, shape = self.runner, step.shape
        f = StepTensors(data, shape)
        b.data.copy_(data[:3 * b.tokens])
        attn = step_attention(runner.attention_inputs(f, shape))
        for i in range(self.num_segments):
            if b.graphs:
                b.graphs[i].replay()
            else:
                self._segment(b, i)
            if i < self.num_segments - 1:
                b.attn_out.copy_(attn.attend(b.q, runner.kv_cache[i], self.specs[i]))
        return Forwarded(b.hidden, b.ids, f)
