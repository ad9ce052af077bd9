"""The test helpers' free ports: never the same port twice, even when the kernel would reuse one."""

import socket

from ports import free_port, port_flags


def test_no_port_is_handed_out_twice():
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_flags_of_one_command_get_distinct_bindable_ports():
    flags = port_flags("node-manager", "object-manager", "metrics-export", "runtime-env-agent")
    ports = [int(f.split("=")[1]) for f in flags]
    assert [f.split("=")[0] for f in flags] == ["--node-manager-port", "--object-manager-port",
                                                 "--metrics-export-port", "--runtime-env-agent-port"]
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
