"""The OpenAI-compatible server (``tandem serve``).

Two processes: the engine core (scheduler + worker + device) runs alone in its own process so that
nothing competes with the step loop for its GIL; the API process does HTTP, tokenization,
detokenization, stop strings and streaming. They exchange msgpack frames over ZeroMQ ipc sockets:
requests and aborts one way, compact per-step token deltas (plus the core's stats) the other."""
