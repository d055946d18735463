"""A race checker in the style of ZODB's: invariants kept under contention.

Several client processes update the same objects through a real ``dhruva
server`` on loopback while packs run through ``dhruva pack``:

- money moves between accounts: the sum of the balances never changes;
- two counters in two objects are raised together: they are always equal,
  and at the end they equal the number of commits the clients made (no
  update is lost);
- every transfer replaces a scratch object, so each pack has garbage to
  remove while clients commit.

Each client checks the invariants in every transaction it reads, retrying
on conflicts; the parent checks them at the end from a fresh connection.
``DHRUVA_LONG_TESTS=1`` runs longer, with more clients.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("dhruva.client_storage", reason="needs dhruva-net")

from dhruva.client_storage import ClientStorage  # noqa: E402
from dhruva.connection import Connection  # noqa: E402
from dhruva.persistent_dict import PersistentDict  # noqa: E402
from dhruva.persistent_list import PersistentList  # noqa: E402

LONG = os.environ.get("DHRUVA_LONG_TESTS") == "1"

#: Seconds the clients run.
DURATION = 30.0 if LONG else 3.0
#: Client processes.
CLIENTS = 8 if LONG else 4
#: Accounts money moves between.
ACCOUNTS = 20
#: Each account's starting balance.
START = 1000

CLIENT = textwrap.dedent(
    """
    import random
    import sys
    import time
    from dhruva.client_storage import ClientStorage
    from dhruva.connection import Connection
    from dhruva.error import ConflictError
    from dhruva.persistent_list import PersistentList

    host, port, seed, duration, total = sys.argv[1:6]
    rng = random.Random(int(seed))
    connection = Connection(ClientStorage(address=(host, int(port))))
    root = connection.get_root()
    commits = conflicts = violations = 0
    deadline = time.monotonic() + float(duration)
    while time.monotonic() < deadline:
        try:
            accounts = root["accounts"]
            balances = [account["balance"] for account in accounts]
            if sum(balances) != int(total):
                violations += 1
                print("VIOLATION sum", sum(balances), flush=True)
            if root["a"]["count"] != root["b"]["count"]:
                violations += 1
                print("VIOLATION pair", root["a"]["count"], root["b"]["count"])

            source, target = rng.sample(range(len(accounts)), 2)
            amount = rng.randint(1, 50)
            accounts[source]["balance"] -= amount
            accounts[target]["balance"] += amount
            root["a"]["count"] += 1
            root["scratch"] = PersistentList([rng.random()] * 20)  # garbage
            root["b"]["count"] += 1
            connection.commit()
            commits += 1
        except ConflictError:
            conflicts += 1
            connection.abort()
    connection.close()
    print("done", commits, conflicts, violations, flush=True)
    """
)


def make_accounts(address: tuple[str, int]) -> None:
    connection = Connection(ClientStorage(address=address))
    root = connection.get_root()
    root["accounts"] = PersistentList(
        PersistentDict(balance=START) for _ in range(ACCOUNTS)
    )
    root["a"] = PersistentDict(count=0)
    root["b"] = PersistentDict(count=0)
    connection.commit()
    connection.close()


@pytest.mark.timeout(600 if LONG else 120)
def test_invariants_hold_under_contention_and_packs(
    tmp_path: Path, dhruva_server: Callable[..., Any]
) -> None:
    server = dhruva_server("--file", str(tmp_path / "race.durus"))
    make_accounts(server.address)
    total = ACCOUNTS * START

    clients = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, server.host, str(server.port), str(seed)]
            + [str(DURATION), str(total)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in range(CLIENTS)
    ]

    # Packs while the clients commit: one through the command line, then
    # through a client of their own, one after another.
    packed = subprocess.run(
        [sys.executable, "-m", "dhruva.cli", "pack", *server.options],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert packed.returncode == 0, packed.stdout + packed.stderr
    packs = 1
    packer = ClientStorage(address=server.address)
    while any(client.poll() is None for client in clients):
        packer.pack()
        packs += 1
        time.sleep(0.05)
    packer.close()

    outputs = [client.communicate(timeout=120)[0] for client in clients]
    commits = violations = 0
    for output in outputs:
        assert "VIOLATION" not in output, output
        done = [line for line in output.splitlines() if line.startswith("done ")]
        assert done, f"a client failed:\n{output}"
        _word, made, _conflicts, broken = done[-1].split()
        commits += int(made)
        violations += int(broken)
    conflicts = sum(int(o.split("done ")[-1].split()[1]) for o in outputs)
    print(f"{commits} commits, {conflicts} conflicts retried, {packs} packs")
    assert violations == 0
    assert packs >= 3
    assert commits > CLIENTS  # the clients did contend

    # A fresh connection sees the invariants, and every update.
    connection = Connection(ClientStorage(address=server.address))
    root = connection.get_root()
    assert sum(account["balance"] for account in root["accounts"]) == total
    assert root["a"]["count"] == root["b"]["count"] == commits
    connection.close()
