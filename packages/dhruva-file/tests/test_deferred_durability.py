"""Tests of deferred durability in the file storages: ``end(durable=False)``
writes and shows a commit without its fsync, ``make_durable()`` syncs every
such commit at once (a server's group commit), from another thread too.

What every storage with deferred durability does (a deferred commit is
visible at once, close() and a durable commit sync it) is the contract
:class:`~dhruva.storage_testing.DeferredDurabilityStorageContract`, run for
the three layouts in test_file_formats.py; this module holds what goes
beyond it."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from dhruva.checked_file import CheckedFileStorage
from dhruva.error import ReadOnlyError, StorageError
from dhruva.file_storage import FileStorage
from dhruva.file_storage2 import FileStorage2
from dhruva.record import ROOT_OID
from dhruva.storage import MemoryStorage, Storage
from dhruva.storage_testing import make_record

Opener = Callable[..., FileStorage]

FORMATS: dict[str, Opener] = {
    "dhruva": FileStorage,
    "shelf": lambda path, **kw: FileStorage(path, format="durus", **kw),
    "dfs20": FileStorage2,
}


@pytest.fixture(params=sorted(FORMATS))
def opener(request: pytest.FixtureRequest) -> Opener:
    return FORMATS[request.param]


def oid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def commit_one(storage: Storage, n: int, text: str, *, durable: bool) -> None:
    storage.begin()
    storage.store(oid(n), make_record(oid(n), text.encode()))
    storage.end(durable=durable)  # type: ignore[call-arg]


def test_the_file_storages_announce_it(tmp_path: Path, opener: Opener) -> None:
    with opener(tmp_path / "db") as storage:
        assert storage.deferred_durability is True
    assert FileStorage.deferred_durability is True
    assert CheckedFileStorage.deferred_durability is True
    assert FileStorage2.deferred_durability is True


def test_other_storages_keep_the_default() -> None:
    storage = MemoryStorage()
    assert storage.deferred_durability is False
    assert Storage.deferred_durability is False
    storage.make_durable()  # nothing to do, and no error


def test_one_fsync_makes_many_commits_durable(
    tmp_path: Path, opener: Opener, fsyncs: list[int]
) -> None:
    with opener(tmp_path / "db") as storage:
        fsyncs.clear()
        for n in range(10):
            commit_one(storage, n, f"value {n}", durable=False)
        assert fsyncs == []

        storage.make_durable()
        assert len(fsyncs) == 1

        # Nothing written since: no fsync at all.
        storage.make_durable()
        storage.make_durable()
        assert len(fsyncs) == 1

        # A durable commit syncs what came before it as well, in one fsync.
        commit_one(storage, 10, "deferred", durable=False)
        commit_one(storage, 11, "durable", durable=True)
        assert len(fsyncs) == 2
        storage.make_durable()
        assert len(fsyncs) == 2


def test_the_default_is_one_fsync_per_commit(
    tmp_path: Path, opener: Opener, fsyncs: list[int]
) -> None:
    with opener(tmp_path / "db") as storage:
        fsyncs.clear()
        for n in range(3):
            storage.begin()
            storage.store(oid(n), make_record(oid(n), b"x"))
            storage.end()
        assert len(fsyncs) == 3
        storage.make_durable()
        assert len(fsyncs) == 3


def test_make_durable_from_another_thread(tmp_path: Path, opener: Opener) -> None:
    """A flusher thread syncs while the writer goes on committing."""
    path = tmp_path / "db"
    stop = threading.Event()
    errors: list[BaseException] = []
    rounds = 0

    with opener(path) as storage:

        def flusher() -> None:
            nonlocal rounds
            try:
                while not stop.is_set():
                    storage.make_durable()
                    rounds += 1
            except BaseException as e:  # reported by the test below
                errors.append(e)

        thread = threading.Thread(target=flusher)
        thread.start()
        try:
            for n in range(300):
                commit_one(storage, n % 50, f"value {n}", durable=False)
        finally:
            stop.set()
            thread.join()
        storage.make_durable()

    assert errors == []
    assert rounds > 0
    with opener(path) as again:
        for n in range(250, 300):
            assert again.load(oid(n % 50)) == make_record(
                oid(n % 50), f"value {n}".encode()
            )


def test_a_pack_after_deferred_commits(tmp_path: Path, opener: Opener) -> None:
    path = tmp_path / "db"
    with opener(path) as storage:
        commit_one(storage, 0, "root", durable=False)
        commit_one(storage, 1, "garbage", durable=False)
        storage.pack()
        storage.make_durable()
        commit_one(storage, 0, "root again", durable=False)
    with opener(path) as again:
        assert again.load(ROOT_OID) == make_record(ROOT_OID, b"root again")
        assert again.get_size() == 1


def test_a_read_only_storage_refuses_and_has_nothing_to_sync(
    tmp_path: Path, opener: Opener
) -> None:
    path = tmp_path / "db"
    with opener(path) as storage:
        commit_one(storage, 0, "root", durable=True)
    with opener(path, readonly=True) as reader:
        reader.make_durable()
        with pytest.raises(ReadOnlyError):
            reader.end(durable=False)


def test_a_failed_fsync_is_reported(
    tmp_path: Path, opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "db"
    with opener(path) as storage:
        commit_one(storage, 0, "root", durable=False)

        def failing(fd: int) -> None:
            raise OSError(5, "Input/output error")

        real = os.fsync
        monkeypatch.setattr(os, "fsync", failing)
        with pytest.raises(StorageError, match=r"fsync failed.*Input/output"):
            storage.make_durable()
        monkeypatch.setattr(os, "fsync", real)

        # Still pending: the next call tries again.
        storage.make_durable()
        assert storage.load(ROOT_OID) == make_record(ROOT_OID, b"root")
