"""Free loopback ports for the servers a bench or a test starts.

The one definition of ``free_ports``: bench scripts import it as ``common.ports``; tests/helpers.py loads this file
by path (the tests must not need ``bench/`` to be importable), so it imports nothing but the standard library.
"""

from __future__ import annotations

import socket

HOST = "127.0.0.1"  # every server a bench starts listens on loopback only


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on loopback.

    All the sockets are bound before any is closed, so that the ports differ; a port may still be taken by
    someone else before the server binds it, which the callers accept (a server that cannot bind fails to start).
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
