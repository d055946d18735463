"""The storage contract: one test suite every storage runs.

Import the classes for the capabilities your storage has into a test module,
subclass them as ``Test...`` and provide the fixtures they use::

    from dhruva.storage_testing import BasicStorageContract, DurableStorageContract

    class TestMyStorage(BasicStorageContract, DurableStorageContract):
        @pytest.fixture
        def storage(self, tmp_path):
            s = MyStorage(tmp_path / "db")
            yield s
            s.close()

        @pytest.fixture
        def reopen(self, tmp_path):
            return lambda s: (s.close(), MyStorage(tmp_path / "db"))[1]

Fixtures by class:

- ``storage``: a new, empty, writable storage (every class).
- ``reopen``: a function that closes the storage it is given and returns a new
  one on the same data (:class:`DurableStorageContract`,
  :class:`ReadOnlyStorageContract` as ``open_readonly``).
- ``open_readonly``: a function that closes the storage it is given and opens
  the same data read-only (:class:`ReadOnlyStorageContract`).
- ``second_client``: another client of the same data as ``storage``
  (:class:`InvalidatingStorageContract`).

This module needs pytest, which dhruva itself does not depend on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from dhruva.error import DhruvaKeyError, ReadOnlyError
from dhruva.record import ROOT_OID, pack_record, unpack_record
from dhruva.storage import Storage

Reopen = Callable[[Storage], Storage]


def make_record(oid: bytes, data: bytes = b"data", refs: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    """Return a record with opaque ``data`` that refers to ``refs``."""
    return pack_record(oid, data, b"".join(refs))


def commit(storage: Storage, *records: bytes) -> None:
    """Store ``records`` in one transaction."""
    storage.begin()
    for record in records:
        storage.store(record[:8], record)
    storage.end()


def new_oids(storage: Storage, n: int) -> list[bytes]:
    oids = [storage.new_oid() for _ in range(n)]
    if ROOT_OID in oids:
        oids.remove(ROOT_OID)
        oids.append(storage.new_oid())
    return oids


class BasicStorageContract:
    """Every storage: oids, transactions, loads, iteration."""

    def test_new_oids_are_8_bytes_and_never_repeat(self, storage: Storage) -> None:
        oids = [storage.new_oid() for _ in range(50)]
        assert all(isinstance(oid, bytes) and len(oid) == 8 for oid in oids)
        assert len(set(oids)) == 50

    def test_committed_records_load(self, storage: Storage) -> None:
        a, b = new_oids(storage, 2)
        commit(storage, make_record(a, b"alpha", [b]), make_record(b, b"beta"))
        assert unpack_record(storage.load(a)) == (a, b"alpha", b)
        assert unpack_record(storage.load(b)) == (b, b"beta", b"")

    def test_a_later_commit_replaces_a_record(self, storage: Storage) -> None:
        (a,) = new_oids(storage, 1)
        commit(storage, make_record(a, b"one"))
        commit(storage, make_record(a, b"two" * 1000))
        assert unpack_record(storage.load(a))[1] == b"two" * 1000

    def test_missing_oid_raises_a_key_error(self, storage: Storage) -> None:
        missing = (12345678).to_bytes(8, "big")
        with pytest.raises(DhruvaKeyError):
            storage.load(missing)
        with pytest.raises(KeyError):
            storage.load(missing)

    def test_bulk_load_keeps_order(self, storage: Storage) -> None:
        oids = new_oids(storage, 5)
        commit(storage, *(make_record(oid, oid * 2) for oid in oids))
        wanted = list(reversed(oids))
        loaded = [unpack_record(r)[0] for r in storage.bulk_load(wanted)]
        assert loaded == wanted

    def test_walk_from_root_yields_reachable_records(self, storage: Storage) -> None:
        a, b, c = new_oids(storage, 3)
        commit(
            storage,
            make_record(ROOT_OID, b"root", [a]),
            make_record(a, b"a", [b]),
            make_record(b, b"b"),
            make_record(c, b"unreachable"),
        )
        walked = [oid for oid, _r in storage.gen_oid_record(start_oid=ROOT_OID)]
        assert walked == [ROOT_OID, a, b]

    def test_empty_transaction_changes_nothing(self, storage: Storage) -> None:
        (a,) = new_oids(storage, 1)
        commit(storage, make_record(a, b"kept"))
        commit(storage)
        assert unpack_record(storage.load(a))[1] == b"kept"


class IterableStorageContract:
    """Storages that can list every record they hold (census tools)."""

    def test_every_record_is_listed(self, storage: Storage) -> None:
        a, b = new_oids(storage, 2)
        commit(storage, make_record(ROOT_OID, b"r"), make_record(a), make_record(b))
        commit(storage, make_record(a, b"newer"))
        records = dict(storage.gen_oid_record())
        assert set(records) == {ROOT_OID, a, b}
        assert unpack_record(records[a])[1] == b"newer"


class DurableStorageContract:
    """Storages whose records survive closing and opening again."""

    def test_records_survive_reopen(self, storage: Storage, reopen: Reopen) -> None:
        a, b = new_oids(storage, 2)
        commit(storage, make_record(ROOT_OID, b"root", [a]), make_record(a, b"a"))
        commit(storage, make_record(b, b"b"))
        storage = reopen(storage)
        try:
            assert unpack_record(storage.load(a)) == (a, b"a", b"")
            assert unpack_record(storage.load(b))[1] == b"b"
            assert unpack_record(storage.load(ROOT_OID))[2] == a
        finally:
            storage.close()

    def test_new_oids_after_reopen_are_new(
        self, storage: Storage, reopen: Reopen
    ) -> None:
        used = new_oids(storage, 3)
        commit(storage, *(make_record(oid) for oid in used))
        storage = reopen(storage)
        try:
            fresh = {storage.new_oid() for _ in range(10)}
            assert not fresh & set(used)
            assert ROOT_OID not in fresh
        finally:
            storage.close()


class PackableStorageContract:
    """Storages that remove unreachable records in ``pack()``."""

    def test_pack_keeps_reachable_and_drops_garbage(self, storage: Storage) -> None:
        a, b, garbage = new_oids(storage, 3)
        commit(
            storage,
            make_record(ROOT_OID, b"root", [a]),
            make_record(a, b"a", [b]),
            make_record(b, b"b"),
            make_record(garbage, b"garbage"),
        )
        storage.pack()
        assert unpack_record(storage.load(b))[1] == b"b"
        with pytest.raises(KeyError):
            storage.load(garbage)

    def test_oids_are_not_reused_after_pack(self, storage: Storage) -> None:
        a, garbage = new_oids(storage, 2)
        commit(storage, make_record(ROOT_OID, b"root", [a]), make_record(a))
        commit(storage, make_record(garbage))
        storage.pack()
        fresh = {storage.new_oid() for _ in range(10)}
        assert not fresh & {ROOT_OID, a, garbage}


class ReadOnlyStorageContract:
    """Storages that can be opened read-only."""

    def test_readonly_storage_loads_and_refuses_writes(
        self, storage: Storage, open_readonly: Reopen
    ) -> None:
        (a,) = new_oids(storage, 1)
        commit(storage, make_record(ROOT_OID, b"root"), make_record(a, b"a"))
        readonly = open_readonly(storage)
        try:
            assert unpack_record(readonly.load(a))[1] == b"a"
            with pytest.raises(ReadOnlyError):
                readonly.begin()
                readonly.store(a, make_record(a, b"changed"))
                readonly.end()
        finally:
            readonly.close()


class InvalidatingStorageContract:
    """Storages shared by several clients, each told of the others' commits."""

    def test_sync_reports_other_clients_commits(
        self, storage: Storage, second_client: Storage
    ) -> None:
        (a,) = new_oids(storage, 1)
        commit(storage, make_record(a, b"first"))
        second_client.sync()
        assert unpack_record(second_client.load(a))[1] == b"first"
        commit(storage, make_record(a, b"second"))
        assert a in second_client.sync()
        assert unpack_record(second_client.load(a))[1] == b"second"
        assert storage.sync() == [] or a not in storage.sync()

    def test_new_oids_differ_between_clients(
        self, storage: Storage, second_client: Storage
    ) -> None:
        mine = {storage.new_oid() for _ in range(20)}
        theirs = {second_client.new_oid() for _ in range(20)}
        assert not mine & theirs


__all__: list[Any] = [
    "BasicStorageContract",
    "DurableStorageContract",
    "InvalidatingStorageContract",
    "IterableStorageContract",
    "PackableStorageContract",
    "ReadOnlyStorageContract",
    "commit",
    "make_record",
]
