"""The server's options: one dataclass is the single list (as ``EngineConfig`` is the engine's). The
``tandem serve`` flags (``tandem.cli.options``), their checks (``__post_init__``) and what
``tandem.server.launch.serve`` reads all come from it. Adding an option is one entry here.

Importable without the web stack: the CLI builds its parser from it before anything heavy loads."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tandem.config import check_type
from tandem.server.defaults import (DEFAULT_CORE_HEARTBEAT_TIMEOUT_S, DEFAULT_CORE_TIMEOUT_S, DEFAULT_MAX_HEADER_BYTES,
                                   DEFAULT_MAX_N, DEFAULT_MAX_PROMPTS_PER_REQUEST, DEFAULT_MAX_REQUEST_BYTES,
                                   DEFAULT_MAX_SEQS_PER_REQUEST, DEFAULT_MIN_MAX_NUM_WAITING,
                                   DEFAULT_REQUEST_READ_TIMEOUT_S, DEFAULT_WAITING_BATCHES)

if TYPE_CHECKING:
    from tandem.server.chat_output import ChatParsing
    from tandem.server.request_limits import RequestLimits

API_KEY_ENV = "TANDEM_API_KEY"
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _opt(default: Any, help: str, check: Callable[[Any], bool] | None = None, why: str = "",
         choices: Any = None) -> Any:
    """One option: its default, its help, and the check a value must pass (skipped for None)."""
    return field(default=default, metadata={"help": help, "check": check, "why": why, "choices": choices})


def _internal(default: Any) -> Any:
    """Not a flag: set by the command from global options (``-v``)."""
    return field(default=default, metadata={"cli": False})


def _tool_parsers() -> list[str]:
    from tandem.server.tools.registry import TOOL_PARSERS

    return list(TOOL_PARSERS)


def _reasoning_parsers() -> list[str]:
    from tandem.server.reasoning.registry import REASONING_PARSERS

    return list(REASONING_PARSERS)


_AT_LEAST_1 = (lambda v: v >= 1, "must be >= 1")
_AT_LEAST_0 = (lambda v: v >= 0, "must be >= 0")  # also refuses NaN


@dataclass
class ServeOptions:
    # --- where it listens, who may call it, what it is called ---
    host: str = _opt("127.0.0.1", "address to listen on (default: loopback only)")
    port: int = _opt(8000, "(default: 8000; 0 = a free port, printed at start)", lambda v: 0 <= v < 65536,
                     "must be in [0, 65535]")
    api_key: str | None = _opt(None, f"require 'Authorization: Bearer KEY' on the /v1 routes (default: "
                                     f"${API_KEY_ENV} if set; the variable keeps the key out of the process list)")
    served_model_name: list[str] | None = _opt(None, "model name(s) clients use, each accepted (default: the model "
                                                     "as given); the first is reported")
    allowed_origins: list[str] | None = _opt(None, "enable CORS for these browser origins ('*': any); off by default")
    # --- load and the engine core's health ---
    max_num_waiting: int | None = _opt(None, "refuse requests (429) while more than this many would wait for a "
                                             f"place in the batch (default: {DEFAULT_WAITING_BATCHES} x "
                                             f"--max-num-seqs, at least {DEFAULT_MIN_MAX_NUM_WAITING})", *_AT_LEAST_0)
    core_timeout: float = _opt(DEFAULT_CORE_TIMEOUT_S, "seconds the engine core may stay silent while requests wait "
                                                       "before it is declared dead (503, exit 1) (default: "
                                                       f"{DEFAULT_CORE_TIMEOUT_S:.0f}; 0: never)", *_AT_LEAST_0)
    core_heartbeat_timeout: float = _opt(DEFAULT_CORE_HEARTBEAT_TIMEOUT_S,
                                         "seconds without the engine core's heartbeat (its process stopped) before "
                                         "/health answers 503 until it runs again (default: "
                                         f"{DEFAULT_CORE_HEARTBEAT_TIMEOUT_S:g}; 0: never)", *_AT_LEAST_0)
    # --- scale-out on one machine (docs/serving.md, "Data parallelism"), and the metrics' names ---
    data_parallel_size: int = _opt(1, "engine cores behind the API process, each on its own GPUs (the visible ones "
                                      "in turn, --tensor-parallel-size each); a request goes to the core holding "
                                      "its prompt's prefix, or to the least loaded", *_AT_LEAST_1)
    api_server_count: int = _opt(1, "API processes sharing the port (tokenizing, detokenizing, streaming), each "
                                    "talking to every engine core", *_AT_LEAST_1)
    stream_interval: int = _opt(1, "new tokens a request's stream collects before its next event, after the first "
                                   "token (sent at once) and until the last (SGLang's flag): fewer, "
                                   "larger events cost the API process less at many streams (default: 1, every "
                                   "step's tokens)", *_AT_LEAST_1)
    metrics_prefix: str = _opt("both", "names on /metrics: vllm (vllm:num_requests_running ..., as vLLM's "
                                       "dashboards expect), tandem, or both (default)",
                               choices=("tandem", "vllm", "both"))  # = tandem.server.metrics.METRICS_PREFIXES
    # --- what one request may ask for (400 beyond), how long and large its head and body may be ---
    max_request_bytes: int = _opt(DEFAULT_MAX_REQUEST_BYTES, "refuse larger request bodies (413)", *_AT_LEAST_1)
    max_prompts_per_request: int = _opt(DEFAULT_MAX_PROMPTS_PER_REQUEST, "most prompts in one completions request")
    max_n: int = _opt(DEFAULT_MAX_N, f"most choices (n) per prompt, at most 1024 (default: {DEFAULT_MAX_N}, as "
                                     "OpenAI)")
    max_seqs_per_request: int = _opt(DEFAULT_MAX_SEQS_PER_REQUEST, "most sequences (prompts x n) one request may "
                                                                   "create")
    default_max_tokens: int | None = _opt(None, "max_tokens of a request that gives none (chat, or null on "
                                                "completions): the rest of the context, capped at this (default: "
                                                "generation_config.json's max_new_tokens under --generation-config "
                                                "auto, else no cap)")
    trust_request_chat_template: bool = _opt(False, "accept a chat_template in chat and /tokenize requests (off: a "
                                                    "Jinja template from a client is code the server runs, "
                                                    "sandboxed but unbounded in time)")
    max_header_bytes: int = _opt(DEFAULT_MAX_HEADER_BYTES, "refuse larger request lines plus headers (431)",
                                 lambda v: v >= 1024, "must be >= 1024")
    request_read_timeout: float = _opt(DEFAULT_REQUEST_READ_TIMEOUT_S,
                                       "seconds a client has to send a request's headers, and again its body, "
                                       "before it gets 408 and the connection is closed", lambda v: v > 0,
                                       "must be > 0")
    # --- how chat outputs are read: tool calls and reasoning (vLLM's flags and parser names) ---
    enable_auto_tool_choice: bool = _opt(False, 'serve tool_choice "auto" (the default when a request has tools): '
                                                "the model decides whether to call, and its calls are read with "
                                                "--tool-call-parser")
    tool_call_parser: str | None = _opt(None, "the model family's tool-call format: hermes (Hermes, Qwen 2.5 and "
                                              "3), llama3_json (Llama 3.x), mistral", choices=_tool_parsers)
    reasoning_parser: str | None = _opt(None, "return a <think> model's reasoning as reasoning_content, apart from "
                                              "content: deepseek_r1 (R1 and its distills), qwen3",
                                        choices=_reasoning_parsers)
    # --- logs ---
    disable_log_requests: bool = _opt(False, "no line per HTTP request (uvicorn's access log, on at --log-level "
                                             "info and below)")
    uvicorn_log_level: str | None = _opt(None, "uvicorn's own log level (default: info with -v / --log-level "
                                               "info or debug, else warning)", choices=UVICORN_LOG_LEVELS)
    log_level: int = _internal(logging.WARNING)  # -v / --log-level: the API and core processes' loggers

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check_type(_flag(f.name) if f.metadata.get("cli", True) else f.name, value, f.type)
            _check_value(f, value)
        self.limits()  # their own checks, naming the flags
        self.chat_parsing().check()

    def limits(self) -> RequestLimits:
        from tandem.server.request_limits import RequestLimits

        return RequestLimits(self.max_prompts_per_request, self.max_n, self.max_seqs_per_request,
                             self.default_max_tokens, self.trust_request_chat_template)

    def chat_parsing(self) -> ChatParsing:
        from tandem.server.chat_output import ChatParsing

        return ChatParsing(self.tool_call_parser, self.enable_auto_tool_choice, self.reasoning_parser)


def _check_value(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if value is None or not meta.get("cli", True):
        return
    check, choices = meta["check"], meta["choices"]
    if check is not None and not check(value):
        raise ValueError(f"{_flag(f.name)} {meta['why']}, got {value!r}")
    if choices is not None:
        allowed = choices() if callable(choices) else choices
        if value not in allowed:
            raise ValueError(f"{_flag(f.name)} must be one of {sorted(allowed)}, got {value!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
