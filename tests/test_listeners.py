"""Every socket a ``tandem serve`` process tree listens on is bound to loopback, at tensor-parallel size
1 and 2 (docs/tensor_parallel.md, "Sockets"): read from /proc (each process's socket inodes, matched
against the LISTEN entries of /proc/net/tcp and tcp6). One server per size, on the CPU (gloo).

And the multi-node path (torchrun) meets at the user's MASTER_ADDR over the user's interfaces, while
a group spawned on one machine meets on 127.0.0.1 with gloo and NCCL confined to loopback."""
from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch.distributed as dist

from server_utils import ServerProcess

from tandem.parallel import group as tp_group
from tandem.parallel.env import LOOPBACK_SOCKETS, rank_env
from tandem.parallel.launch import loopback_store

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


@dataclass(frozen=True)
class Listener:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp's address: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_addr)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def _listening_by_inode() -> dict[str, Listener]:
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == _LISTEN:
                addr, port = fields[1].split(":")
                found[fields[9]] = Listener(_address(addr), int(port, 16))
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def listeners_of_tree(root: int) -> dict[int, list[Listener]]:
    """Every process of ``root``'s tree (itself and all descendants), with the TCP sockets it listens on."""
    listening, children = _listening_by_inode(), _children()
    result, todo = {}, [root]
    while todo:
        pid = todo.pop()
        result[pid] = sorted((listening[i] for i in _socket_inodes(pid) if i in listening), key=str)
        todo.extend(children.get(pid, []))
    return result


def _role(pid: int, server: ServerProcess) -> str:
    if pid == server.proc.pid:
        return "api"
    if pid == server.core_pid():
        return "core"
    return "rank 1" if "tandem.parallel.follower" in _cmdline(pid) else "other"


def _environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(e.split("=", 1) for e in entries if "=" in e)


def _public_interface() -> str:
    """The interface of this machine's default route: where gloo would listen if told to (or if the host
    name resolved there, as on most machines; here it may resolve to loopback)."""
    for line in Path("/proc/net/route").read_text().splitlines()[1:]:
        iface, destination = line.split()[:2]
        if destination == "00000000":
            return iface
    return "eth0"


@dataclass
class Served:
    by_role: dict[str, list[Listener]]  # api, core, rank 1, other
    port: int  # HTTP
    listing: str  # by pid, for failure messages
    log: str
    rank1_env: dict[str, str]  # the spawned follower's environment (tp=2)


