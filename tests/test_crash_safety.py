"""Processes killed with SIGKILL while they commit or pack, in every file format.

A child process commits transactions of several records of random sizes in
a loop and prints a line after each :meth:`~dhruva.storage.Storage.end`
returns. The parent kills it at a random moment, reopens the database (with
repair when a torn last transaction makes a plain open refuse it) and
checks that every acknowledged commit is there, and that no commit is there
in part. Then the next child goes on from there, round after round.

A commit is one ``write``, which a SIGKILL does not cut short unless it is
big: now and then a commit carries a record of megabytes, so that some kills
leave a torn last transaction for the reopen to repair.

Packs killed at random moments are tested in ``tests/test_pack_crash.py``
(SHELF-1, DHRUVA1, DFS20 and SQLite).

``DHRUVA_LONG_TESTS=1`` runs many more rounds.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from dhruva.error import StorageError
from dhruva.record import ROOT_OID, unpack_record
from dhruva.storage import Storage

LONG = os.environ.get("DHRUVA_LONG_TESTS") == "1"

#: Kill rounds per format.
ROUNDS = 150 if LONG else 5

#: Rounds on one file before the next starts on a new one.
FRESH_FILE_ROUNDS = 15

#: The formats, and how the child and the parent open them.
OPENERS = textwrap.dedent(
    """
    from dhruva.file_storage import FileStorage
    from dhruva.file_storage2 import FileStorage2
    from dhruva.sqlite_storage import SqliteStorage

    def open_kind(kind, path, **options):
        if kind == "shelf":
            return FileStorage(path, format="durus", **options)
        if kind == "dhruva":
            return FileStorage(path, format="dhruva", **options)
        if kind == "dfs20":
            return FileStorage2(path, **options)
        return SqliteStorage(path, **options)
    """
)
_namespace: dict[str, object] = {}
exec(OPENERS, _namespace)  # noqa: S102 - the same code the children run


def open_kind(kind: str, path: Path, **options: object) -> Storage:
    opener = _namespace["open_kind"]
    storage: Storage = opener(kind, path, **options)  # type: ignore[operator]
    return storage


KINDS = ["shelf", "dhruva", "dfs20", "sqlite"]

COMMITTER = OPENERS + textwrap.dedent(
    """
    import random
    import sys
    from dhruva.record import ROOT_OID, pack_record, unpack_record

    kind, path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    storage = open_kind(kind, path)
    try:
        counter = int(unpack_record(storage.load(ROOT_OID))[1])
    except KeyError:
        assert storage.new_oid() == ROOT_OID
        counter = -1
    rng = random.Random(seed)
    print("ready", flush=True)
    while True:
        counter += 1
        parts = rng.randint(1, 8)
        storage.begin()
        for part in range(parts):
            oid = storage.new_oid()
            data = b"commit %d part %d of %d;" % (counter, part, parts)
            # Now and then a record of megabytes: a kill can cut its write.
            big = rng.random() < 0.05
            data += b"x" * rng.randint(0, 4_000_000 if big else 6000)
            storage.store(oid, pack_record(oid, data, b""))
        storage.store(ROOT_OID, pack_record(ROOT_OID, b"%d" % counter, b""))
        storage.end()
        print(counter, parts, flush=True)
    """
)

_PART = re.compile(rb"commit (\d+) part (\d+) of (\d+);")


def reopen(kind: str, path: Path) -> tuple[Storage, bool]:
    """Open after a kill; repair only when a plain open refuses the file."""
    try:
        return open_kind(kind, path), False
    except StorageError:
        return open_kind(kind, path, repair=True), True


def kill_while_committing(kind: str, path: Path, rng: random.Random) -> dict[int, int]:
    """Run a committer, SIGKILL it at a random moment.

    :return: the commits it acknowledged: commit number -> number of parts.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", COMMITTER, kind, str(path), str(rng.randrange(1 << 30))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0, 0.25))
    finally:
        child.send_signal(signal.SIGKILL)
        output, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    acknowledged = {}
    for line in output.splitlines():
        if line.strip():  # the last line may be cut short by the kill
            fields = line.split()
            if len(fields) == 2:
                acknowledged[int(fields[0])] = int(fields[1])
    return acknowledged


def commits_in(storage: Storage) -> tuple[int, dict[int, set[int]], dict[int, int]]:
    """Return the root's counter, the parts found of each commit, their count."""
    try:
        counter = int(unpack_record(storage.load(ROOT_OID))[1])
    except KeyError:  # killed before its first commit
        counter = -1
    found: dict[int, set[int]] = {}
    parts: dict[int, int] = {}
    for oid, record in storage.gen_oid_record():
        if oid == ROOT_OID:
            continue
        match = _PART.match(unpack_record(record)[1])
        assert match, f"a record that no commit wrote: {record[:60]!r}"
        number, part, count = (int(g) for g in match.groups())
        found.setdefault(number, set()).add(part)
        parts[number] = count
    return counter, found, parts


@pytest.mark.timeout(900 if LONG else 300)
@pytest.mark.parametrize("kind", KINDS)
def test_every_acknowledged_commit_survives_sigkill(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"db.{kind}"
    rng = random.Random(f"commit {kind}")
    acknowledged: dict[int, int] = {}
    repairs = commits_seen = 0
    for round_ in range(ROUNDS):
        latest = kill_while_committing(kind, path, rng)
        acknowledged.update(latest)
        commits_seen += len(latest)
        storage, repaired = reopen(kind, path)
        repairs += repaired
        try:
            counter, found, parts = commits_in(storage)
        finally:
            storage.close()

        where = f"round {round_}"
        lost = [n for n in acknowledged if found.get(n) != set(range(acknowledged[n]))]
        assert not lost, f"{where}: acknowledged commits lost: {lost[:10]}"
        partial = [n for n in found if found[n] != set(range(parts[n]))]
        assert not partial, f"{where}: commits present in part: {partial[:10]}"
        # The root was written by the last commit the file holds.
        assert counter == max(found, default=-1), where
        assert set(found) == set(range(counter + 1)), f"{where}: a commit is missing"

        # Big records make the file grow fast: start a new one now and then.
        if round_ % FRESH_FILE_ROUNDS == FRESH_FILE_ROUNDS - 1:
            for leftover in tmp_path.iterdir():
                leftover.unlink()
            acknowledged.clear()
    assert commits_seen, "no commit was acknowledged in any round"
    if LONG and kind != "sqlite":
        # Some kills cut a big write short, and repair had to cut it off.
        assert repairs > 0, "no kill left a torn tail: the test lost its teeth"
