"""Where do the host's slow bursts come from? Runs one workload several times on one model load and
prints, per run: GPU idle over decode steps, the host thread's planning wall vs CPU time, its
involuntary context switches and minor page faults, and the system's NUMA-balancing counters.

    python3 scripts/host_bursts.py MODEL NUM_REQUESTS PROMPT MAX_TOKENS RUNS [--no-thp] [--bind-node N]

--no-thp turns transparent huge pages off for this process (prctl); --bind-node binds its memory
and CPUs to NUMA node N (which also takes its pages out of automatic NUMA balancing)."""
import argparse
import ctypes
import os
import sys
from pathlib import Path

from tandem import LLM
from tandem.bench.api import bench

PR_SET_THP_DISABLE, MPOL_BIND = 41, 2


def vmstat(*keys: str) -> dict[str, int]:
    rows = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return {k: int(rows.get(k, -1)) for k in keys}


def bind_node(node: int) -> None:
    cpus = Path(f"/sys/devices/system/node/node{node}/cpulist").read_text().strip()
    cores = set()
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    os.sched_setaffinity(0, cores)
    mask = ctypes.c_ulong(1 << node)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(238, MPOL_BIND, ctypes.byref(mask), 64) != 0:  # set_mempolicy on x86-64
        raise OSError(ctypes.get_errno(), "set_mempolicy")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model"), p.add_argument("n", type=int), p.add_argument("prompt", type=int)
    p.add_argument("max_tokens", type=int), p.add_argument("runs", type=int)
    p.add_argument("--no-thp", action="store_true"), p.add_argument("--bind-node", type=int)
    a = p.parse_args()
    if a.no_thp:
        ctypes.CDLL(None).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
    if a.bind_node is not None:
        bind_node(a.bind_node)
    keys = ("numa_hint_faults", "numa_pages_migrated", "thp_fault_alloc", "compact_stall", "pgfault")
    llm = LLM(a.model, max_num_seqs=a.n, max_model_len=a.prompt + a.max_tokens + 16)
    print("variant", " ".join(sys.argv[1:]), flush=True)
    for run in range(a.runs):
        before = vmstat(*keys)
        res = bench(a.model, modes=["async"], num_requests=a.n, prompt_len=a.prompt, max_tokens=a.max_tokens,
                    progress=False, llm=llm)["modes"]["async"]
        after = vmstat(*keys)
        h = res["host_thread"]
        print(f"run {run}: idle {res['gpu_idle_fraction']:.2%} decode {res['gpu_idle_fraction_decode']:.2%} "
              f"plan wall {h['plan_wall_ms']:.0f} cpu {h['plan_cpu_ms']:.0f} ms, preempted {h['preempted']}, "
              f"thread faults {h['page_faults']}; system " + " ".join(f"{k} +{after[k] - before[k]}" for k in keys),
              flush=True)


if __name__ == "__main__":
    main()
