"""TEST-ONLY fault injection: ``TANDEM_FAULT_INJECT`` makes chosen calls inside the server fail, so the
tests can prove that a fault ends the affected requests with an error and never hangs the server.

Unset (the default), nothing is wrapped and nothing costs anything. Set, it is a comma-separated
list of ``SITE@N`` (raise on the N-th call of that site, once), ``SITE@N+`` (on every call from the
N-th on) or ``SITE@N:hang`` (block forever on the N-th call: a stuck device). Sites:

- ``schedule``: planning a step (``Scheduler.schedule``, in the engine-core process)
- ``device``: collecting a step from the device (``Worker.collect``, after the real collect)
- ``update``: applying a step's sampled tokens to request state (``Scheduler.update``)
- ``output``: the API process's output processing (detokenization, stop strings)

Calls are counted only while the engine has work, so ``device@5`` fails the 5th step collected."""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

ENV_VAR = "TANDEM_FAULT_INJECT"
CORE_SITES = ("schedule", "device", "update")
API_SITES = ("output",)


class InjectedFault(RuntimeError):
    """Raised by the test hook; never by the engine itself."""


@dataclass(frozen=True)
class Fault:
    site: str
    at: int  # 1-based call number
    persistent: bool = False  # every call from ``at`` on
    hang: bool = False


def parse(spec: str) -> list[Fault]:
    """``"device@5,schedule@9+,update@3:hang"`` -> faults; ValueError on anything else."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        site, _, rest = item.partition("@")
        rest, _, mode = rest.partition(":")
        persistent = rest.endswith("+")
        count = rest.rstrip("+")
        if site not in CORE_SITES + API_SITES or not count.isdigit() or int(count) < 1 or mode not in ("", "hang"):
            raise ValueError(f"{ENV_VAR}: cannot read {item!r} (SITE@N, SITE@N+ or SITE@N:hang; "
                             f"sites {CORE_SITES + API_SITES})")
        faults.append(Fault(site, int(count), persistent, mode == "hang"))
    return faults


def from_env(sites: tuple[str, ...]) -> list[Fault]:
    return [f for f in parse(os.environ.get(ENV_VAR, "")) if f.site in sites]


def _fires(fault: Fault, call: int) -> bool:
    return call == fault.at or (fault.persistent and call > fault.at)


def _wrap(owner: Any, attr: str, faults: list[Fault], before: bool) -> Callable[[], None]:
    """Replace ``owner.attr`` with a counting wrapper (``before``: fail instead of the call, else after
    it); returns what puts the original back."""
    real: Callable[..., Any] = getattr(owner, attr)
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        result = None if before else real(*args, **kwargs)
        for fault in faults:
            if _fires(fault, calls[0]):
                _trigger(fault, calls[0])
        return real(*args, **kwargs) if before else result

    setattr(owner, attr, wrapper)
    return lambda: delattr(owner, attr)  # the instance attribute goes; the class's method shows again


def _trigger(fault: Fault, call: int) -> None:
    log.warning("injecting a fault at %s call %d (%s)", fault.site, call, "hang" if fault.hang else "raise")
    if fault.hang:
        threading.Event().wait()
    raise InjectedFault(f"injected fault at {fault.site} call {call}")


def install_core_faults(core: Any, faults: list[Fault]) -> Callable[[], None]:
    """Wrap the engine core's sites named in ``faults`` (an ``EngineCore``); returns the undo."""
    targets = {"schedule": (core.scheduler, "schedule", True), "device": (core.worker, "collect", False),
               "update": (core.scheduler, "update", True)}
    undo = [_wrap(owner, attr, chosen, before) for site, (owner, attr, before) in targets.items()
            if (chosen := [f for f in faults if f.site == site])]

    def remove() -> None:
        for u in undo:
            u()

    return remove


def install_api_faults(output_processor: Any, faults: list[Fault]) -> None:
    """Wrap the API process's output processing (an ``OutputProcessor``)."""
    chosen = [f for f in faults if f.site == "output"]
    if chosen:
        _wrap(output_processor, "process", chosen, True)
