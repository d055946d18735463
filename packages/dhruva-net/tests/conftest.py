"""Fixtures of the net tests: real ``dhruva server`` processes on loopback or a
unix socket, servers in a thread of the test process, and raw protocol
connections (``wire``) for clients that misbehave on purpose."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dhruva.client_storage import wait_for_server
from dhruva.net_protocol import (
    PROTOCOL_VERSION,
    frame,
    hello,
    parse_hello,
    socket_address,
)
from dhruva.storage import Storage
from dhruva.storage_server import StorageServer

#: `dhruva server`, through the core command line that loads the plugin.
SERVER_COMMAND = [sys.executable, "-m", "dhruva.cli", "server"]

#: A server of storages the command line cannot make (see serve_for_tests.py).
TEST_SERVER_COMMAND = [
    sys.executable,
    str(Path(__file__).with_name("serve_for_tests.py")),
]

READY = re.compile(r"ready on (\S+)")


@dataclass
class ServerProcess:
    """A server subprocess and what the tests need to reach it."""

    process: subprocess.Popen[bytes]
    address: tuple[str, int] | str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        """Stop the process (SIGTERM, then SIGKILL) and return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_server(
    log_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
    pass_fds: tuple[int, ...] = (),
    command: list[str] = SERVER_COMMAND,
) -> ServerProcess:
    """Start `dhruva server ARGS` and wait (generously) until it is listening.

    :param env: variables to add to the server's environment.
    :param prefix: a command line the server's command is appended to.
    :param pass_fds: file descriptors the server inherits.
    :param command: the server's command line, before ``args``.
    """
    log_file = open(log_path, "wb")  # noqa: SIM115 - the child writes it
    process = subprocess.Popen(
        [*prefix, *command, *args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        pass_fds=pass_fds,
    )
    log_file.close()
    deadline = time.monotonic() + 30
    while True:
        match = READY.search(log_path.read_text())
        if match:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                process.kill()
                process.wait()
            pytest.fail(f"server did not start:\n{log_path.read_text()}")
        time.sleep(0.02)
    text = match.group(1)
    host, _sep, port = text.rpartition(":")
    address: tuple[str, int] | str = (host, int(port)) if port.isdigit() else text
    return ServerProcess(process, address, log_path)


@pytest.fixture
def run_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start server processes on demand; every one is killed at teardown."""
    started: list[ServerProcess] = []

    def run(*args: str, **options: Any) -> ServerProcess:
        server = start_server(tmp_path / f"server{len(started)}.log", *args, **options)
        started.append(server)
        return server

    yield run
    for server in started:
        server.stop()


@pytest.fixture
def run_test_server(
    run_server: Callable[..., ServerProcess],
) -> Callable[..., ServerProcess]:
    """Start ``serve_for_tests.py ARGS`` processes, killed at teardown."""

    def run(*args: str, **options: Any) -> ServerProcess:
        return run_server(*args, command=TEST_SERVER_COMMAND, **options)

    return run


@pytest.fixture
def memory_server(run_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A server of a MemoryStorage on a free loopback port."""
    return run_server("--storage", "memory", "--port", "0")


@pytest.fixture
def socket_path() -> Iterator[str]:
    """A unix socket path short enough for the 108-byte limit."""
    with tempfile.TemporaryDirectory(prefix="dhruva-") as tmp:
        yield os.path.join(tmp, "server.sock")


@pytest.fixture
def start_failing() -> Callable[..., str]:
    """Return a function that runs a server that must fail to start."""
    return _start_failing


def _start_failing(*args: str, env: dict[str, str] | None = None) -> str:
    """Run `dhruva server ARGS`, which must fail to start; return its stderr."""
    done = subprocess.run(
        [*SERVER_COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode != 0, done.stderr
    return done.stderr


class Wire:
    """Raw protocol connections, for tests that speak the protocol by hand."""

    @staticmethod
    def connect(address: tuple[str, int] | str, timeout: float = 10.0) -> socket.socket:
        """A plain socket connected to ``address``."""
        family, target = socket_address(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(target)
        return sock

    @staticmethod
    def read_frame(sock: socket.socket) -> bytes | None:
        """Return the next payload, or None when the server closed the connection."""
        data = b""
        while len(data) < 4:
            chunk = sock.recv(4 - len(data))
            if not chunk:
                return None
            data += chunk
        (size,) = struct.unpack(">I", data)
        payload = b""
        while len(payload) < size:
            chunk = sock.recv(size - len(payload))
            assert chunk, "connection closed inside a frame"
            payload += chunk
        return payload

    @classmethod
    def shake_hands(cls, sock: socket.socket) -> None:
        """Send our hello and check the server's."""
        sock.sendall(frame(hello()))
        reply = cls.read_frame(sock)
        assert reply is not None and parse_hello(reply)[0] == PROTOCOL_VERSION


@pytest.fixture
def wire() -> type[Wire]:
    """Raw protocol connections (:class:`Wire`)."""
    return Wire


@pytest.fixture
def serve_in_thread() -> Iterator[Callable[..., StorageServer]]:
    """Serve storages from threads of this process; all are stopped at teardown.

    Call it as ``serve_in_thread(storage, address=..., **options)``; it returns
    the StorageServer once it accepts connections.
    """
    running: list[tuple[StorageServer, threading.Thread]] = []

    def serve(storage: Storage, **options: Any) -> StorageServer:
        server = StorageServer(storage, **options)
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        running.append((server, thread))
        wait_for_server(server.address, timeout=20)
        return server

    yield serve
    for server, thread in running:
        server.stop()
        thread.join(20)
        assert not thread.is_alive(), f"{server} did not stop"
