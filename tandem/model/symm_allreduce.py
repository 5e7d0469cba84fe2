"""A one-shot all-reduce over symmetric memory for the small messages of decode steps.

NCCL's all-reduce costs about 20 us per call at decode sizes (32 rows x 8192 on NVLink), and a
tensor-parallel step makes two per layer: 3 ms of a 70B step on two GPUs. Here every rank copies
its partial sums into a buffer that all ranks map (torch's symmetric memory: P2P, no NVLink
multicast), waits at a barrier, and reads and adds all ranks' buffers in rank order, so every rank
gets the same sum in one kernel. For two ranks the sum is exactly NCCL's (a + b, rounded once).
Larger messages (prefill) and anything this cannot take stay on NCCL. ``TANDEM_TP_ALLREDUCE=nccl``
turns it off."""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from tandem.switches import switch

logger = logging.getLogger(__name__)

MAX_BYTES = 1 << 20  # one-shot reads every rank's whole message: past ~1 MB NCCL's ring is faster


class OneShotAllReduce:
    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.buffer = symm_mem.empty(MAX_BYTES // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def takes(self, t: torch.Tensor) -> bool:
        return t.dtype == self.buffer.dtype and t.is_contiguous() and t.numel() <= self.buffer.numel()

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        staging = self.buffer[:t.numel()].view(t.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy(staging, t, "sum", self.group_name)


_used_in_process = False


def make_one_shot(group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype) -> OneShotAllReduce | None:
    """The one-shot all-reduce if this machine supports it and it sums like NCCL; None otherwise.
    Only the first tensor-parallel engine of a process takes it: symmetric memory set up for a
    group stays bound to it, and a later group (the same ranks' next engine) would wait on the old
    one; the ranks agree on this before any of them sets anything up."""
    global _used_in_process
    if device.type != "cuda" or switch("TANDEM_TP_ALLREDUCE") == "nccl":
        return None
    willing = torch.tensor([int(not _used_in_process)], device=device)
    dist.all_reduce(willing, op=dist.ReduceOp.MIN, group=group)
    if not willing.item():
        logger.info("not the first tensor-parallel engine of this process: NCCL for every all-reduce")
        return None
    _used_in_process = True
    try:
        op = OneShotAllReduce(group, device, dtype)
        probe = torch.randn(7, 96, device=device, generator=torch.Generator(device).manual_seed(
            dist.get_rank(group))).to(dtype)
        want = probe.clone()
        dist.all_reduce(want, group=group)
        ok = torch.equal(op(probe), want)
    except Exception as exc:  # noqa: BLE001 - any failure: NCCL serves every reduce
        logger.warning("one-shot all-reduce unavailable (%s: %s); NCCL for every all-reduce",
                       type(exc).__name__, exc)
        return None
    # every rank must choose alike, or the collectives would not match
    agreed = torch.tensor([int(ok)], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    if not agreed.item():
        logger.warning("one-shot all-reduce differs from NCCL's on this machine; NCCL for every all-reduce")
        return None
    logger.info("one-shot all-reduce over symmetric memory for messages up to %d KiB", MAX_BYTES >> 10)
    return op
