"""Where the HTTP face listens: --http-port auto (the default) is --port + 1000, so two
servers started as the quickstart starts them (the second with --port 50052) both come up and
both answer HTTP; 0 is any free port (reported at start-up), off none; the setting comes from
the flag, CLIPSERVE_HTTP_PORT or clipserve.toml like every other."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from clipserve_server.config_loaders import load_config
from clipserve_server.utils.config import HTTP_PORT_OFFSET, ServerConfig

from ..conftest import ServerProcess

pytestmark = pytest.mark.cost(0.45)  # its CPU cost among the files (tests/conftest.py)


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def two_free_neighbours() -> int:
    """A port P with P, P + 1 and their HTTP ports (+ 1000) free, as 50051/50052 are on a
    quiet machine."""
    for port in range(52000, 60000, 7):
        if all(_free(p) for p in (port, port + 1, port + HTTP_PORT_OFFSET, port + 1 + HTTP_PORT_OFFSET)):
            return port
    pytest.skip("no two neighbouring free ports")


def embeds(http_port: int) -> bool:
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/v1/embeddings",
        data=json.dumps({"input": "hello"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status == 200 and len(json.load(response)["data"]) == 1


def test_two_servers_started_as_the_quickstart_shows_both_answer_http():
    port = two_free_neighbours()
    servers = [ServerProcess(["--model", "fake"], port=p, wait=False) for p in (port, port + 1)]
    try:
        for server, grpc_port in zip(servers, (port, port + 1)):
            server.wait_ready()
            assert server.port == grpc_port and server.http_port == grpc_port + HTTP_PORT_OFFSET
            assert embeds(server.http_port)
    finally:
        for server in servers:
            assert server.terminate() == 0, "".join(server.log)


def test_off_serves_no_http_and_0_any_free_port():
    server = ServerProcess(["--model", "fake", "--http-port", "off"])
    try:
        assert server.http_port == 0 and not any("HTTP on" in line for line in server.log)
    finally:
        server.terminate()
    server = ServerProcess(["--model", "fake"], env={"CLIPSERVE_HTTP_PORT": "0"}, port=0)
    try:
        assert server.http_port and embeds(server.http_port)
    finally:
        server.terminate()


def test_the_setting_reads_from_flag_environment_and_file(tmp_path):
    assert ServerConfig().resolved_http_port == 51051 and ServerConfig(port=50052).resolved_http_port == 51052
    assert ServerConfig(port=0).resolved_http_port == 0  # --port 0: a free one for HTTP too
    config = tmp_path / "clipserve.toml"
    config.write_text("[server]\nhttp_port = 8080\n")
    assert load_config(["--config", str(config)], environ={}).resolved_http_port == 8080
    assert load_config([], environ={"CLIPSERVE_HTTP_PORT": "off"}).resolved_http_port is None
    assert load_config(["--http-port", "9000"], environ={"CLIPSERVE_HTTP_PORT": "off"}).resolved_http_port == 9000
    for bad in ("eighty", "70000", "-1"):
        with pytest.raises(ValueError, match="http_port"):
            ServerConfig(http_port=bad)
    with pytest.raises(ValueError, match="--http-port"):
        ServerConfig(port=65000)  # auto would be past 65535
