"""scripts/install.sh on a machine without a GPU installs the CPU build of torch: from PyTorch's CPU
index when reachable, otherwise the pinned version from the configured index. Run against a stand-in
python that records the pip commands instead of installing anything."""
import functools
import http.server
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "install.sh"

STUB = f"""#!/bin/sh
# A python that has no torch, records pip calls, and runs anything else with the real python.
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" >> "$PIP_LOG"; exit 0; fi
if [ "$1" = "-c" ] && [ "$2" = "import torch" ]; then exit 1; fi
case "$2" in *"import torch"*) exit 1;; esac
exec {sys.executable} "$@"
"""


def _run(tmp_path: Path, index: str) -> list[str]:
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "pip.log"
    env = {**os.environ, "PYTHON": str(stub), "PIP_LOG": str(log), "TANDEM_TORCH_CPU_INDEX": index,
           "PATH": "/usr/bin:/bin"}  # no nvidia-smi
    proc = subprocess.run(["bash", str(SCRIPT), "test"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return log.read_text().splitlines()


@pytest.mark.skipif(Path("/usr/bin/nvidia-smi").exists(), reason="this checks the no-GPU path")
def test_cpu_machine_uses_the_cpu_wheel_index_when_reachable(tmp_path):
    index = tmp_path / "cpu-index"
    (index / "torch").mkdir(parents=True)
    (index / "torch" / "index.html").write_text("<a href='torch-2.13.0+cpu.whl'>torch</a>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(index))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # a stand-in index on loopback
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        calls = _run(tmp_path, url)
    finally:
        server.shutdown()
    assert calls[0] == f"-m pip install -q torch --index-url {url}"
    assert calls[1].startswith("-m pip install -q -e .[test]")


@pytest.mark.skipif(Path("/usr/bin/nvidia-smi").exists(), reason="this checks the no-GPU path")
def test_cpu_machine_falls_back_to_the_pinned_version(tmp_path):
    calls = _run(tmp_path, "http://127.0.0.1:9/")  # the discard port: nothing listens
    assert calls[0] == "-m pip install -q torch==2.13.0"
