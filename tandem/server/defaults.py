"""Defaults of the server's protective limits, importable without the web stack (the CLI reads them
for its flags before anything heavy loads)."""

#: request bodies above this are refused with 413; a 128k-token prompt is under 1 MB as text or as
#: token ids, and tokenizing runs on the event loop at about a second per megabyte here
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
#: seconds the engine core may stay silent while requests wait on it; a step this long is a hang on
#: any device this engine targets
DEFAULT_CORE_TIMEOUT_S = 600.0
#: seconds without the engine core's heartbeat (its process stopped running) before /health answers 503
DEFAULT_CORE_HEARTBEAT_TIMEOUT_S = 5.0
