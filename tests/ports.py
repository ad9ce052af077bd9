"""Free TCP ports for the Ray and MLflow processes the tests start, so that they never collide with
another Ray or server on the machine, nor with each other.

A port is free when the kernel hands it out for an ephemeral bind, but once that socket closes the kernel
may hand out the same number again: two flags of one `ray start` once got the same port that way
(``metrics_export`` and ``runtime_env_agent``, and Ray refused to start). So every port handed out in
this process is remembered and never handed out twice.
"""

from __future__ import annotations

import socket

_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before by this process."""
    held = []
    try:
        while True:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            held.append(sock)  # kept bound until the end, so the kernel cannot return it again
            port = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    finally:
        for sock in held:
            sock.close()


def port_flags(*names: str) -> list[str]:
    """``--NAME-port=P`` for each name, each P free and distinct: e.g. port_flags("dashboard")."""
    return [f"--{name}-port={free_port()}" for name in names]
