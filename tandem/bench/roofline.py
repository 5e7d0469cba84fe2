"""The floor a step cannot beat: max(bytes moved / copy bandwidth, FLOPs / GEMM rate).

Both ceilings are measured on the machine in the same run. Bytes: every weight read once as stored
(quantized projections at their own size, scales included; the embedding table only for the rows
looked up) plus the KV cache read and written by the step, at the cache's element size (one byte in
an fp8 cache). FLOPs: the linear layers for every token, the LM head for sampled rows, and
attention's two products (against the bf16 GEMM ceiling, also for FP8 weights and an fp8 KV cache:
decode steps are bound by their bytes).
Under tensor parallelism the floor is one GPU's: each reads 1/N of the weights and its own KV heads
(1/N of them, or one where they are replicated) and does 1/N of the FLOPs. A sliding-window layer
reads (and scores) at most its window's keys per query (``StepRecord.windowed``).

Mixture-of-experts models (``model/moe_shape.py``): their dense parts (attention, norms, dense-layer
MLPs, routers, shared experts) count fully, their routed experts (as stored: FP8 with their scales,
or 4-bit with their group scales and zero points, where the projections are so) only for the experts a step's
tokens touch, E * (1 - (1 - k/E)^T) per sparse layer for T tokens, the expectation under uniform
routing (``MoEShape.expected_distinct_experts`` says why that and not the real routing); FLOPs
count k experts per token. Under tensor parallelism each expert's width is split like a dense MLP's."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, replace

import torch

from tandem.bench.step_log import StepRecord
from tandem.model.model_config import ModelConfig
from tandem.model.moe_shape import moe_shape
from tandem.model.quant.linear import LinearStorage
from tandem.model.tp_layout import TPLayout


@dataclass
class Ceilings:
    copy_bytes_per_s: float  # counting bytes read plus bytes written
    gemm_flops_per_s: float  # bf16


def _time_ms(fn, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def measure_ceilings(device: torch.device, copy_bytes: int = 2 << 30, gemm_n: int = 8192) -> Ceilings:
    # the engine holds most of the memory (a KV cache at gpu_memory_utilization): copy what fits,
    # and at least 256 MiB, which still times the copy at its steady bandwidth
    free, _ = torch.cuda.mem_get_info(device)
    copy_bytes = max(256 << 20, min(copy_bytes, (free - (512 << 20)) // 2))
    src = torch.randint(0, 255, (copy_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = _time_ms(lambda: dst.copy_(src), 10)
    del src, dst
    a = torch.randn(gemm_n, gemm_n, device=device, dtype=torch.bfloat16)
    b = torch.randn(gemm_n, gemm_n, device=device, dtype=torch.bfloat16)
    gemm_ms = _time_ms(lambda: a @ b, 10)
    return Ceilings(2 * copy_bytes / (copy_ms / 1e3), 2 * gemm_n**3 / (gemm_ms / 1e3))


@dataclass
class StepCost:
    bytes: float
    flops: float

    def floor_s(self, c: Ceilings) -> float:
        return max(self.bytes / c.copy_bytes_per_s, self.flops / c.gemm_flops_per_s)


def projection_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """[rows, cols] of every matrix read through ``quant.linear`` (the attention projections, dense
    MLPs): what a quantized checkpoint stores quantized. Routers and the head stay dense; experts
    are counted apart (``FloorModel.expert_bytes``: FP8 or 4-bit where the projections are)."""
    h, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
    moe = moe_shape(cfg)
    dense = range(cfg.num_layers) if moe is None else moe.dense_layers
    inter = cfg.intermediate_size if moe is None else moe.dense_intermediate
    return [(q + 2 * kv, h), (h, q)] * cfg.num_layers + [(2 * inter, h), (h, inter)] * len(dense)


class FloorModel:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp_size: int = 1,
                 linear: LinearStorage | None = None, kv_dtype: torch.dtype | None = None) -> None:
        """``linear``: how the projections are stored where not in ``dtype`` (quantized weights);
        ``kv_dtype``: the KV cache's element type where not ``dtype`` (an fp8 cache)."""
        self.cfg, self.tp_size = cfg, tp_size
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        h = cfg.hidden_size
        # all transformer blocks: no embedding, no head (per GPU)
        self.layer_params = (cfg.num_params() - cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)) / tp_size
        self.head_params = cfg.vocab_size * h / tp_size
        self.moe = moe_shape(cfg)
        self.expert_params = 0.0  # one expert over all sparse layers (per GPU): read once per distinct expert
        if self.moe is not None:  # num_params counted one dense MLP of intermediate_size per layer
            dense_mlps = cfg.num_layers * 3 * h * cfg.intermediate_size
            self.layer_params += (self.moe.always_read_params - dense_mlps) / tp_size
            self.expert_params = len(self.moe.sparse_layers) * self.moe.expert_params / tp_size
        self.expert_bytes = self.expert_params * self.itemsize  # that expert as stored
        if self.moe is not None and linear is not None and linear.dtype in ("float8_e4m3fn", "int4"):
            # FP8 and 4-bit checkpoints keep their experts as stored where they keep the projections
            # so (Fp8Experts, Int4Experts: weights, scales, zero points); experts multiply 16-bit
            # activations, so no static activation scale is stored
            h, i = cfg.hidden_size, self.moe.expert_intermediate
            stored = replace(linear, matrix_bytes=0)
            per_layer = stored.bytes_of(2 * i, h) + stored.bytes_of(h, i)
            self.expert_bytes = len(self.moe.sparse_layers) * per_layer / tp_size
        # the bytes of the layers as stored: quantized projections at their own size, scales included
        self.layer_bytes = self.layer_params * self.itemsize
        if linear is not None:
            shapes = projection_shapes(cfg)
            dense = sum(n * k for n, k in shapes) * self.itemsize
            self.layer_bytes += (sum(linear.bytes_of(n, k) for n, k in shapes) - dense) / tp_size
        local = TPLayout(0, tp_size).local_config(cfg)
        kv_itemsize = torch.empty(0, dtype=kv_dtype or dtype).element_size()
        self.layer_token_bytes = 2 * local.num_kv_heads * cfg.head_dim * kv_itemsize  # one layer's K and V
        self.kv_token_bytes = cfg.num_layers * self.layer_token_bytes
        self.layers_by_window = Counter(cfg.windows)  # window (None: full attention) -> layers
        self.windows = tuple(sorted(w for w in self.layers_by_window if w is not None))

    def _per_layer_sums(self, rec: StepRecord) -> tuple[int, int]:
        """(KV tokens read, query-key pairs scored) summed over the layers."""
        kv = pairs = 0
        for window, layers in self.layers_by_window.items():
            read, scored = (rec.kv_tokens, rec.attn_pairs) if window is None else rec.windowed[window]
            kv, pairs = kv + layers * read, pairs + layers * scored
        return kv, pairs

    def experts_read(self, num_tokens: int) -> float:
        """Distinct experts a step of ``num_tokens`` tokens reads per sparse layer (0: dense model)."""
        return 0.0 if self.moe is None else self.moe.expected_distinct_experts(num_tokens)

    def step_cost(self, rec: StepRecord) -> StepCost:
        cfg = self.cfg
        embed_rows = rec.num_tokens * cfg.hidden_size / self.tp_size
        experts = self.experts_read(rec.num_tokens) * self.expert_bytes
        weight_bytes = self.layer_bytes + (self.head_params + embed_rows) * self.itemsize + experts
        kv_read, pairs = self._per_layer_sums(rec)
        kv_bytes = (kv_read + cfg.num_layers * rec.num_tokens) * self.layer_token_bytes
        routed = rec.num_tokens * (self.moe.top_k if self.moe is not None else 0) * self.expert_params
        linear = 2 * (rec.num_tokens * self.layer_params + routed) + 2 * rec.num_sampled * self.head_params
        attention = 4 * cfg.num_heads / self.tp_size * cfg.head_dim * pairs
        return StepCost(weight_bytes + kv_bytes, linear + attention)

    def describe(self, rec: StepRecord, c: Ceilings, measured_s: float | None) -> dict:
        cost = self.step_cost(rec)
        return {"step_id": rec.step_id, "num_seqs": rec.num_seqs, "num_tokens": rec.num_tokens,
                "kv_tokens": rec.kv_tokens, "experts_read": self.experts_read(rec.num_tokens),
                "bytes": cost.bytes, "flops": cost.flops,
                "memory_floor_ms": cost.bytes / c.copy_bytes_per_s * 1e3,
                "compute_floor_ms": cost.flops / c.gemm_flops_per_s * 1e3,
                "measured_gpu_ms": None if measured_s is None else measured_s * 1e3, "ceilings": asdict(c)}
