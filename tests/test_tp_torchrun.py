"""Multi-node launch: ``torchrun --nnodes 2 --nproc-per-node 1`` on one host, two "nodes" with a static
rendezvous on 127.0.0.1 (as two machines would use the first one's address), gloo on the CPU. Node 0
runs ``tandem generate``; node 1 runs the same command and, being rank 1, serves it. The output equals
a single process's, and both launchers exit 0 (the follower stops when rank 0's engine shuts down)."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tandem import LLM, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def communicate_all(procs: list[subprocess.Popen], timeout_s: float) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr) once all have exited, within ``timeout_s`` in all: a rank stuck in
    a collective fails the test instead of hanging it (every process is killed on the way out)."""
    deadline = time.monotonic() + timeout_s
    try:
        return [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            p.kill()


def _node(rank: int, port: int, args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "tandem.cli",
           *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_torchrun_nodes_generate_what_one_process_does(checkpoint_dir):
    path = str(checkpoint_dir("llama"))
    prompt = "The quick brown fox"
    args = ["generate", "--model", path, "--device", "cpu", "--dtype", "float64", "--tensor-parallel-size", "2",
            "--prompt", prompt, "--max-tokens", "16", "--ignore-eos", "--temperature", "0"]
    port = _free_port()
    nodes = [_node(rank, port, args) for rank in (0, 1)]
    outs = communicate_all(nodes, TIMEOUT_S)
    for node, (_, err) in zip(nodes, outs):
        assert node.returncode == 0, err[-3000:]
    expected = LLM(path, device="cpu", dtype="float64").generate(
        prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    assert outs[0][0] == expected + "\n"
    assert outs[1][0] == ""  # rank 1 prints nothing: it only serves rank 0's steps
