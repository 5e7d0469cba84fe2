"""A worker whose device returns at once: the host loop alone, for measuring its cost per step.

It implements the engine's ``Worker`` interface (so the real scheduler, batch builder, submission
and output processing run) and answers every step immediately with well-formed outputs (tokens
that never stop a request early, and logprobs of the right shapes where asked). A grammar-
constrained row takes a token its mask allows (not an EOS while anything else is allowed), picked
by a hash of the step and row, so the host's grammar work is real too; the time that picking takes
is the device's, not the host's (``mask_device_s``, which the host-only figures leave out)."""
from __future__ import annotations

import numpy as np

import time

from tandem.config import EngineConfig
from tandem.contract.step import Logprobs, StepInputs, StepOutput, field_offsets
from tandem.contract.worker import StepInterval, WorkerInfo
from tandem.model.model_config import requested_max_model_len
from tandem.model.sources import resolve_model_config

# decode steps are padded as on a GPU with CUDA graphs, so the builder does the same work
_GRAPH_SIZES = (1, 2, 4, 8)


class FakeWorker:
    def __init__(self, config: EngineConfig, kv_tokens: int | None = None) -> None:
        """``kv_tokens``: the KV cache's size (default ``config.kv_cache_tokens``, else 16M tokens);
        ``max_model_len`` is fitted to it as the real worker does (an explicit one that does not fit
        is an error)."""
        from tandem.worker.worker import fit_max_model_len

        model = resolve_model_config(config.model)
        kv_tokens = kv_tokens or config.kv_cache_tokens or 1 << 24
        max_len = fit_max_model_len(requested_max_model_len(model, config.max_model_len, config.allow_long_max_model_len),
                                    kv_tokens, explicit=config.max_model_len is not None)
        num_rows = 2 * config.max_num_seqs
        sizes = tuple(sorted({*(s for s in _GRAPH_SIZES if s < config.max_num_seqs),
                              *range(16, config.max_num_seqs, 16), config.max_num_seqs}))
        self.info = WorkerInfo(device="fake", device_name="no device (host loop only)", dtype="bfloat16",
                               num_kv_blocks=kv_tokens // config.block_size + 1, block_size=config.block_size,
                               max_model_len=max_len, num_rows=num_rows, padding_row=num_rows,
                               graph_batch_sizes=sizes, graph_max_blocks=-(-max_len // config.block_size))
        self.vocab = model.vocab_size
        self.model_config = model
        self._awaiting: tuple[StepInputs, StepOutput] | None = None  # a step waiting for its grammar mask
        self.mask_device_s: dict[int, float] = {}  # step id -> seconds this device spent on its mask

    def submit(self, step: StepInputs) -> StepOutput:
        n = step.shape.num_sampled
        tokens = (step.step_id * 7919 + np.arange(n)) % self.vocab
        k = step.sampler.logprobs
        logprobs = None if k < 0 else Logprobs(np.zeros(n, np.float32), np.ones(n, np.int64),
                                               np.zeros((n, k), np.int64), np.zeros((n, k), np.float32))
        out = StepOutput(step.step_id, tokens, logprobs)
        if step.shape.num_masked:
            self._awaiting = step, out
        return out

    def mask_buffer(self, step_id: int, rows: int, words: int) -> np.ndarray | None:
        return None

    def provide_mask(self, step_id: int, mask: np.ndarray) -> None:
        began = time.perf_counter()
        step, out = self._awaiting
        self._awaiting = None
        start, size = field_offsets(step.shape)["mask_sample"]
        rows = step.data[start:start + size]
        for i, row in enumerate(rows.tolist()):
            out.token_ids[row] = self._allowed_token(mask[i], step_id * 7919 + row)
        self.mask_device_s[step_id] = time.perf_counter() - began

    def _allowed_token(self, row: np.ndarray, salt: int) -> int:
        """An allowed token of one mask row, from a word picked by ``salt``: no unpacking of the whole
        row (this device's time should stay small next to the host's)."""
        bits = row.view(np.uint32).copy()
        for eos in self.model_config.eos_token_ids:
            bits[eos // 32] &= np.uint32(~(1 << eos % 32) & 0xFFFFFFFF)
        if self.vocab % 32:  # the last word's bits past the vocabulary
            bits[-1] &= np.uint32((1 << self.vocab % 32) - 1)
        words = np.flatnonzero(bits)
        if words.size == 0:  # only an EOS is allowed
            return min(self.model_config.eos_token_ids)
        word = int(words[salt % words.size])
        set_bits = [b for b in range(32) if int(bits[word]) >> b & 1]
        return word * 32 + set_bits[salt % len(set_bits)]

    def collect(self, handle: StepOutput) -> StepOutput:
        return handle

    def set_async(self, enabled: bool) -> None:
        pass

    def drain(self) -> None:
        pass

    def start_timing(self) -> None:
        pass

    def stop_timing(self) -> list[StepInterval]:
        return []

    def idle_fraction(self) -> float | None:
        return None

    def device_seconds(self) -> tuple[float, float]:
        return 0.0, 0.0

    def pause_device_clock(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
