"""``dhruva -c`` on a server that goes away during the session.

Real processes: a ``dhruva server`` on loopback (see conftest.py) and a
``dhruva -c`` client whose piped script stops that server and then ends.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The script the client runs: commit, stop the server, wait until it is gone.
SCRIPT = """\
import socket, subprocess, sys, time
root["x"] = 1
connection.commit()
subprocess.run(
    [sys.executable, "-m", "dhruva.cli", "-s", "--stop", {options}],
    check=True, capture_output=True,
)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        socket.create_connection(({host!r}, {port}), timeout=1).close()
    except OSError:
        break
    time.sleep(0.05)
print("server stopped")
"""


def test_quitting_after_the_server_has_gone_warns_in_one_line(
    tmp_path: Path, dhruva_server: Callable[..., Any]
) -> None:
    server = dhruva_server("--file", str(tmp_path / "served.durus"))
    script = SCRIPT.format(
        options=", ".join(repr(option) for option in server.options),
        host=server.host,
        port=server.port,
    )
    client = subprocess.run(
        [sys.executable, "-m", "dhruva.cli", "-c", *server.options],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert client.returncode == 0, client.stderr
    assert client.stdout == "server stopped\n"
    assert "Traceback" not in client.stderr
    where = f"{server.host}:{server.port}"
    warnings = [line for line in client.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, client.stderr
    assert warnings[0].startswith(f"warning: the server at {where} went away")
    assert server.process.wait(30) == 0
