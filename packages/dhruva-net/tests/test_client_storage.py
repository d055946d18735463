"""ClientStorage against a real server process, on loopback and a unix socket."""

from __future__ import annotations

import time

import pytest
from dhruva.client_storage import ClientStorage
from dhruva.connection import Connection
from dhruva.error import (
    ConflictError,
    DhruvaKeyError,
    ReadConflictError,
    StorageError,
    WriteConflictError,
)
from dhruva.net_protocol import MAX_RECORD_SIZE
from dhruva.record import ROOT_OID, unpack_record
from dhruva.storage_testing import (
    BasicStorageContract,
    DurableStorageContract,
    InvalidatingStorageContract,
    IterableStorageContract,
    PackableStorageContract,
    ReadOnlyStorageContract,
    commit,
    make_record,
    new_oids,
)


class TestClientStorageOverTCP(
    BasicStorageContract,
    IterableStorageContract,
    InvalidatingStorageContract,
    PackableStorageContract,
):
    @pytest.fixture
    def storage(self, memory_server):
        client = ClientStorage(address=memory_server.address)
        yield client
        client.close()

    @pytest.fixture
    def second_client(self, memory_server):
        client = ClientStorage(address=memory_server.address)
        yield client
        client.close()


class TestClientStorageOverUnixSocket(
    BasicStorageContract, IterableStorageContract, InvalidatingStorageContract
):
    @pytest.fixture
    def server(self, run_server, socket_path):
        return run_server("--storage", "memory", "--address", socket_path)

    @pytest.fixture
    def storage(self, server):
        client = ClientStorage(address=server.address)
        yield client
        client.close()

    @pytest.fixture
    def second_client(self, server):
        client = ClientStorage(address=server.address)
        yield client
        client.close()


class TestClientStorageOverFileStorage(
    BasicStorageContract,
    DurableStorageContract,
    IterableStorageContract,
    InvalidatingStorageContract,
    PackableStorageContract,
    ReadOnlyStorageContract,
):
    """A FileStorage served: its incremental packer runs between requests."""

    @pytest.fixture
    def path(self, tmp_path):
        return str(tmp_path / "served.durus")

    @pytest.fixture
    def server(self, run_server, path):
        return run_server("--file", path, "--port", "0")

    @pytest.fixture
    def storage(self, server):
        client = ClientStorage(address=server.address)
        yield client
        client.close()

    @pytest.fixture
    def second_client(self, server):
        client = ClientStorage(address=server.address)
        yield client
        client.close()

    @pytest.fixture
    def reopen(self, server, run_server, path):
        def reopen(client):
            client.stop_server()
            assert server.process.wait(20) == 0
            return ClientStorage(
                address=run_server("--file", path, "--port", "0").address
            )

        return reopen

    @pytest.fixture
    def open_readonly(self, server, run_server, path):
        def open_readonly(client):
            client.stop_server()
            assert server.process.wait(20) == 0
            readonly = run_server("--file", path, "--readonly", "--port", "0")
            return ClientStorage(address=readonly.address)

        return open_readonly


class TestClientStorageOverSqliteStorage(
    BasicStorageContract,
    DurableStorageContract,
    IterableStorageContract,
    InvalidatingStorageContract,
    PackableStorageContract,
    ReadOnlyStorageContract,
):
    """A SqliteStorage served."""

    @pytest.fixture
    def path(self, tmp_path):
        return str(tmp_path / "served.sqlite")

    @pytest.fixture
    def server(self, run_server, path):
        return run_server("--file", path, "--storage", "sqlite", "--port", "0")

    @pytest.fixture
    def reopen(self, server, run_server, path):
        def reopen(client):
            client.stop_server()
            assert server.process.wait(20) == 0
            return ClientStorage(
                address=run_server("--file", path, "--port", "0").address
            )

        return reopen

    @pytest.fixture
    def open_readonly(self, server, run_server, path):
        def open_readonly(client):
            client.stop_server()
            assert server.process.wait(20) == 0
            readonly = run_server("--file", path, "--readonly", "--port", "0")
            return ClientStorage(address=readonly.address)

        return open_readonly

    @pytest.fixture
    def storage(self, server):
        client = ClientStorage(address=server.address)
        yield client
        client.close()

    @pytest.fixture
    def second_client(self, server):
        client = ClientStorage(address=server.address)
        yield client
        client.close()


