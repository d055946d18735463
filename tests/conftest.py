"""Fixtures shared by the end-to-end tests: real ``dhruva server`` processes.

Servers listen on loopback only, on a port the system picks; every server a
test starts is stopped (SIGTERM, then SIGKILL) when the test ends.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: What the server prints once it listens.
READY = re.compile(r"ready on (\S+):(\d+)")


@dataclass
class Server:
    """A ``dhruva server`` process on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def options(self) -> list[str]:
        """The command-line options that reach this server."""
        return ["--host", self.host, "--port", str(self.port)]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """Stop the process (SIGTERM, then SIGKILL); return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


@pytest.fixture
def dhruva_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``dhruva server ARGS --host 127.0.0.1 --port 0`` processes on demand."""
    pytest.importorskip("dhruva.storage_server", reason="needs dhruva-net")
    started: list[Server] = []

    def start(*args: str) -> Server:
        log_path = tmp_path / f"server{len(started)}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "dhruva.cli", "server", *args]
                + ["--host", "127.0.0.1", "--port", "0"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while (match := READY.search(log_path.read_text(errors="replace"))) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                pytest.fail(f"the server did not start:\n{log_path.read_text()}")
            time.sleep(0.02)
        server = Server(process, match.group(1), int(match.group(2)), log_path)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
