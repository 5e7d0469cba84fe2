"""Defaults of the server's protective limits, importable without the web stack (the CLI reads them
for its flags before anything heavy loads)."""

#: request bodies above this are refused with 413; a 128k-token prompt is under 1 MB as text or as
#: token ids, and tokenizing takes about a second per megabyte here (on a worker thread)
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
#: seconds the engine core may stay silent while requests wait on it; a step this long is a hang on
#: any device this engine targets
DEFAULT_CORE_TIMEOUT_S = 600.0
#: seconds without the engine core's heartbeat (its process stopped running) before /health answers 503
DEFAULT_CORE_HEARTBEAT_TIMEOUT_S = 5.0

# --- per-request limits (400 beyond them; see tandem.server.request_limits) ---
#: prompts in one completions request; lm-eval sends lists of a few hundred
DEFAULT_MAX_PROMPTS_PER_REQUEST = 1024
#: choices per prompt (``n``); OpenAI's own cap
DEFAULT_MAX_N = 128
#: engine requests (prompts x n) one API request may create
DEFAULT_MAX_SEQS_PER_REQUEST = 1024
#: with no --max-num-waiting: engine requests that may wait for a place in the batch. A multiple of
#: max_num_seqs keeps the queueing delay to a few batches' worth of requests whatever the batch size;
#: the floor keeps lm-eval's and bench-serve's bursts (hundreds of requests) on small batches queued
#: rather than refused
DEFAULT_WAITING_BATCHES = 4
DEFAULT_MIN_MAX_NUM_WAITING = 1024

# --- the HTTP layer (tandem.server.http_limits, tandem.server.body_limit) ---
#: request line plus headers (431 beyond); real clients send a few kB
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
#: seconds a client has to send its request headers, and then again its body (a 4 MiB body needs
#: about 1 Mbit/s); slower clients get 408 and the connection is closed
DEFAULT_REQUEST_READ_TIMEOUT_S = 30.0


def default_max_num_waiting(max_num_seqs: int) -> int:
    return max(DEFAULT_WAITING_BATCHES * max_num_seqs, DEFAULT_MIN_MAX_NUM_WAITING)
