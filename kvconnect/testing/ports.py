"""Free TCP ports for test servers: outside the kernel's ephemeral range, never handed out twice
by one process."""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

from kvconnect.testing.procs import HOST, ServerError

_handed_out: set[int] = set()
_port_lock = threading.Lock()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports bound to 0 and for outgoing connections."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _candidate_ports(n: int) -> range:
    """Where test ports are drawn from: below the ephemeral range. A port found free by binding
    to 0 lies inside it, where any process's outgoing connection or own bind-to-0 (vLLM's
    internal sockets, on servers that start for minutes) may take it before our server binds it."""
    eph_lo, eph_hi = ephemeral_range()
    if eph_lo - 10000 >= 1000 + n:
        return range(10000, eph_lo - n)
    return range(eph_hi + 1, 65535 - n)


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    """A TCP port that is free now, outside the ephemeral range, and not handed out before by
    this process."""
    return free_port_range(1, host)


def free_port_range(n: int, host: str = HOST) -> int:
    """A base port with ``n`` consecutive ports free after it (e.g. a side channel for each TP
    rank at ``base + rank``), none handed out before by this process."""
    candidates = _candidate_ports(n)
    with _port_lock:
        for _ in range(500):
            base = random.choice(candidates)
            ports = range(base, base + n)
            if any(p in _handed_out for p in ports):
                continue
            if all(_bindable(host, p) for p in ports):
                _handed_out.update(ports)
                return base
    raise ServerError(f"could not find {n} consecutive free ports in {candidates}")
