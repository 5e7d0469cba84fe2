"""TEST-ONLY fault injection: ``TANDEM_FAULT_INJECT`` makes chosen calls inside the server fail, so the
tests can prove that a fault ends the affected requests with an error and never hangs the server.

Unset (the default), nothing is wrapped and nothing costs anything. Set, it is a comma-separated
list of ``SITE@N`` (raise on the N-th call of that site, once), ``SITE@N+`` (on every call from the
N-th on), ``SITE@N:hang`` (block forever on the N-th call: a stuck device) or ``SITE@N:stallS``
(block S seconds, then go on without an error: in the API process, an event loop held up). Sites:

- ``schedule``: planning a step (``Scheduler.schedule``, in the engine-core process)
- ``device``: collecting a step from the device (``Worker.collect``, after the real collect)
- ``update``: applying a step's sampled tokens to request state (``Scheduler.update``)
- ``output``: the API process's output processing (detokenization, stop strings)
- ``send``: the API process sending a message to the core (requests, aborts), on its event loop;
  ``:stallS`` only

Calls are counted only while the engine has work, so ``device@5`` fails the 5th step collected."""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

ENV_VAR = "TANDEM_FAULT_INJECT"
CORE_SITES = ("schedule", "device", "update")
API_SITES = ("output", "send")
_MODE = re.compile(r"|hang|stall(\d+(?:\.\d*)?)")


class InjectedFault(RuntimeError):
    """Raised by the test hook; never by the engine itself."""


@dataclass(frozen=True)
class Fault:
    site: str
    at: int  # 1-based call number
    persistent: bool = False  # every call from ``at`` on
    hang: bool = False
    stall_s: float = 0.0  # block this long, then carry on (no error)


def parse(spec: str) -> list[Fault]:
    """``"device@5,schedule@9+,update@3:hang,send@2:stall4"`` -> faults; ValueError on anything else."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        site, _, rest = item.partition("@")
        rest, _, mode = rest.partition(":")
        persistent = rest.endswith("+")
        count = rest.rstrip("+")
        known = _MODE.fullmatch(mode)
        stall_s = float(known.group(1) or 0) if known else 0.0
        if (site not in CORE_SITES + API_SITES or not count.isdigit() or int(count) < 1 or known is None
                or mode.startswith("stall") and stall_s <= 0 or site == "send" and not stall_s):
            raise ValueError(f"{ENV_VAR}: cannot read {item!r} (SITE@N, SITE@N+, SITE@N:hang or SITE@N:stallS; "
                             f"sites {CORE_SITES + API_SITES}; send takes :stallS only)")
        faults.append(Fault(site, int(count), persistent, mode == "hang", stall_s))
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
    what = "hang" if fault.hang else f"stall {fault.stall_s:g} s" if fault.stall_s else "raise"
    log.warning("injecting a fault at %s call %d (%s)", fault.site, call, what)
    if fault.stall_s:
        time.sleep(fault.stall_s)
        return
    if fault.hang:
        threading.Event().wait()
    raise InjectedFault(f"injected fault at {fault.site} call {call}")


def install_core_faults(core: Any, faults: list[Fault]) -> Callable[[], None]:
    """Wrap the engine core's sites named in ``faults`` (an ``EngineCore``); returns the undo."""
    return _install({"schedule": (core.scheduler, "schedule", True), "device": (core.worker, "collect", False),
                     "update": (core.scheduler, "update", True)}, faults)


def install_api_faults(output_processor: Any, channel: Any, faults: list[Fault]) -> Callable[[], None]:
    """Wrap the API process's output processing (an ``OutputProcessor``) and its sends to the core
    (a ``CoreChannel``); returns the undo."""
    return _install({"output": (output_processor, "process", True), "send": (channel, "send_encoded", True)}, faults)


def _install(targets: dict[str, tuple[Any, str, bool]], faults: list[Fault]) -> Callable[[], None]:
    """``targets``: site -> (owner, attribute, fail before the call)."""
    undo = [_wrap(owner, attr, chosen, before) for site, (owner, attr, before) in targets.items()
            if (chosen := [f for f in faults if f.site == site])]

    def remove() -> None:
        for u in undo:
            u()

    return remove
