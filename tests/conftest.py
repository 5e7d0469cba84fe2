"""Shared fixtures: tiny random Hugging Face checkpoints, built once per test session."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from checkpoints import ARCHS, build_checkpoint


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: ``checkpoint_dir("qwen3")`` -> path of that arch's checkpoint (built on first use)."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in ARCHS:
            raise KeyError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
        if arch not in built:
            built[arch] = build_checkpoint(arch, tmp_path_factory.mktemp(f"ckpt-{arch}"))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def sharded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama checkpoint saved in several safetensors shards with a model.safetensors.index.json."""
    return build_checkpoint("llama", tmp_path_factory.mktemp("ckpt-llama-sharded"), sharded=True)


@pytest.fixture(scope="session")
def server(checkpoint_dir):
    """One ``tandem serve`` process for the server tests: the llama checkpoint (trained tokenizer and
    chat template), at most 16 running and 8 waiting requests, an API key."""
    from server_utils import SERVER_KEY, ServerProcess

    proc = ServerProcess("--model", str(checkpoint_dir("llama")), "--served-model-name", "tiny",
                         "--max-num-seqs", "16", "--max-num-waiting", "8", "--max-model-len", "512",
                         "--api-key", SERVER_KEY)
    yield proc
    proc.stop()
