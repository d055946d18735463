"""The Durus README's quick demo, with ``dhruva`` in place of ``durus``.

Real processes: a server started with ``dhruva -s``, clients that are
``dhruva -c`` processes with their commands piped on stdin, ``dhruva -s
--stop``, a server restarted on the same ``--file``, a unix socket through
``--address``. Where two clients must be open at the same moment (to see each
other's commits after ``abort()``, or to conflict), one of them is a
Connection over the library's ClientStorage in this process.

Only loopback addresses are used; every server started here is killed in a
finalizer.
"""

from __future__ import annotations

import importlib.util
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("dhruva.client_storage") is None:
    pytest.skip(
        "the demo needs dhruva-net's server and ClientStorage "
        "(`pip install dhruva-net`)",
        allow_module_level=True,
    )

from dhruva.connection import Connection  # noqa: E402

#: How long a server may take to start or stop (generous: CI machines are slow).
STARTUP_SECONDS = 30.0


def dhruva_command() -> list[str]:
    """The installed ``dhruva`` script, next to this interpreter."""
    script = Path(sys.executable).with_name("dhruva")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "dhruva.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers(address: tuple[str, int] | str) -> bool:
    """True when something accepts connections at ``address``."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(address)
        except OSError:
            return False
        return True


def address_options(address: tuple[str, int] | str) -> list[str]:
    if isinstance(address, str):
        return ["--address", address]
    return ["--host", address[0], "--port", str(address[1])]


class Server:
    """A ``dhruva -s`` process."""

    def __init__(
        self,
        address: tuple[str, int] | str,
        cwd: Path,
        *options: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.address = address
        self.log = cwd / f"server-{time.monotonic_ns()}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [*dhruva_command(), "-s", *address_options(address), *options],
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        deadline = time.monotonic() + STARTUP_SECONDS
        while not answers(address):
            if self.process.poll() is not None:
                pytest.fail(f"the server exited at startup:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self) -> int:
        return self.process.wait(timeout=STARTUP_SECONDS)

    def kill(self) -> None:
        """Stop the server: politely (it removes its temporary file), then not."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STARTUP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STARTUP_SECONDS)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``dhruva -s`` processes; all of them are killed at the end."""
    started: list[Server] = []

    def start(
        *options: str,
        address: tuple[str, int] | str | None = None,
        env: dict[str, str] | None = None,
    ) -> Server:
        where = address or ("127.0.0.1", free_port())
        server = Server(where, tmp_path, *options, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def dhruva(cwd: Path, *args: str, input: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``dhruva ARGS`` with ``input`` piped on stdin."""
    return subprocess.run(
        [*dhruva_command(), *args],
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
    )


def client(cwd: Path, server: Server, script: str) -> str:
    """Run ``dhruva -c`` on ``server`` with ``script``; return what it printed."""
    done = dhruva(cwd, "-c", *address_options(server.address), input=script)
    assert done.returncode == 0, done.stderr
    return done.stdout


def stop(cwd: Path, server: Server) -> None:
    done = dhruva(cwd, "-s", "--stop", *address_options(server.address))
    assert done.returncode == 0, done.stderr
    server.wait()
    assert not answers(server.address)


def library_client(server: Server) -> Any:
    from dhruva.client_storage import ClientStorage

    return Connection(ClientStorage(address=server.address))


def test_two_clients_share_a_server_on_a_temporary_file(
    tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    server = start_server(env={"TMPDIR": str(temporary)})
    assert len(list(temporary.iterdir())) >= 1  # the server's temporary file

    client(tmp_path, server, 'root["greeting"] = "hello"\nconnection.commit()\n')
    seen = client(tmp_path, server, 'print(root["greeting"])\n')
    assert seen == "hello\n"

    # A client started later sees the first's commits; so does one that was
    # open all along, once it synchronizes with abort().
    watcher = library_client(server)
    try:
        root = watcher.get_root()
        assert root["greeting"] == "hello"
        client(tmp_path, server, 'root["count"] = 2\nconnection.commit()\n')
        watcher.abort()
        assert root["count"] == 2
    finally:
        watcher.close()

    stop(tmp_path, server)
    # Not persistence: the temporary file is gone with the server.
    assert list(temporary.iterdir()) == []

    # The server logs at INFO to stderr, each message once.
    ready = [line for line in server.output().splitlines() if "ready" in line]
    assert len(ready) == 1, server.output()


def test_interactive_client_on_a_terminal(
    tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    server = start_server()
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [*dhruva_command(), "-c", *address_options(server.address)],
        cwd=tmp_path,
        env={**os.environ, "HOME": str(tmp_path)},
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    try:
        shown = read_until(controller, ">>> ")
        for line in ('root["typed"] = "at the console"', "connection.commit()", "root"):
            os.write(controller, line.encode() + b"\n")
            shown += read_until(controller, ">>> ")
        # Control-D ends the client, as in the Python REPL.
        os.write(controller, b"\x04")
        assert process.wait(timeout=STARTUP_SECONDS) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STARTUP_SECONDS)
        os.close(controller)

    assert "connection" in shown and "root" in shown  # the banner
    assert "<PersistentDict 0>" in shown
    assert client(tmp_path, server, 'print(root["typed"])') == "at the console\n"


def read_until(fd: int, prompt: str) -> str:
    """Read from a pseudo-terminal until ``prompt`` ends what it showed."""
    shown = b""
    deadline = time.monotonic() + STARTUP_SECONDS
    while not shown.endswith(prompt.encode()):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            pytest.fail(f"no {prompt!r} on the terminal; it showed {shown!r}")
        shown += os.read(fd, 65536)
    return shown.decode(errors="replace")


def test_abort_reverts_uncommitted_changes(
    tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    server = start_server()
    script = (
        'root["a"] = 1\nconnection.commit()\n'
        'root["a"] = 2\nroot["b"] = 3\nconnection.abort()\n'
        'print(root["a"], "b" in root)\n'
    )
    assert client(tmp_path, server, script) == "1 False\n"


def test_file_persists_across_a_server_restart_and_opens_directly(
    tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    path = tmp_path / "test.durus"
    server = start_server("--file", str(path))
    client(tmp_path, server, 'root["colour"] = "teal"\nconnection.commit()\n')
    stop(tmp_path, server)

    again = start_server("--file", str(path))
    assert client(tmp_path, again, 'print(root["colour"])\n') == "teal\n"
    stop(tmp_path, again)

    # With the server stopped, the file opens directly and exclusively.
    direct = dhruva(tmp_path, "-c", "--file", str(path), input='print(root["colour"])')
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout == "teal\n"


def test_unix_socket_address(
    tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    # A short path: unix socket paths are limited to about 100 bytes.
    sock_dir = Path("/tmp") / f"dhruva-demo-{os.getpid()}-{time.monotonic_ns()}"
    sock_dir.mkdir()
    try:
        server = start_server(address=str(sock_dir / "s"))
        client(tmp_path, server, 'root["via"] = "socket"\nconnection.commit()\n')
        assert client(tmp_path, server, 'print(root["via"])\n') == "socket\n"
        stop(tmp_path, server)
    finally:
        for child in sock_dir.iterdir():
            child.unlink()
        sock_dir.rmdir()


def test_write_conflict_between_two_clients(
    tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    from dhruva.error import WriteConflictError

    server = start_server()
    client(tmp_path, server, 'root["n"] = 0\nconnection.commit()\n')

    first, second = library_client(server), library_client(server)
    try:
        first_root, second_root = first.get_root(), second.get_root()
        assert first_root["n"] == second_root["n"] == 0

        first_root["n"] = 1
        first.commit()
        second_root["n"] = 2
        with pytest.raises(WriteConflictError):
            second.commit()

        # The loser aborts, sees the winner's value, and may try again.
        second.abort()
        assert second_root["n"] == 1
        second_root["n"] = 2
        second.commit()
    finally:
        first.close()
        second.close()
    assert client(tmp_path, server, 'print(root["n"])\n') == "2\n"


def test_pack_through_the_server(
    tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    server = start_server()
    client(
        tmp_path,
        server,
        "from dhruva.persistent_dict import PersistentDict\n"
        'root["junk"] = PersistentDict()\nconnection.commit()\n'
        'del root["junk"]\nroot["kept"] = 1\nconnection.commit()\n',
    )
    done = dhruva(tmp_path, "-p", *address_options(server.address))
    assert done.returncode == 0, done.stderr
    assert "packed" in done.stdout
    assert client(tmp_path, server, "print(sorted(root.keys()))") == "['kept']\n"


def test_control_c_stops_the_server(
    tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    server = start_server()
    server.process.send_signal(signal.SIGINT)
    server.wait()
    assert not answers(server.address)
    assert "Traceback" not in server.output()


def test_client_without_a_server_says_how_to_start_one(tmp_path: Path) -> None:
    done = dhruva(tmp_path, "-c", "--port", str(free_port()), input="print(root)")
    assert done.returncode == 1
    assert "start one with" in done.stderr
    assert "Traceback" not in done.stderr
