"""Free TCP ports for the Ray and MLflow processes the tests start, so that they never collide with
another Ray or server on the machine."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_flags(*names: str) -> list[str]:
    """``--NAME-port=P`` for each name, each P free: e.g. port_flags("dashboard") for `ray start`."""
    return [f"--{name}-port={free_port()}" for name in names]
