"""Fixtures shared by the end-to-end tests: real ``dhruva server`` processes.

Servers listen on loopback only, on a port the system picks; every server a
test starts is stopped (SIGTERM, then SIGKILL) when the test ends.

Also, for dhruva-file's Durus interoperability tests (which run only with
``DHRUVA_DURUS_PYTHON`` set): when the whole suite runs (this file is then
loaded before any test is collected) and the variable is not set at all, a
Python with Durus 4.3 is made with ``uv`` in ``~/.cache/dhruva/durus-4.3``
(once; later runs reuse it) and the variable is pointed at it. Without
``uv``, a network or a C compiler, nothing is made and those tests skip; the
header of the test report says why. ``DHRUVA_DURUS_PYTHON=`` (empty) turns
the tests off.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Durus 4.3 builds on Python 3.13 but fails there (its Unpickler sets
#: persistent_load, read-only since 3.13): its interpreter must be older.
DURUS_PYTHONS = ">=3.11,<3.13"

#: Why there is no Python with Durus 4.3, or which one is used (report header).
_durus_status = ""


def _durus_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "dhruva" / "durus-4.3"


def _run_uv(*args: str) -> str | None:
    """Run ``uv ARGS``; return None, or what went wrong in one line."""
    uv = shutil.which("uv")
    if uv is None:
        return "uv is not on PATH"
    env = {**os.environ, "UV_HTTP_TIMEOUT": "20"}
    try:
        done = subprocess.run(
            [uv, *args], capture_output=True, text=True, timeout=300, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"uv {args[0]} failed: {error}"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no message)"]
        return f"uv {' '.join(args[:2])} failed: {lines[-1].strip()}"
    return None


def _has_durus(python: Path) -> bool:
    try:
        done = subprocess.run(
            [str(python), "-c", "import durus.connection, durus.file_storage"],
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def make_durus_python() -> tuple[str | None, str]:
    """Return a Python with Durus 4.3 (made once, cached), or None and why not."""
    target = _durus_cache()
    python = target / "bin" / "python"
    if _has_durus(python):
        return str(python), f"using {python}"

    # Build aside, then rename into place: other test runs may race.
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="durus-", dir=target.parent))
    try:
        failed = _run_uv("venv", "--quiet", "--python", DURUS_PYTHONS, str(scratch))
        failed = failed or _run_uv(
            "pip",
            "install",
            "--quiet",
            "--python",
            str(scratch / "bin" / "python"),
            "durus==4.3",
        )
        if failed:
            return None, failed
        if not _has_durus(scratch / "bin" / "python"):
            return None, f"Durus 4.3 installed in {scratch} does not import"
        # Another run may have made it meanwhile (or left a broken one).
        with contextlib.suppress(OSError):
            scratch.rename(target)
        if _has_durus(python):
            return str(python), f"made {python}"
        return None, f"{target} exists but has no working Durus 4.3; remove it"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    global _durus_status
    if "DHRUVA_DURUS_PYTHON" in os.environ:
        value = os.environ["DHRUVA_DURUS_PYTHON"]
        _durus_status = f"DHRUVA_DURUS_PYTHON={value}" if value else "turned off"
        return
    python, _durus_status = make_durus_python()
    if python is not None:
        os.environ["DHRUVA_DURUS_PYTHON"] = python


def pytest_report_header(config: pytest.Config) -> str:
    return f"Durus 4.3 interoperability tests: {_durus_status or 'not set up'}"


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


#: Runs ``python -m dhruva.cli ARGS`` with stderr on a pseudo-terminal.
OnATerminal = Callable[[list[str]], tuple[subprocess.CompletedProcess[str], bytes]]


@pytest.fixture
def on_a_terminal() -> OnATerminal:
    """Run a ``dhruva`` command as if its user watched stderr on a terminal.

    The command's stderr is a pseudo-terminal (what makes progress bars show);
    stdout is captured. Returns the finished process and every byte the
    terminal showed.
    """

    def run(args: list[str]) -> tuple[subprocess.CompletedProcess[str], bytes]:
        leader, follower = pty.openpty()
        try:
            result = subprocess.run(
                [sys.executable, "-m", "dhruva.cli", *args],
                stdout=subprocess.PIPE,
                stderr=follower,
                text=True,
                timeout=120,
            )
            os.close(follower)
            follower = -1
            seen = b""
            while True:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # EIO: the terminal was read to its end
                    break
                if not chunk:
                    break
                seen += chunk
        finally:
            if follower >= 0:
                os.close(follower)
            os.close(leader)
        return result, seen

    return run
