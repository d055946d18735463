"""Packs killed with SIGKILL at random moments, in a real process.

A child process packs a database over and over (incremental packs with
commits of new garbage between the steps, and whole packs) until it is
killed. After each kill the database must be under its original name, not
empty, open, and hold every object reachable from the root, unchanged.
``DHRUVA_LONG_TESTS=1`` runs many more rounds.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dhruva.checked_file import CheckedFileStorage
from dhruva.error import StorageError
from dhruva.file_storage import FileStorage
from dhruva.file_storage2 import FileStorage2
from dhruva.record import ROOT_OID, pack_record
from dhruva.sqlite_storage import SqliteStorage
from dhruva.storage import Storage, gen_reachable_records

KINDS: dict[str, Callable[..., Storage]] = {
    "checked": CheckedFileStorage,
    "file": FileStorage,
    "file2": FileStorage2,
    "sqlite": SqliteStorage,
}

#: Objects reachable from the root; a pack of them takes a few tenths of a second.
REACHABLE = 10_000

LONG = os.environ.get("DHRUVA_LONG_TESTS") == "1"

#: Kill rounds per storage kind.
ROUNDS = 100 if LONG else 8

PACKER = textwrap.dedent(
    """
    import sys
    from dhruva.checked_file import CheckedFileStorage
    from dhruva.file_storage import FileStorage
    from dhruva.file_storage2 import FileStorage2
    from dhruva.record import pack_record
    from dhruva.sqlite_storage import SqliteStorage

    kinds = {"file": FileStorage, "file2": FileStorage2, "sqlite": SqliteStorage}
    kinds["checked"] = CheckedFileStorage
    storage = kinds[sys.argv[1]](sys.argv[2])

    def add_garbage(count):
        storage.begin()
        for _ in range(count):
            oid = storage.new_oid()
            storage.store(oid, pack_record(oid, b"garbage" * 30, b""))
        storage.end()

    print("ready", flush=True)
    packs = 0
    while True:
        add_garbage(2000)
        print("start", flush=True)
        if packs % 2:
            storage.pack()
        else:
            for _step in storage.get_packer():
                add_garbage(5)
        packs += 1
        print("done", flush=True)
    """
)


def build(storage: Storage) -> dict[bytes, bytes]:
    """Commit a tree of objects and some garbage; return the tree's records."""
    oids = [storage.new_oid() for _ in range(REACHABLE)]
    assert oids[0] == ROOT_OID
    records = {}
    for i, oid in enumerate(oids):
        children = oids[2 * i + 1 : 2 * i + 3]
        records[oid] = pack_record(
            oid, b"object %d " % i + b"x" * 150, b"".join(children)
        )
    storage.begin()
    for oid, record in records.items():
        storage.store(oid, record)
    for _ in range(REACHABLE // 2):
        oid = storage.new_oid()
        storage.store(oid, pack_record(oid, b"garbage", b""))
    storage.end()
    return records


def reopen(kind: str, path: Path) -> Storage:
    """Open the database after a kill: a commit cut short needs repair."""
    try:
        return KINDS[kind](path)
    except StorageError:
        return KINDS[kind](path, repair=True)


def kill_at_random(kind: str, path: Path, rng: random.Random, delay: float) -> str:
    """Start a packing process, SIGKILL it after a random time.

    :return: the last line it printed: "start" when it died inside a pack.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", PACKER, kind, str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0, delay))
    finally:
        child.send_signal(signal.SIGKILL)
        output, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    lines = ["ready", *output.split()]
    return lines[-1]


def pack_seconds(storage: Storage) -> float:
    started = time.monotonic()
    storage.pack()
    return time.monotonic() - started


@pytest.mark.timeout(1800 if LONG else 600)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_pack_killed_at_any_moment_loses_nothing(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"db.{kind}"
    storage = KINDS[kind](path)
    expected = build(storage)
    delay = 3 * pack_seconds(storage) + 0.2
    storage.close()

    rng = random.Random(kind)
    inside_a_pack = 0
    for round_ in range(ROUNDS):
        last = kill_at_random(kind, path, rng, delay)
        inside_a_pack += last == "start"

        assert path.exists(), f"round {round_}: {path} is gone"
        assert path.stat().st_size > 0, f"round {round_}: {path} is empty"
        storage = reopen(kind, path)
        try:
            walked = dict(gen_reachable_records(storage))
            assert walked == expected, f"round {round_}: reachable objects differ"
        finally:
            storage.close()

        # Whatever an interrupted pack left is gone once the file is opened.
        leftovers = sorted(p.name for p in tmp_path.glob(f"{path.name}.pack*"))
        assert leftovers == [], f"round {round_}"

    # The kills did land inside packs (most of the child's time is spent there).
    assert inside_a_pack > 0

    # After all that the database packs and takes commits as usual.
    storage = KINDS[kind](path)
    try:
        storage.pack()
        assert storage.get_size() == REACHABLE
        oid = storage.new_oid()
        assert int.from_bytes(oid, "big") >= REACHABLE * 3 // 2
        storage.begin()
        storage.store(oid, pack_record(oid, b"after", b""))
        storage.end()
    finally:
        storage.close()
