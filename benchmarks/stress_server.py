"""Stress a dhruva storage server: many client processes, packs, invariants.

Each client process keeps its own random tree of persistent objects under
``root["tree<N>"]``, with a checksum of the whole tree stored beside it in the
same commit. In a loop it changes its tree (adds, removes and rewrites nodes),
reads another client's tree and checks it against that tree's checksum (a
reader must never see half of somebody's commit), and increments a shared
counter (real conflicts, retried). A packer packs the storage every few
seconds meanwhile.

At the end the script checks, through the server and then by opening the file
directly once the server has stopped: every tree matches its checksum and its
owner's last commit, the counter equals the increments the clients made, and
every object is reachable. It prints a summary and exits 1 if an invariant
fails.

Usage::

    python benchmarks/stress_server.py                 # a minute, 4 clients
    python benchmarks/stress_server.py --seconds 600 --clients 16 --storage sqlite
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dhruva.persistent import Persistent

SERVER = [sys.executable, "-m", "dhruva.cli", "server"]


class Counter(Persistent):
    """The counter every client increments."""

    def __init__(self) -> None:
        self.value = 0


def checksum(node: Any) -> str:
    """Return the sha256 of a node's payload and, in name order, its children."""
    digest = hashlib.sha256(node["payload"])
    for name in sorted(node["children"]):
        digest.update(name.encode() + b"=" + checksum(node["children"][name]).encode())
    return digest.hexdigest()


def gen_nodes(node: Any) -> Any:
    yield node
    for child in node["children"].values():
        yield from gen_nodes(child)


def new_node(rng: random.Random) -> Any:
    from dhruva.persistent_dict import PersistentDict

    return PersistentDict(
        payload=rng.randbytes(rng.randint(0, 300)), children=PersistentDict()
    )


def change_tree(tree: Any, rng: random.Random) -> None:
    """Make one to five random changes to ``tree``."""
    for _ in range(rng.randint(1, 5)):
        nodes = list(gen_nodes(tree))
        node = rng.choice(nodes)
        action = rng.random()
        if action < 0.45 and len(nodes) < 200:
            node["children"][f"n{rng.randrange(10**6)}"] = new_node(rng)
        elif action < 0.65 and node["children"]:
            del node["children"][rng.choice(sorted(node["children"]))]
        else:
            node["payload"] = rng.randbytes(rng.randint(0, 300))


def client_main(
    number: int, clients: int, address: str, seconds: float, result: Any
) -> None:
    """One client process: change, check and count until time is up."""
    from dhruva.client_storage import ClientStorage
    from dhruva.connection import Connection
    from dhruva.error import ConflictError

    rng = random.Random(number)
    connection = Connection(ClientStorage(address=address, timeout=120))
    stats = {"commits": 0, "increments": 0, "checks": 0, "conflicts": 0}
    problems: list[str] = []
    deadline = time.monotonic() + seconds
    name = f"tree{number}"
    while time.monotonic() < deadline:
        try:
            root = connection.get_root()
            step = rng.random()
            if step < 0.6:
                entry = root[name]
                change_tree(entry["tree"], rng)
                entry["checksum"] = checksum(entry["tree"])
                entry["version"] += 1
                connection.commit()
                stats["commits"] += 1
                stats["version"] = entry["version"]
                stats["checksum"] = entry["checksum"]
            elif step < 0.8:
                other = root[f"tree{rng.randrange(clients)}"]
                if checksum(other["tree"]) != other["checksum"]:
                    problems.append(f"client {number} read a torn tree")
                stats["checks"] += 1
                connection.abort()
            else:
                root["counter"].value += 1
                connection.commit()
                stats["increments"] += 1
        except ConflictError:
            stats["conflicts"] += 1
            connection.abort()
    connection.close()
    result.put((number, stats, problems))


