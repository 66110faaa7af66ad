"""Free loopback ports for test servers."""

from __future__ import annotations

import socket
from contextlib import ExitStack


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that are free now.

    All sockets stay bound until every port is chosen; asking one at a time can hand out
    the same port twice, since the kernel may reuse a port as soon as it is released.
    """
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]
