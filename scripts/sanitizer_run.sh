#!/usr/bin/env bash
# Moved to benchmarks/sanitizer_run.sh (`python3 -m benchmarks sanitizer-run`); this path runs it as before.
exec bash "$(dirname "$0")/../benchmarks/sanitizer_run.sh" "$@"
