"""Bulk loads cannot make the server build huge replies: an oid listed many
times is read once per batch, replies are built as the client reads them, and
a request listing too many oids is a protocol error."""

from __future__ import annotations

import threading

import pytest
from dhruva.client_storage import ClientStorage
from dhruva.error import ProtocolError, StorageError
from dhruva.net_protocol import (
    CMD_BULK_LOAD,
    MAX_BULK_OIDS,
    STATUS_ERROR,
    STATUS_OKAY,
    frame,
    unpack_error,
)
from dhruva.record import ROOT_OID, unpack_record
from dhruva.storage import MemoryStorage
from dhruva.storage_testing import commit, make_record, new_oids


class CountingStorage(MemoryStorage):
    """A MemoryStorage that counts its loads."""

    def __init__(self):
        super().__init__()
        self.loads = 0
        self.counting = threading.Lock()

    def load(self, oid):
        with self.counting:
            self.loads += 1
        return super().load(oid)


def test_one_big_record_listed_a_thousand_times_is_read_once_per_batch(
    wire, socket_path, serve_in_thread
):
    storage = CountingStorage()
    serve_in_thread(storage, address=socket_path)
    setup = ClientStorage(address=socket_path)
    (big,) = new_oids(setup, 1)
    data = bytes(range(256)) * 2000  # 500 KB
    commit(setup, make_record(ROOT_OID), make_record(big, data))
    storage.loads = 0

    sock = wire.connect(socket_path, timeout=30)
    wire.shake_hands(sock)
    sock.sendall(frame(CMD_BULK_LOAD + big * 1000))
    # While that client reads nothing, the server serves others.
    assert unpack_record(setup.load(big))[1] == data
    replies = [wire.read_frame(sock) for _ in range(1000)]
    assert all(reply == STATUS_OKAY + make_record(big, data) for reply in replies)
    # Without the duplicates read again (1000 loads before), a few per batch.
    assert storage.loads < 50
    sock.close()
    setup.close()


def test_a_bulk_load_of_too_many_oids_is_a_protocol_error(wire, memory_server):
    sock = wire.connect(memory_server.address)
    wire.shake_hands(sock)
    sock.sendall(frame(CMD_BULK_LOAD + ROOT_OID * (MAX_BULK_OIDS + 1)))
    reply = wire.read_frame(sock)
    assert reply is not None and reply[:1] == STATUS_ERROR
    error = unpack_error(reply[1:])
    assert isinstance(error, ProtocolError)
    assert f"at most {MAX_BULK_OIDS}" in str(error)
    assert wire.read_frame(sock) is None  # the connection is closed
    sock.close()


def test_a_connection_may_hold_only_so_many_uncommitted_oids(
    socket_path, serve_in_thread
):
    serve_in_thread(MemoryStorage(), address=socket_path, max_reserved=2048)
    client = ClientStorage(address=socket_path)
    try:
        oids = [client.new_oid() for _ in range(2048)]  # two requests of 1024
        with pytest.raises(StorageError, match="may hold at most 2048"):
            client.new_oid()
        # Committing some makes room again.
        commit(client, *(make_record(oid) for oid in oids[:1024]))
        assert len({client.new_oid() for _ in range(1000)}) == 1000
    finally:
        client.close()
