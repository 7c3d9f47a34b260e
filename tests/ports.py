"""Free TCP ports for the servers a test starts.

Picked below the kernel's ephemeral range: a port the kernel may hand out to any
process's ``bind(0)`` or outgoing connection could be taken between being picked here
and bound by the server it is for - the Temporal dev server takes its HTTP and metrics
ports that way, and once took the API's port in `up`'s test.
"""

from __future__ import annotations

import itertools
import random
import socket
from pathlib import Path

#: Where the search starts; the kernel's ephemeral range starts above it (Linux: 32768).
LOWEST = 20000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports nothing is bound to now."""
    candidates = random.sample(range(LOWEST, max(LOWEST + 1000, _ephemeral_start())), 1000)
    ports = list(itertools.islice(filter(_bindable, candidates), count))
    if len(ports) < count:
        raise RuntimeError(f"fewer than {count} free ports from {LOWEST} up")
    return ports


def free_port() -> int:
    return free_ports(1)[0]
