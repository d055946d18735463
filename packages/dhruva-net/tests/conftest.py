"""Fixtures that run a real ``dhruva server`` process on loopback or a unix socket."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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
