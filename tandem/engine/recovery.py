"""Recovery after an exception inside ``EngineCore.step`` (planning, the device, or applying a step's
output), for a caller that wants to keep serving.

An exception can leave a step submitted but never collected, a sequence half-scheduled, or tokens
appended whose deltas were lost. So, like ``EngineCore.abort_all``: wait for the device, drop every
step in flight, and end each request that a launched step touched (running ones, and preempted ones
whose token was still in flight). Requests that never ran keep their place and run normally. Then
the books must balance (every KV block and next-token row free that no remaining request holds); if
they do not, or the device cannot be drained, the core is not trustworthy any more: ``CoreStateError``
tells the caller to declare it dead rather than serve on with leaked or corrupt state."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tandem.engine.core import EngineCore
from tandem.engine.scheduler import Scheduler
from tandem.engine.sequence import Sequence, SeqStatus


class CoreStateError(RuntimeError):
    """The core cannot be trusted after a failure: stop it instead of serving on."""


def recover(core: EngineCore, waiting_for: Iterable[str], reason: str = "error") -> list[str]:
    """After ``core.step()`` raised: end what the failure touched. Returns those of ``waiting_for``
    (the requests the caller still expects an end for) that have now ended without one being
    reported: the touched ones, and any whose finish was in the deltas the exception discarded."""
    end_touched_requests(core, reason)
    return [rid for rid in waiting_for if rid not in core.scheduler.requests]


def end_touched_requests(core: EngineCore, reason: str = "error") -> list[str]:
    """Drain, drop the steps in flight, end the requests they touched; returns the ended ids."""
    try:
        core.worker.drain()
    except Exception as exc:  # noqa: BLE001 - whatever the device says, it cannot be trusted now
        raise CoreStateError(f"the device could not be drained after a failed step ({type(exc).__name__})") from exc
    core.in_flight.clear()
    scheduler = core.scheduler
    touched = [rid for rid, seq in scheduler.requests.items() if _touched(seq)]
    try:
        for rid in touched:
            scheduler.finish(rid, reason)
        scheduler.all_steps_done()  # nothing is in flight: every deferred release is due
        # a cached block may have been registered for K/V the failed step never wrote
        scheduler.blocks.reset_cache()
    except Exception as exc:  # noqa: BLE001 - the queues are inconsistent (e.g. a half-admitted sequence)
        raise CoreStateError(f"the scheduler's state is inconsistent after a failed step ({type(exc).__name__})") \
            from exc
    check_accounting(scheduler)
    return touched


def _touched(seq: Sequence) -> bool:
    """A launched step holds some of its state: it ran, or its preempted token is still pending."""
    return (seq.status is not SeqStatus.WAITING or seq.num_pending > 0 or seq.num_computed > 0
            or bool(seq.block_ids) or seq.row is not None)


def check_accounting(scheduler: Scheduler) -> None:
    """Every KV block and row is either free or held by a remaining request (as many references as
    holders, since prefix caching shares blocks); nothing runs."""
    holders = Counter(b for seq in scheduler.requests.values() for b in seq.block_ids)
    held_blocks = len(holders)
    if any(scheduler.blocks.ref_count(b) != n for b, n in holders.items()):
        raise CoreStateError("KV block reference counts do not match their holders after a failed step")
    usable_blocks = scheduler.blocks.num_blocks - 1  # block 0 is reserved
    held_rows = sum(seq.row is not None for seq in scheduler.requests.values())
    if scheduler.running or scheduler.blocks.num_free + held_blocks != usable_blocks \
            or scheduler.rows.num_free + held_rows != scheduler.rows.num_rows:
        raise CoreStateError(f"KV accounting does not balance after a failed step: {scheduler.blocks.num_free} "
                             f"of {usable_blocks} blocks and {scheduler.rows.num_free} of "
                             f"{scheduler.rows.num_rows} rows free, {len(scheduler.running)} still running")
