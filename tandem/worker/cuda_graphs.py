"""CUDA graphs for decode-shaped steps (one token per sequence, every sequence sampled).

One graph per padded batch size, captured at start-up into one shared memory pool, largest first so
smaller graphs reuse its memory. A graph covers the forward up to the sampled rows' logits
(``ModelRunner.forward_logits``); the sampling stage runs after it eagerly, so what a step asks of
the sampler (top-k/top-p, penalties, logit bias, grammar masks, logprobs) needs no graph of its own. Graph inputs
are one static packed buffer that each step fills with a device-to-device copy on the compute
stream; the placeholder gather (pending tokens from the next-token table) runs inside the graph.
A graph is keyed by everything its kernels read as a shape (batch size; the block-table width is
the graph's own, ``max_model_len`` over the block size) and replayed only for a step of that key
whose block table is no wider: the step ships only the columns it uses, staged into the graph's."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tandem.contract.startup import StartupSteps
from tandem.contract.step import Padding, StepInputs, StepShape
from tandem.worker.model_runner import Forwarded, GraphFields, ModelRunner

logger = logging.getLogger(__name__)

_LIST_WORDS = 1 << 16  # 512 KiB: some 25,000 logit-bias entries


def capture_sizes(max_seqs: int) -> tuple[int, ...]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_seqs] + list(range(16, max_seqs, 16))
    return tuple(sorted(set(sizes + [max_seqs])))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    shape: StepShape
    logits: torch.Tensor  # static outputs
    ids: torch.Tensor
    fields: GraphFields  # views of its static inputs, made once


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_seqs: int, max_blocks: int, padding_row: int) -> None:
        self.runner = runner
        self.max_blocks = max_blocks
        self.padding_row = padding_row
        self.sizes = capture_sizes(max_seqs)
        self.graphs: dict[int, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.static_data = torch.zeros(0, dtype=torch.int64, device=runner.device)

    def capture(self, stream: torch.cuda.Stream, startup: StartupSteps) -> None:
        """Capture one graph per size from the host's capture steps (``startup.graph_decode``)."""
        t0 = time.perf_counter()
        before = torch.cuda.memory_reserved(self.runner.device)
        steps = {b: startup.graph_decode(Padding(b, b, self.max_blocks, self.padding_row), self.runner.block_size)
                 for b in reversed(self.sizes)}
        n_words = max(s.data.size for s in steps.values())
        # room for a step's variable-length lists (logit-bias entries), staged with it
        self.static_data = torch.zeros(n_words + _LIST_WORDS, dtype=torch.int64, device=self.runner.device)
        # one logits buffer for every graph: outputs a graph keeps stay allocated in the pool, and
        # [batch, vocab] per captured size would add up to gigabytes at 1024 sequences
        model = self.runner.model
        self.static_logits = torch.empty(max(self.sizes), model.config.vocab_size, dtype=model.dtype,
                                         device=self.runner.device)
        # the KV cache and weights were written on the default stream: capture only once they are
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            for batch, step in steps.items():
                self.graphs[batch] = self._capture_one(step, stream)
        stream.synchronize()
        logger.info("captured %d decode graphs (batch sizes %s) in %.1f s; graph pool holds %.2f GiB",
                    len(self.graphs), list(self.sizes), time.perf_counter() - t0,
                    (torch.cuda.memory_reserved(self.runner.device) - before) / 2**30)

    def _capture_one(self, step: StepInputs, stream: torch.cuda.Stream) -> _Graph:
        data = self.static_data[:step.data.size]
        data.copy_(torch.from_numpy(step.data))
        out = self.static_logits[:step.shape.num_sampled]
        self.runner.forward_logits(data, step.shape, out)  # warm-up: lazy initialisation stays out of the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            logits, ids = self.runner.forward_logits(data, step.shape, out)
        return _Graph(graph, step.shape, logits, ids, GraphFields(self.static_data, step.shape))

    def lookup(self, step: StepInputs) -> _Graph | None:
        g = self.graphs.get(step.shape.num_seqs)
        return g if g is not None and step.shape.fits_graph(g.shape) else None

    def run(self, g: _Graph, data: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """On the current (compute) stream: stage inputs, replay, then the sampling stage eagerly."""
        return self.runner.finish_forwarded(self.forward(g, data, step), step.shape, step.sampler)

    def forward(self, g: _Graph, data: torch.Tensor, step: StepInputs) -> Forwarded:
        """Stage inputs and replay: the step up to its sampling stage. A step with grammar-constrained
        rows samples later, once its mask is on the device (``StreamExecutor.provide_mask``): the graph
        holds no sampler, so it replays for those steps too. Its outputs (logits, ids) and staged
        inputs stay untouched until the next replay, which the compute stream runs after that sampling."""
        fields = g.fields.stage(data, step.shape)
        g.graph.replay()
        return Forwarded(None, g.ids, fields, g.logits)
