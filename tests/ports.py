"""Loopback ports for tests: free ones for process groups and servers, closed ones for dead servers."""

import socket


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
