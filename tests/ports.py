"""Free loopback ports for tests that start real servers."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that the OS reports free right now.

    The port is released before returning, so another process could take it in
    between; tests bind it at once, which makes that race rare enough.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
