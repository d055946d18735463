"""A record the server's storage cannot read fails only its own load: a bulk
load answers every other oid, and prefetch skips it."""

from __future__ import annotations

import pytest
from dhruva.client_storage import ClientStorage
from dhruva.connection import Connection
from dhruva.error import StorageError
from dhruva.persistent_dict import PersistentDict
from dhruva.storage import MemoryStorage


class DamagedStorage(MemoryStorage):
    """A MemoryStorage whose record of ``damaged`` fails to load, as a file
    storage's does when a bit flipped inside it."""

    damaged: bytes | None = None

    def load(self, oid):
        if oid == self.damaged:
            raise StorageError(f"the record at byte offset 1234 is damaged ({oid!r})")
        return super().load(oid)


@pytest.fixture
def damaged_server(socket_path, serve_in_thread):
    """Serve a root referring to six objects, the third one damaged; return
    (address, their oids, the damaged oid)."""
    storage = DamagedStorage()
    connection = Connection(storage)
    root = connection.get_root()
    for number in range(6):
        root[number] = PersistentDict(v="ok")
    connection.commit()
    oids = [root[number]._p_oid for number in range(6)]
    storage.damaged = oids[2]
    serve_in_thread(storage, address=socket_path)
    return socket_path, oids, oids[2]


def test_bulk_load_answers_every_oid_and_names_the_damaged_one(damaged_server):
    address, oids, damaged = damaged_server
    client = ClientStorage(address=address, timeout=20)
    try:
        with pytest.raises(StorageError, match=f"oid {int.from_bytes(damaged)}"):
            list(client.bulk_load(oids))
        # The connection is still in step: the others load, in one request too.
        others = [oid for oid in oids if oid != damaged]
        assert len(list(client.bulk_load(others))) == len(others)
        with pytest.raises(StorageError, match="byte offset 1234"):
            client.load(damaged)
    finally:
        client.close()


def test_prefetch_skips_a_damaged_record(damaged_server):
    address, oids, damaged = damaged_server
    connection = Connection(ClientStorage(address=address, prefetch=100))
    try:
        root = connection.get_root()  # prefetches the objects it refers to
        assert root[0]["v"] == "ok"
        with pytest.raises(StorageError, match=f"oid {int.from_bytes(damaged)}"):
            root[2]["v"]  # noqa: B018 - the load of the damaged record
    finally:
        connection.close()
