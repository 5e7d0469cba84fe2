"""The engine's options: one dataclass is the single list. ``LLM(**options)``, the CLI flags
(``tandem.cli.engine_args``) and the README table are all derived from it.

Plain values only (strings, numbers, booleans): the host side never needs torch to read a config,
and a config crosses process boundaries as it is. Device and dtype are resolved by the worker."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from tandem.model.quant.config import QUANTIZATIONS
from tandem.model.registry import MODEL_IMPLS
from tandem.sampling_params import MAX_LOGPROBS
from tandem.spec.config import SpeculativeConfig, parse_speculative_config

DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16", "half", "float")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class EngineConfig:
    model: str = field(metadata={"help": "a local Hugging Face checkpoint folder, a Hugging Face id (org/name) "
                                         "already in the local cache (never downloaded), or random:<preset> "
                                         "(random weights with a real model's shapes; see the README)"})
    tokenizer: str | None = _opt(None, "the tokenizer's checkpoint folder or cached Hugging Face id (default: the "
                                       "model's)")
    revision: str | None = _opt(None, "a Hugging Face id's branch, tag or commit, as the local cache holds it "
                                      "(default: main); refused for a local folder")
    download_dir: str | None = _opt(None, "the Hugging Face cache folder ids are looked up in (default: "
                                          "$HF_HUB_CACHE, else ~/.cache/huggingface/hub); nothing is downloaded")
    trust_remote_code: bool = _opt(False, "accepted for vLLM's command lines; tandem never runs a checkpoint's own "
                                          "Python code, so a checkpoint that needs it (auto_map) is refused either "
                                          "way")
    chat_template: str | None = _opt(None, "a Jinja chat template, as a file or inline, instead of the "
                                           "checkpoint's")
    generation_config: str = _opt("auto", "request defaults: auto (the checkpoint's generation_config.json: "
                                          "temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, "
                                          "as vLLM), vllm (tandem's own, vLLM's SamplingParams defaults), or a "
                                          "folder holding a generation_config.json")
    max_logprobs: int = _opt(20, "most alternatives per token a request may ask for (logprobs, prompt_logprobs), "
                                 "at most 20")
    model_impl: str = _opt("auto", "which forward runs the model: auto (tandem's native one where it has one, "
                                   "else transformers'), tandem (native only), transformers (transformers' "
                                   "modeling code through tandem's paged attention, even where a native one exists)")
    quantization: str = _opt("auto", "linear weights: auto (as the checkpoint stores them: its quantization_config), "
                                     "fp8 (an FP8 checkpoint, or quantize a bf16/fp32 one at load: per-channel "
                                     "weights, dynamic per-token activations), int4 (quantize a bf16/fp32 "
                                     "checkpoint at load: 4-bit weights, symmetric, groups of 128), awq / gptq / "
                                     "compressed-tensors "
                                     "(4-bit weight-only checkpoints of that format; the checkpoint must be one), "
                                     "none (refuse a quantized checkpoint)")
    dtype: str = _opt("auto", "weights and activations: auto (bfloat16 on CUDA, float32 on CPU), float32, "
                              "bfloat16, float16, float64")
    device: str | None = _opt(None, "cuda, cuda:N or cpu (default: cuda when available)")
    max_model_len: int | None = _opt(None, "longest prompt + output in tokens (default: the model's "
                                           "max_position_embeddings, lowered to what the KV cache holds)")
    allow_long_max_model_len: bool = _opt(False, "accept max_model_len above the model's "
                                                 "max_position_embeddings (outputs past it may be garbage)")
    max_num_seqs: int = _opt(256, "most sequences in one step")
    max_num_batched_tokens: int = _opt(8192, "most tokens in one step (longer prompts are prefilled in chunks)")
    block_size: int = _opt(16, "tokens per KV cache block")
    gpu_memory_utilization: float = _opt(0.9, "fraction of GPU memory for weights, activations and KV cache")
    kv_cache_tokens: int | None = _opt(None, "KV cache size in tokens (default: what fits on a GPU, 32768 "
                                             "on a CPU)")
    kv_cache_dtype: str = _opt("auto", "KV cache element type: auto (the model dtype) or fp8 / fp8_e4m3 (e4m3 "
                                       "with per-tensor scales, 1.0 where the checkpoint gives none: twice the "
                                       "tokens in the same memory, half the KV bytes per step), or fp8_e5m2 (the "
                                       "same with e5m2: wider range, one mantissa bit fewer)")
    seed: int = _opt(0, "engine seed: draws the seeds of requests that give none")
    async_batching: bool = _opt(True, "prepare step N+1 on the host while the device runs step N")
    enforce_eager: bool = _opt(False, "never use CUDA graphs")
    enable_prefix_caching: bool = _opt(True, "reuse the KV cache blocks of prompt prefixes seen before (shared "
                                             "system prompts, preempted requests): their prefill is skipped")
    speculative_config: str | None = _opt(None, "speculative decoding, as vLLM's JSON: '{\"method\": \"ngram\", "
                                                "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 5, "
                                                "\"prompt_lookup_min\": 1}' or '{\"method\": \"draft\", \"model\": "
                                                "PATH, \"num_speculative_tokens\": 4}'; \"disable_by_batch_size\" "
                                                "(default 32): no speculation in a step while more requests run or "
                                                "wait (docs/pipeline.md)")
    tensor_parallel_size: int = _opt(1, "split the model over this many GPUs (one process each; on a CPU, "
                                        "processes over gloo); see docs/tensor_parallel.md")
    enable_expert_parallel: bool = _opt(False, "mixture-of-experts models: place whole experts on the "
                                               "tensor_parallel_size ranks (E/N each) instead of a slice of "
                                               "every expert on each; refused for a model without experts")
    max_stop_strings: int = _opt(64, "most stop strings in one request (more is a ValueError, a 400 from the "
                                     "server)")
    max_stop_string_length: int = _opt(1024, "most characters in one stop string (longer is a ValueError, a 400 "
                                             "from the server)")
    structured_output_workers: int | None = _opt(None, "grammar worker processes for structured output: each "
                                                       "holds the grammars of the requests given to it and fills "
                                                       "their mask rows in parallel with the others and with the "
                                                       "step loop; 0: all in the engine's process (default: half "
                                                       "the CPUs, at most 8, on a machine of 8 or more CPUs, else 0)")
    kv_events_config: str | None = _opt(None, "KV-cache events for prefix-aware routers, as vLLM's JSON: "
                                              '\'{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": '
                                              '"tcp://*:5557", "topic": "kv-events"}\' (docs/scale_out.md)')

    def __post_init__(self) -> None:
        if isinstance(self.speculative_config, dict):  # LLM(speculative_config={...}), as vLLM takes it
            self.speculative_config = json.dumps(self.speculative_config)
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name), f.type)
        checks = [
            ("max_num_seqs", self.max_num_seqs >= 1, "must be >= 1"),
            ("tensor_parallel_size", self.tensor_parallel_size >= 1, "must be >= 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1, "must be >= 1"),
            ("max_stop_strings", self.max_stop_strings >= 1, "must be >= 1"),
            ("max_stop_string_length", self.max_stop_string_length >= 1, "must be >= 1"),
            ("max_logprobs", 0 <= self.max_logprobs <= MAX_LOGPROBS,
             f"must be in [0, {MAX_LOGPROBS}] (the sampler computes at most {MAX_LOGPROBS} alternatives)"),
            ("generation_config", bool(self.generation_config), "must be auto, vllm or a folder"),
            ("block_size", 1 <= self.block_size <= 256, "must be in [1, 256]"),
            ("gpu_memory_utilization", 0.0 < self.gpu_memory_utilization <= 1.0, "must be in (0, 1]"),
            ("kv_cache_tokens", self.kv_cache_tokens is None or self.kv_cache_tokens >= self.block_size,
             "must be >= block_size"),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 2, "must be >= 2"),
            ("dtype", self.dtype in DTYPE_NAMES, f"must be one of {DTYPE_NAMES}"),
            ("kv_cache_dtype", self.kv_cache_dtype in KV_CACHE_DTYPES, f"must be one of {KV_CACHE_DTYPES}"),
            ("model_impl", self.model_impl in MODEL_IMPLS, f"must be one of {MODEL_IMPLS}"),
            ("quantization", self.quantization in QUANTIZATIONS, f"must be one of {QUANTIZATIONS}"),
            ("model", bool(self.model), "must name a checkpoint folder or random:<preset>"),
            ("structured_output_workers", self.structured_output_workers is None or self.structured_output_workers >= 0,
             "must be >= 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")
        if self.kv_events_config is not None:  # its keys and types, before anything loads
            from tandem.engine.kv_events import parse_kv_events_config

            if parse_kv_events_config(self.kv_events_config).active and not self.enable_prefix_caching:
                raise ValueError("kv_events_config: KV-cache events report the prefix cache's blocks, and "
                                 "enable_prefix_caching is off")
        if self.speculative_config is not None:  # its keys and values, before anything loads
            parse_speculative_config(self.speculative_config)

    @property
    def speculative(self) -> SpeculativeConfig | None:
        """``speculative_config`` parsed (None: no speculative decoding)."""
        return None if self.speculative_config is None else parse_speculative_config(self.speculative_config)

    @classmethod
    def from_options(cls, model: str, **options: Any) -> EngineConfig:
        """Build from keyword options; an unknown name is a ValueError listing the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known: {sorted(known - {'model'})}")
        return cls(model=model, **options)

    def resolved(self) -> EngineConfig:
        """This config with its names made local (a cached Hugging Face id becomes its snapshot folder,
        a chat template file its text), checked before anything loads; the engine and every process
        it starts read only local folders. Idempotent: a resolved config resolves to itself."""
        from tandem.generation_defaults import sampling_defaults
        from tandem.model.sources import is_preset, load_tokenizer, local_model_path, read_chat_template

        model = local_model_path(self.model, self.revision, self.download_dir)
        local_tokenizer = self.tokenizer is not None and (is_preset(self.tokenizer) or os.path.isdir(self.tokenizer))
        tokenizer = None if self.tokenizer is None else local_model_path(
            self.tokenizer, None, None if local_tokenizer else self.download_dir, "tokenizer")
        template = None if self.chat_template is None else read_chat_template(self.chat_template)
        if template is not None and is_preset(tokenizer or model):
            load_tokenizer(tokenizer or model, template)  # refuses: the byte tokenizer takes no template
        sampling_defaults(model, self.generation_config)  # a bad folder or file fails now
        return dataclasses.replace(self, model=model, tokenizer=tokenizer, chat_template=template, revision=None,
                                   download_dir=None)

    @property
    def grammar_workers(self) -> int:
        """structured_output_workers, its default resolved for this machine: half the CPUs this process
        may run on, at most 8; none below 8 CPUs (the processes would compete with the step loop)."""
        if self.structured_output_workers is not None:
            return self.structured_output_workers
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return min(8, cpus // 2) if cpus >= 8 else 0

    @property
    def use_cuda_graphs(self) -> bool:
        """Whether graphs are wanted; the worker uses them only on CUDA."""
        return not self.enforce_eager


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def check_type(name: str, value: Any, annotation: str) -> None:
    """Options come from users (keywords, CLI, JSON, YAML): reject wrong types with the option's name.
    ``annotation`` is the field's (a string): int, float, str, bool or list[...] of one, maybe | None."""
    optional = annotation.endswith("| None")
    if value is None:
        if not optional:
            raise ValueError(f"{name} must not be None")
        return
    kind_name = annotation.split("|")[0].strip()
    if kind_name.startswith("list["):
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list, got {value!r}")
        for item in value:
            check_type(name, item, kind_name[5:-1])
        return
    kind = _TYPES[kind_name]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if kind is float and ok and not math.isfinite(value):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be {'a finite number' if kind is float else kind.__name__}, got {value!r}")


def option_fields() -> list[dataclasses.Field]:
    """The options in declaration order (``model`` first)."""
    return list(dataclasses.fields(EngineConfig))
