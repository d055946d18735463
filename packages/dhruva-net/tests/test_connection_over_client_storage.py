"""Connections on ClientStorages of one server: Durus's multi-client semantics."""

from __future__ import annotations

import threading

import pytest
from dhruva.client_storage import ClientStorage
from dhruva.connection import Connection
from dhruva.error import ConflictError, ReadConflictError, WriteConflictError
from dhruva.persistent_dict import PersistentDict


@pytest.fixture
def connections(memory_server):
    first = Connection(ClientStorage(address=memory_server.address))
    second = Connection(ClientStorage(address=memory_server.address))
    yield first, second
    first.close()
    second.close()


def test_each_connection_sees_the_others_commits(connections):
    first, second = connections
    first.get_root()["greeting"] = "hello"
    first.commit()

    second.abort()
    assert second.get_root()["greeting"] == "hello"
    second.get_root()["answer"] = 42
    second.commit()

    first.commit()  # nothing changed: brings in the other's commit
    assert first.get_root()["answer"] == 42
    assert dict(first.get_root()) == {"greeting": "hello", "answer": 42}


def test_new_objects_of_both_connections_get_distinct_oids(connections):
    first, second = connections
    first.get_root()["a"] = PersistentDict(name="first")
    first.commit()
    second.abort()
    second.get_root()["b"] = PersistentDict(name="second")
    second.commit()
    first.abort()
    root = first.get_root()
    assert root["a"]._p_oid != root["b"]._p_oid
    assert (root["a"]["name"], root["b"]["name"]) == ("first", "second")


def test_writing_what_another_connection_changed_is_a_write_conflict(connections):
    first, second = connections
    first.get_root()["count"] = 0
    first.commit()
    second.abort()
    assert second.get_root()["count"] == 0

    first.get_root()["count"] = 1
    first.commit()
    second.get_root()["count"] = 100
    with pytest.raises(WriteConflictError) as info:
        second.commit()
    assert info.value.oids == [b"\0" * 8]

    # Nothing of the refused commit was written; after abort it runs again.
    first.abort()
    assert first.get_root()["count"] == 1
    second.abort()
    assert second.get_root()["count"] == 1
    second.get_root()["count"] += 1
    second.commit()
    first.abort()
    assert first.get_root()["count"] == 2


def test_a_commit_untouched_by_the_others_changes_goes_through(connections):
    first, second = connections
    root = first.get_root()
    root["left"] = PersistentDict()
    root["right"] = PersistentDict()
    first.commit()
    second.abort()
    second.get_root()["right"]["seen"] = True  # loads root and right

    first.get_root()["left"]["x"] = 1  # a different object
    first.commit()
    second.commit()
    first.abort()
    assert first.get_root()["right"]["seen"] is True
    assert second.get_root()["left"]["x"] == 1


def test_loading_past_another_commit_this_transaction_read_is_a_read_conflict(
    connections,
):
    first, second = connections
    first.get_root()["a"] = PersistentDict(v=1)
    first.get_root()["b"] = PersistentDict(v=1)
    first.commit()
    second.abort()
    assert second.get_root()["a"]["v"] == 1  # read in this transaction
    b = second.get_root()["b"]  # still a ghost

    first.get_root()["a"]["v"] = 2
    first.get_root()["b"]["v"] = 2
    first.commit()
    with pytest.raises(ReadConflictError):
        b["v"]
    second.abort()
    assert (second.get_root()["a"]["v"], second.get_root()["b"]["v"]) == (2, 2)


def test_loading_a_ghost_another_client_changed_brings_in_the_new_state(
    connections,
):
    first, second = connections
    first.get_root()["child"] = PersistentDict(value=1)
    first.commit()
    second.abort()
    child = second.get_root()["child"]  # a ghost, never read

    first.get_root()["child"]["value"] = 2
    first.commit()
    assert child["value"] == 2


def test_pack_through_a_connection_keeps_reachable_objects(connections):
    first, second = connections
    first.get_root()["kept"] = PersistentDict(x=1)
    first.get_root()["dropped"] = PersistentDict(y=2)
    first.commit()
    del first.get_root()["dropped"]
    first.commit()
    size_before = first.get_storage().get_size()
    second.pack()
    assert first.get_storage().get_size() == size_before - 1
    second.abort()
    assert second.get_root()["kept"]["x"] == 1


def test_concurrent_increments_with_retries_lose_no_update(memory_server):
    setup = Connection(ClientStorage(address=memory_server.address))
    setup.get_root()["count"] = 0
    setup.commit()
    workers, increments = 4, 25
    conflicts = []
    errors = []

    def work():
        # Each thread opens its connection while the others already commit.
        connection = Connection(ClientStorage(address=memory_server.address))
        try:
            for _ in range(increments):
                while True:
                    try:
                        connection.abort()
                        connection.get_root()["count"] += 1
                        connection.commit()
                        break
                    except ConflictError:
                        conflicts.append(1)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    setup.abort()
    assert setup.get_root()["count"] == workers * increments
    setup.close()


def test_a_connection_opens_on_a_storage_that_missed_a_root_commit(memory_server):
    first = Connection(ClientStorage(address=memory_server.address))
    late = ClientStorage(address=memory_server.address)
    try:
        first.get_root()["x"] = 1
        first.commit()
        second = Connection(late)
        assert second.get_root()["x"] == 1
    finally:
        first.close()
        late.close()


def test_connections_open_while_another_client_commits_the_root(memory_server):
    writer = Connection(ClientStorage(address=memory_server.address))
    stop = threading.Event()

    def commit_in_a_loop():
        while not stop.is_set():
            writer.get_root()["n"] = writer.get_root().get("n", 0) + 1
            writer.commit()

    thread = threading.Thread(target=commit_in_a_loop)
    thread.start()
    failures = []
    try:
        for _ in range(60):
            storage = ClientStorage(address=memory_server.address)
            try:
                Connection(storage).get_root().get("n")
            except ConflictError as error:
                failures.append(error)
            finally:
                storage.close()
    finally:
        stop.set()
        thread.join(30)
        writer.close()
    assert not failures