@pytest.fixture
def clients(memory_server):
    a = ClientStorage(address=memory_server.address)
    b = ClientStorage(address=memory_server.address)
    yield a, b
    a.close()
    b.close()


def data_of(storage, oid):
    return unpack_record(storage.load(oid))[1]


def test_capabilities_come_from_the_served_storage(clients):
    a, _b = clients
    assert a.invalidating and a.packable and a.iterable and not a.readonly


def test_load_of_an_oid_another_client_changed_is_a_read_conflict(clients):
    a, b = clients
    (x,) = new_oids(a, 1)
    commit(a, make_record(x, b"one"))
    assert b.sync() == [x]
    assert data_of(b, x) == b"one"

    commit(a, make_record(x, b"two"))
    with pytest.raises(ReadConflictError) as info:
        b.load(x)
    assert info.value.oids == [x]
    with pytest.raises(ReadConflictError):
        list(b.bulk_load([x]))

    # After sync the client may read the new state.
    assert b.sync() == [x]
    assert data_of(b, x) == b"two"
    assert b.sync() == []


def test_commit_over_invalidations_is_refused_and_nothing_is_written(clients):
    a, b = clients
    x, y = new_oids(a, 2)
    commit(a, make_record(x, b"a's"))
    b.sync()
    commit(a, make_record(x, b"a's again"))

    seen: list[bytes] = []

    def handle_invalidations(oids):
        seen.extend(oids)
        raise WriteConflictError(oids)

    b.begin()
    z = b.new_oid()
    b.store(x, make_record(x, b"b's"))
    b.store(z, make_record(z, b"b's new object"))
    with pytest.raises(WriteConflictError):
        b.end(handle_invalidations)
    assert seen == [x]
    assert data_of(a, x) == b"a's again"
    with pytest.raises(DhruvaKeyError):
        a.load(z)

    # Having handled them, b commits; its unused oid is handed out again.
    assert b.new_oid() == z
    b.begin()
    b.store(z, make_record(z, b"second try"))
    b.end(handle_invalidations)
    assert a.sync() == [z]
    assert data_of(a, z) == b"second try"


def test_invalidations_that_do_not_matter_let_the_commit_through(clients):
    a, b = clients
    x, y = new_oids(a, 2)
    commit(a, make_record(x, b"x"), make_record(y, b"y"))
    b.sync()
    b.load(y)  # a client writes what it has read since others changed it
    b.load(x)
    commit(a, make_record(x, b"x2"))

    seen: list[bytes] = []
    b.begin()
    b.store(y, make_record(y, b"y from b"))
    b.end(seen.extend)
    assert seen == [x]
    assert a.sync() == [y]
    assert data_of(a, y) == b"y from b"
    assert b.sync() == []


def test_changes_a_client_never_read_do_not_hold_its_commit_up(clients):
    a, b = clients
    x, y = new_oids(a, 2)
    commit(a, make_record(x, b"x"), make_record(y, b"y"))
    b.sync()
    b.load(y)  # b never reads x
    commit(a, make_record(x, b"x2"))

    seen: list[bytes] = []
    b.begin()
    b.store(y, make_record(y, b"y from b"))
    b.end(seen.extend)
    assert seen == []  # committed without a refusal
    assert a.sync() == [y]
    assert data_of(a, y) == b"y from b"
    assert b.sync() == [x]  # told at its next sync


def test_invalidations_without_a_handler_are_returned_by_the_next_sync(clients):
    a, b = clients
    (x,) = new_oids(a, 1)
    (y,) = new_oids(b, 1)
    commit(a, make_record(x, b"x"))
    commit(b, make_record(y, b"y"))
    assert b.sync() == [x]
    assert a.sync() == [y]
    assert data_of(a, y) == b"y"


def test_bulk_load_of_many_oids_keeps_order_and_stream(clients):
    a, b = clients
    oids = new_oids(a, 2500)
    commit(a, *(make_record(oid, oid) for oid in oids))
    b.sync()
    assert [unpack_record(r)[1] for r in b.bulk_load(oids[::-1])] == oids[::-1]

    missing = (10**9).to_bytes(8, "big")
    with pytest.raises(DhruvaKeyError):
        list(b.bulk_load([oids[0], missing, oids[1]]))
    assert data_of(b, oids[1]) == oids[1]