def start_server(
    directory: Path, storage: str, address: str
) -> subprocess.Popen[bytes]:
    database = directory / f"stress.{storage}"
    log = open(directory / "server.log", "wb")  # noqa: SIM115 - the child writes it
    process = subprocess.Popen(
        [*SERVER, "--storage", storage, "--file", str(database), "--address", address],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + 60
    while not re.search(r"ready on", (directory / "server.log").read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit((directory / "server.log").read_text())
        time.sleep(0.05)
    return process


def check_database(connection: Any, expected: dict[int, dict[str, Any]]) -> list[str]:
    """Return the invariants the database behind ``connection`` breaks."""
    problems = []
    root = connection.get_root()
    for number, stats in expected.items():
        entry = root[f"tree{number}"]
        if checksum(entry["tree"]) != entry["checksum"]:
            problems.append(f"tree{number} does not match its checksum")
        if entry["version"] != stats.get("version", 0):
            problems.append(
                f"tree{number} is at version {entry['version']}, its client "
                f"committed version {stats.get('version', 0)} last"
            )
    increments = sum(stats["increments"] for stats in expected.values())
    if root["counter"].value != increments:
        problems.append(
            f"counter is {root['counter'].value}, the clients made {increments} "
            "increments"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--storage", choices=["file", "file2", "sqlite"], default="file"
    )
    parser.add_argument("--pack-every", type=float, default=2.0, metavar="SECONDS")
    parser.add_argument("--dir", type=Path, default=None, help="keep files here")
    args = parser.parse_args(argv)

    from dhruva.client_storage import ClientStorage, stop_server
    from dhruva.connection import Connection
    from dhruva.persistent_dict import PersistentDict

    with tempfile.TemporaryDirectory(prefix="dhruva-stress-") as tmp:
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        address = str(Path(tempfile.mkdtemp(prefix="dhr-")) / "s.sock")
        server = start_server(directory, args.storage, address)
        try:
            # Every client's tree, and the shared counter.
            setup = Connection(ClientStorage(address=address))
            root = setup.get_root()
            rng = random.Random(-1)
            for number in range(args.clients):
                tree = new_node(rng)
                root[f"tree{number}"] = PersistentDict(
                    tree=tree, checksum=checksum(tree), version=0
                )
            root["counter"] = Counter()
            setup.commit()

            context = multiprocessing.get_context("spawn")
            results = context.Queue()
            workers = [
                context.Process(
                    target=client_main,
                    args=(n, args.clients, address, args.seconds, results),
                )
                for n in range(args.clients)
            ]
            for worker in workers:
                worker.start()

            # Pack while they work.
            packer = ClientStorage(address=address, timeout=300)
            packs = 0
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline:
                time.sleep(min(args.pack_every, max(0.0, deadline - time.monotonic())))
                packer.pack()
                packs += 1
            packer.close()

            expected: dict[int, dict[str, Any]] = {}
            problems: list[str] = []
            for _ in workers:
                number, stats, found = results.get(timeout=args.seconds + 300)
                expected[number] = stats
                problems += found
            for worker in workers:
                worker.join(60)
                if worker.exitcode != 0:
                    problems.append(f"a client process exited with {worker.exitcode}")

            setup.abort()
            problems += check_database(setup, expected)
            setup.close()
            stop_server(address)
            server.wait(60)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()

        # The file itself, opened directly after the server stopped.
        from dhruva.plugins import get_plugins
        from dhruva.verify import verify_storage

        storage = get_plugins().open_storage(
            str(directory / f"stress.{args.storage}"), args.storage
        )
        direct = Connection(storage)
        problems += [f"after restart: {p}" for p in check_database(direct, expected)]
        report = verify_storage(storage)
        if not report.sound:
            problems.append(f"verify found problems: {report}")
        direct.close()

    summary = {
        "seconds": args.seconds,
        "clients": args.clients,
        "storage": args.storage,
        "packs": packs,
        "commits": sum(s["commits"] for s in expected.values()),
        "increments": sum(s["increments"] for s in expected.values()),
        "checks": sum(s["checks"] for s in expected.values()),
        "conflicts": sum(s["conflicts"] for s in expected.values()),
        "problems": problems,
    }
    print(json.dumps(summary, indent=2))
    print("invariants hold" if not problems else "INVARIANTS BROKEN")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
