"""Free loopback ports for tests that start real servers."""

from __future__ import annotations

import socket

# Ports handed out by this process. A test often asks for several before it binds
# any (a whole config's worth), and the OS may report the same free port twice.
_given: set[tuple[str, int]] = set()
_TRIES = 100


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that the OS reports free right now, never one given before.

    The port is released before returning, so another process could take it in
    between; tests bind it at once, which makes that race rare enough.
    """
    for _ in range(_TRIES):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if (host, port) not in _given:
            _given.add((host, port))
            return port
    raise RuntimeError(f"no port on {host} that was not handed out already ({_TRIES} tries)")