def test_a_client_cannot_commit_an_oid_handed_to_another(clients):
    a, b = clients
    (x,) = new_oids(a, 1)
    with pytest.raises(StorageError, match="handed to client"):
        commit(b, make_record(x, b"stolen"))
    commit(a, make_record(x, b"mine"))
    assert data_of(a, x) == b"mine"


def test_a_record_too_big_for_a_frame_is_refused_before_sending(clients):
    a, _b = clients
    (x,) = new_oids(a, 1)
    a.begin()
    with pytest.raises(StorageError, match=f"oid {int.from_bytes(x, 'big')}"):
        a.store(x, b"\0" * (MAX_RECORD_SIZE + 1))


def test_a_big_record_travels_whole(clients):
    a, b = clients
    (x,) = new_oids(a, 1)
    data = bytes(range(256)) * 40000  # about 10 MB
    commit(a, make_record(x, data))
    b.sync()
    assert data_of(b, x) == data
    assert [unpack_record(r)[1] for r in b.bulk_load([x, x])] == [data, data]


def test_size_and_full_scan_in_small_batches(clients):
    a, b = clients
    oids = new_oids(a, 7)
    commit(a, make_record(ROOT_OID, b"root"), *(make_record(o) for o in oids))
    assert b.get_size() == 8
    scanned = [oid for oid, _record in b.gen_oid_record(batch_size=3)]
    assert sorted(scanned) == sorted([ROOT_OID, *oids])


@pytest.mark.parametrize("kind", ["memory", "file", "sqlite"])
def test_gcbytes_packs_the_storage_after_that_many_bytes(run_server, tmp_path, kind):
    where = [] if kind == "memory" else ["--file", str(tmp_path / "db")]
    server = run_server("--storage", kind, *where, "--port", "0", "--gcbytes", "2000")
    client = ClientStorage(address=server.address)
    try:
        (garbage,) = new_oids(client, 1)
        commit(client, make_record(ROOT_OID, b"root"), make_record(garbage))
        assert data_of(client, garbage) == b"data"
        commit(client, make_record(ROOT_OID, b"x" * 3000))

        # The pack runs in the server after the commit; allow it plenty of time.
        deadline = time.monotonic() + 20
        while True:
            try:
                client.load(garbage)
            except DhruvaKeyError:
                break
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        # The log line follows the pack's last storage call.
        while "pack finished" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
    finally:
        client.close()


def test_use_after_close_names_the_fix(memory_server):
    client = ClientStorage(address=memory_server.address)
    client.close()
    client.close()
    with pytest.raises(StorageError, match="closed"):
        client.load(ROOT_OID)


def test_no_server_is_a_storage_error_naming_the_address(socket_path):
    with pytest.raises(StorageError, match="cannot connect.*server.sock"):
        ClientStorage(address=socket_path)


def test_a_client_too_far_behind_is_told_to_drop_everything(run_test_server):
    server = run_test_server("--max-unread", "50")
    writer = ClientStorage(address=server.address)
    behind = ClientStorage(address=server.address)
    reader = Connection(ClientStorage(address=server.address))
    try:
        root = reader.get_root()
        (x,) = new_oids(writer, 1)
        commit(writer, make_record(x, b"x"))
        assert x in behind.sync()
        assert data_of(behind, x) == b"x"

        # Others change more oids than the server keeps for one client.
        for start in range(0, 60, 20):
            oids = new_oids(writer, 20)
            commit(writer, *(make_record(oid, b"%d" % start) for oid in oids))

        # Until it syncs, it may neither read nor write.
        with pytest.raises(ReadConflictError):
            behind.load(x)
        with pytest.raises(ConflictError):
            commit(behind, make_record(x, b"stale"))
        synced = behind.sync()
        assert synced == [] and getattr(synced, "everything", False)
        assert data_of(behind, x) == b"x"

        # A Connection that far behind drops its objects and reads them anew.
        assert not root._p_is_ghost()
        reader.abort()
        assert root._p_is_ghost()
        assert dict(root) == {}

        # Changes made after that are checked as before.
        commit(writer, make_record(x, b"x2"))
        behind.sync()
        with pytest.raises(ConflictError):
            commit(behind, make_record(x, b"stale again"))
        assert data_of(writer, x) == b"x2"
    finally:
        writer.close()
        behind.close()
        reader.close()