def _serve_and_list(tp: int) -> Served:
    """Start a server at ``tp``, list its tree's listeners, complete one request, stop it. Its environment
    names a public interface for gloo and NCCL, as a user's multi-node setup would: a group on one
    machine must listen on loopback all the same."""
    with pytest.MonkeyPatch.context() as mp:
        for name in LOOPBACK_SOCKETS:
            mp.setenv(name, _public_interface())
        server = ServerProcess("--model", "random:tiny", "--device", "cpu", "--dtype", "float32", "--max-model-len",
                               "256", "--tensor-parallel-size", str(tp))
    try:
        found = listeners_of_tree(server.proc.pid)
        by_role: dict[str, list[Listener]] = {}
        rank1_env = {}
        for pid, socks in found.items():
            role = _role(pid, server)
            by_role.setdefault(role, []).extend(socks)
            if role == "rank 1":
                rank1_env = _environ(pid)
        reply = httpx.post(server.url + "/v1/completions", timeout=60,
                           json={"model": "random:tiny", "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True})
    finally:
        server.stop()
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 4
    return Served(by_role, int(server.url.rsplit(":", 1)[1]), str(found), server.log(), rank1_env)


def test_one_process_server_listens_only_on_its_http_port_on_loopback():
    served = _serve_and_list(1)
    assert served.by_role["api"] == [Listener(ipaddress.ip_address("127.0.0.1"), served.port)], served.listing
    assert not any(socks for role, socks in served.by_role.items() if role != "api"), served.listing


def test_tp2_server_listens_only_on_loopback_and_serves():
    """The HTTP port (API process); rank 0 (the engine core): the rendezvous store and one gloo socket per
    group (world, control); rank 1: its two gloo sockets. Nothing else, and every one on 127.0.0.1."""
    served = _serve_and_list(2)
    loopback, listing = ipaddress.ip_address("127.0.0.1"), served.listing
    assert served.by_role["api"] == [Listener(loopback, served.port)], listing
    assert all(s.address == loopback for socks in served.by_role.values() for s in socks), listing
    store = Listener(loopback, int(served.rank1_env["MASTER_PORT"]))
    assert store in served.by_role["core"], listing
    assert (len(served.by_role["core"]), len(served.by_role["rank 1"])) == (3, 2), listing
    assert not any(served.by_role.get("other", [])), listing
    assert {k: served.rank1_env[k] for k in LOOPBACK_SOCKETS} == LOOPBACK_SOCKETS
    assert f"GLOO_SOCKET_IFNAME={_public_interface()} is overridden by lo" in served.log, served.log


def test_proc_addresses_are_decoded_in_host_order():
    assert [str(_address(h)) for h in ("0100007F", "00000000", "020200C0", "0" * 24 + "01000000", "0" * 32)] == \
        ["127.0.0.1", "0.0.0.0", "192.0.2.2", "::1", "::"]


def test_the_rendezvous_store_listens_on_loopback_only():
    """torch's TCPStore alone binds ``::`` whatever host it is given: the group's store gets a socket bound
    to 127.0.0.1, and still serves its clients."""
    store = loopback_store(1)
    mine = listeners_of_tree(os.getpid())[os.getpid()]
    assert [s for s in mine if s.port == store.port] == [Listener(ipaddress.ip_address("127.0.0.1"), store.port)]
    store.set("k", "v")
    assert dist.TCPStore("127.0.0.1", store.port, 1, timeout=datetime.timedelta(seconds=10)).get("k") == b"v"


@pytest.fixture
def environ():
    """join writes the process environment (interfaces, multicast switches): put it back afterwards."""
    saved = dict(os.environ)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


class _Stop(Exception):
    """Raised by the stand-ins once they have seen how join meets the group."""


_TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "29511"}
_USERS_INTERFACES = {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "ib0"}


@pytest.mark.parametrize("env, expected", [
    # torchrun across machines: the user's address and interfaces, torchrun's store (env://)
    ({**_TORCHRUN, "MASTER_ADDR": "10.0.0.1"},
     {"init_method": "env://", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29511", **_USERS_INTERFACES}),
    # torchrun on one machine (a loopback MASTER_ADDR): the same rendezvous, sockets on loopback
    ({**_TORCHRUN, "MASTER_ADDR": "127.0.0.1"},
     {"init_method": "env://", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", **LOOPBACK_SOCKETS}),
    # a rank spawned by tandem on one machine: rank 0's store on 127.0.0.1, sockets on loopback
    ({**_TORCHRUN, "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "TANDEM_TP_SPAWNED": "1"},
     {"store": ("127.0.0.1", 29511), **LOOPBACK_SOCKETS}),
], ids=["torchrun-multi-node", "torchrun-loopback", "spawned"])
def test_a_rank_meets_where_it_was_told_over_the_interfaces_that_fit(environ, monkeypatch, caplog, env, expected):
    seen = {}

    def tcp_store(host, port, *args, **kwargs):
        seen.update(store=(host, port), **{k: os.environ.get(k) for k in LOOPBACK_SOCKETS})
        raise _Stop

    def init_process_group(backend, init_method=None, store=None, **kwargs):
        seen.update(init_method=init_method, **{k: os.environ.get(k) for k in
                                                ("MASTER_ADDR", "MASTER_PORT", *LOOPBACK_SOCKETS)})
        raise _Stop

    environ.pop("TANDEM_TP_SPAWNED", None)
    environ.update({**_USERS_INTERFACES, **env})
    monkeypatch.setattr(dist, "TCPStore", tcp_store)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with caplog.at_level(logging.WARNING), pytest.raises(_Stop):
        tp_group.join(rank_env())
    assert seen == expected
    overridden = "GLOO_SOCKET_IFNAME=eth0 is overridden by lo" in caplog.text
    assert overridden == (expected["GLOO_SOCKET_IFNAME"] == "lo"), caplog.text
