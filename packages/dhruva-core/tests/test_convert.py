"""Tests of copy_reachable, the engine of ``dhruva convert``, on memory storages.

The command itself, between real file and SQLite storages, is tested in the
root ``tests/test_convert.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from dhruva.connection import Connection
from dhruva.convert import check_empty, copy_reachable, get_oid_counter
from dhruva.error import StorageError
from dhruva.persistent_dict import PersistentDict
from dhruva.persistent_list import PersistentList
from dhruva.record import ROOT_OID
from dhruva.storage import MemoryStorage
from dhruva.storage_testing import commit, make_record


def oid(n: int) -> bytes:
    return n.to_bytes(8, "big")


@pytest.fixture
def source() -> MemoryStorage:
    storage = MemoryStorage()
    commit(
        storage,
        make_record(ROOT_OID, b"root", [oid(3), oid(9)]),
        make_record(oid(3), b"three", [oid(9)]),
        make_record(oid(9), b"nine" * 1000),
        make_record(oid(5), b"unreachable"),
    )
    return storage


def test_reachable_records_are_copied_as_bytes_under_their_oids(source):
    destination = MemoryStorage()
    result = copy_reachable(source, destination)
    assert destination.records == {
        o: source.records[o] for o in (ROOT_OID, oid(3), oid(9))
    }
    assert (result.records, result.highest_oid) == (3, 9)
    assert result.size == sum(len(r) for r in destination.records.values())


def test_small_batches_give_the_same_copy_and_report_progress(source):
    destination = MemoryStorage()
    reported: list[int] = []
    copy_reachable(source, destination, batch_bytes=1, progress=reported.append)
    assert set(destination.records) == {ROOT_OID, oid(3), oid(9)}
    assert sum(reported) == 3


def test_new_objects_after_a_copy_get_new_oids(source):
    destination = MemoryStorage()
    copy_reachable(source, destination)
    before = dict(destination.records)
    fresh = {destination.new_oid() for _ in range(20)}
    assert not fresh & set(before)
    assert min(int.from_bytes(o, "big") for o in fresh) > 9


def test_a_source_without_a_root_is_refused():
    empty = MemoryStorage()
    with pytest.raises(StorageError, match="no root object"):
        copy_reachable(empty, MemoryStorage())


def test_a_destination_with_records_is_refused(source):
    destination = MemoryStorage()
    commit(destination, make_record(oid(1), b"already here"))
    with pytest.raises(StorageError, match=r"holds a database already \(1 records\)"):
        copy_reachable(source, destination)
    assert list(destination.records) == [oid(1)]
    check_empty(MemoryStorage(), "fresh")


class StuckCounter(MemoryStorage):
    """A storage whose oid counter ignores the records it stores."""

    def end(self, handle_invalidations: Any = None) -> None:
        counter = self._next_oid
        super().end(handle_invalidations)
        self._next_oid = counter


def test_a_destination_that_would_reuse_a_copied_oid_is_reported(source):
    with pytest.raises(StorageError, match=r"hands out oid 0 .*overwrite"):
        copy_reachable(source, StuckCounter())


def test_a_connection_on_the_copy_reads_it_and_adds_to_it():
    original = MemoryStorage()
    with Connection(original) as connection:
        root = connection.get_root()
        root["items"] = PersistentList(PersistentDict(n=n) for n in range(50))
        connection.commit()

    copy = MemoryStorage()
    copy_reachable(original, copy)
    old = dict(copy.records)
    with Connection(copy) as connection:
        items = connection.get_root()["items"]
        assert [item["n"] for item in items] == list(range(50))
        connection.get_root()["more"] = PersistentList(
            PersistentDict() for _ in range(9)
        )
        connection.commit()

    # Only the root changed; every other old record is intact.
    assert {o for o in old if copy.records[o] != old[o]} == {ROOT_OID}
    assert len(copy.records) == len(old) + 10


class Reserving(MemoryStorage):
    """A destination that takes an oid counter, as SqliteStorage does."""

    def reserve_oids(self, next_oid: int) -> None:
        self._next_oid = max(self._next_oid, next_oid)


class Telling(MemoryStorage):
    """A source that tells its counter through the public method."""

    def get_oid_counter(self) -> int:
        return 1000


def test_the_oid_counter_of_the_source_is_carried(source):
    for _ in range(30):
        source.new_oid()  # handed out, never stored: oids 10..39
    destination = Reserving()
    result = copy_reachable(source, destination)
    assert result.oid_counter == 40
    assert int.from_bytes(destination.new_oid(), "big") >= 40


def test_get_oid_counter_is_asked_first():
    source = Telling()
    commit(source, make_record(ROOT_OID, b"root"))
    assert get_oid_counter(source) == 1000
    destination = Reserving()
    assert copy_reachable(source, destination).oid_counter == 1000
    assert int.from_bytes(destination.new_oid(), "big") >= 1000


def test_a_destination_that_takes_no_counter_still_starts_above_the_copy(source):
    for _ in range(30):
        source.new_oid()
    destination = MemoryStorage()
    result = copy_reachable(source, destination)
    assert result.oid_counter is None
    assert 9 < int.from_bytes(destination.new_oid(), "big") < 40
