"""The engine cores behind one API process: one with ``--data-parallel-size 1`` (the default), N
otherwise, each its own process with its own channel, watchdog and stats; ``EngineClient`` routes
each engine request to one of them (``dp_router``).

Each core takes its own devices: on CUDA, core i sees ``CUDA_VISIBLE_DEVICES`` entries
``[i * tp, (i + 1) * tp)`` (``tp``: its tensor-parallel size) of the visible ones, renumbered from
0, so its ranks use ``cuda:0..tp-1`` as with one core. All cores are started before any is waited
for, so they load their weights at the same time."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace

import msgspec

from tandem.config import EngineConfig
from tandem.engine.kv_events import DP_RANK_ENV
from tandem.server.channel import CoreChannel, CoreStartupError
from tandem.engine.sequence import EngineRequest
from tandem.server.dp_router import PrefixRouter
from tandem.server.messages import Ready, Stats
from tandem.server.watchdog import CoreWatchdog

log = logging.getLogger(__name__)


@dataclass(eq=False)
class CoreLink:
    """One engine core as the API process sees it."""

    index: int
    channel: CoreChannel
    info: Ready
    num_waiting_reported: int = 0  # the core's last reported queue (it counts what is KV-bound)
    open: int = 0  # engine requests routed here and not yet ended
    waiting_since: float = field(default_factory=time.monotonic)  # when requests last started waiting here
    watchdog: CoreWatchdog | None = None
    dead: bool = False

    @property
    def alive(self) -> bool:
        return self.channel.process.is_alive() and not self.channel.closed


def core_devices(config: EngineConfig, count: int, environ: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The environment each core adds to its own: its rank (for its KV-cache events' endpoint) and,
    on CUDA, ``CUDA_VISIBLE_DEVICES``; nothing for one core."""
    if count == 1:
        return [{}]
    ranks = [{DP_RANK_ENV: str(i)} for i in range(count)]
    if (config.device or "cuda").startswith("cpu"):
        return ranks
    if config.device not in (None, "cuda"):
        raise ValueError(f"--device {config.device} names one GPU, but --data-parallel-size {count} gives each "
                         "engine core its own: give --device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES")
    tp = config.tensor_parallel_size
    visible = (environ if environ is not None else os.environ).get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(count * tp)]
    if len(devices) < count * tp:
        raise ValueError(f"--data-parallel-size {count} x --tensor-parallel-size {tp} needs {count * tp} GPUs; "
                         f"CUDA_VISIBLE_DEVICES lists {len(devices)} ({visible})")
    return [{**ranks[i], "CUDA_VISIBLE_DEVICES": ",".join(devices[i * tp:(i + 1) * tp])} for i in range(count)]


def core_config(config: EngineConfig, count: int) -> EngineConfig:
    """Each core's config: the machine's default grammar workers (``structured_output_workers`` not
    given) shared among the cores, not started by each one (N cores x 8 processes, each importing
    torch, would crowd the machine's CPUs and memory)."""
    if count == 1 or config.structured_output_workers is not None:
        return config
    return replace(config, structured_output_workers=config.grammar_workers // count)


def spawn_cores(config: EngineConfig, count: int, log_level: int, api_peers: int = 0) -> list[CoreChannel]:
    """Start every core (they load their weights meanwhile); ``wait_cores`` waits for them.
    ``api_peers``: further API processes each core will serve too (``dp_api``)."""
    if count < 1:
        raise ValueError(f"--data-parallel-size must be >= 1, not {count}")
    envs = core_devices(config, count)
    config = core_config(config, count)
    channels: list[CoreChannel] = []
    try:
        for env in envs:
            channels.append(CoreChannel(config, log_level, env=env, peers=api_peers))
    except BaseException:
        close_all(channels)
        raise
    return channels


def wait_cores(channels: list[CoreChannel]) -> list[CoreLink]:
    """Wait until each core is ready; any failure stops them all and raises ``CoreStartupError``
    (naming the core when there are several)."""
    links = []
    try:
        for index, channel in enumerate(channels):
            try:
                links.append(CoreLink(index, channel, channel.wait_ready()))
            except CoreStartupError as exc:
                raise CoreStartupError(str(exc) if len(channels) == 1 else f"engine core {index}: {exc}") from exc
    except BaseException:
        close_all(channels)
        raise
    return links


def close_all(channels: list[CoreChannel]) -> None:
    for channel in channels:
        channel.close()


class CoreSet:
    """The cores, their load as this process sees it, and the routing of engine requests to them."""

    def __init__(self, cores: list[CoreLink], prefix_caching: bool, shared: bool = False) -> None:
        """``shared``: other API processes send to these cores too (their load is in the stats only)."""
        self.cores = cores
        self.shared = shared
        first = cores[0].info
        # what the API checks requests against: one core's limits, all cores' capacity
        self.info = msgspec.structs.replace(first, max_num_seqs=sum(c.info.max_num_seqs for c in cores),
                                            num_kv_blocks=sum(c.info.num_kv_blocks for c in cores))
        self.router = PrefixRouter(len(cores), first.block_size, max(self.info.num_kv_blocks, 1),
                                   prefix_aware=prefix_caching and len(cores) > 1)

    def choose(self, requests: list[EngineRequest]) -> list[CoreLink]:
        """A core for each engine request; nothing is counted until ``opened``."""
        if len(self.cores) == 1:
            return [self.cores[0]] * len(requests)
        chosen = []
        for request in requests:  # each counted at once, so the next one sees it (n > 1, many prompts)
            chosen.append(self.cores[self.router.choose(request.prompt_token_ids).core])
            self.router.sent(chosen[-1].index)
        for core in chosen:
            self.router.done(core.index)
        return chosen

    def opened(self, core: CoreLink) -> None:
        if core.open == 0:
            core.waiting_since = time.monotonic()  # the watchdog's clock starts when requests start waiting
        core.open += 1
        self.router.sent(core.index)

    def closed(self, core: CoreLink) -> None:
        core.open -= 1
        self.router.done(core.index)

    def on_stats(self, core: CoreLink, stats: Stats) -> None:
        core.num_waiting_reported = stats.num_waiting
        self.router.kv_usage(core.index, stats.kv_usage)
        if self.shared:
            self.router.reported(core.index, stats.num_waiting + stats.num_running)

    def name(self, core: CoreLink) -> str:
        """How messages name a core: "engine core" alone, "engine core 1" among several."""
        return "engine core" if len(self.cores) == 1 else f"engine core {core.index}"

    @property
    def alive(self) -> bool:
        return all(core.alive for core in self.cores)

    def health_problem(self) -> str | None:
        for core in sorted(self.cores, key=lambda c: not c.dead):  # one that died first
            if core.dead or not core.alive:
                return f"{self.name(core)} is not running"
        for core in self.cores:
            if core.watchdog is not None and not core.watchdog.responsive():
                return f"{self.name(core)} is not responding"
        return None

    def close(self) -> None:
        """Stop every core (idempotent; also what a failed start needs)."""
        close_all([core.channel for core in self.cores])
