"""Many clients opening a new database at once: one creates the root, the
others wait for its commit instead of calling the database invalid."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from dhruva.client_storage import ClientStorage
from dhruva.connection import Connection
from dhruva.error import ConflictError
from dhruva.record import ROOT_OID
from dhruva.storage import MemoryStorage
from dhruva.storage_server import StorageServer

CLIENTS = 10


def commit_own_key(connection: Connection, key: str) -> None:
    """Set ``root[key]`` and commit, running the transaction again on conflicts."""
    for _attempt in range(200):
        try:
            connection.get_root()[key] = key
            connection.commit()
            return
        except ConflictError:
            connection.abort()
    raise AssertionError(f"{key}: the commit kept conflicting")


def open_and_commit_all_at_once(
    address: Any,
) -> tuple[list[Connection], list[str]]:
    """In a thread per client, open a Connection on ``address`` (all at the
    same moment) and commit a key of its own into the root.

    :return: the connections, and what went wrong, per client.
    """
    storages = [ClientStorage(address=address) for _ in range(CLIENTS)]
    start = threading.Barrier(CLIENTS)
    opened: list[Connection] = []
    failed: list[str] = []

    def client(number: int, storage: ClientStorage) -> None:
        start.wait()
        try:
            connection = Connection(storage)
            opened.append(connection)
            commit_own_key(connection, f"client {number}")
        except BaseException as error:  # noqa: BLE001 - reported by the test
            failed.append(f"client {number}: {type(error).__name__}: {error}")

    threads = [
        threading.Thread(target=client, args=(number, storage))
        for number, storage in enumerate(storages)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    for storage in storages:
        if not any(connection.storage is storage for connection in opened):
            storage.close()
    return opened, failed


def check_clients_share_one_root(address: Any) -> None:
    keys = sorted(f"client {number}" for number in range(CLIENTS))
    opened, failed = open_and_commit_all_at_once(address)
    try:
        assert failed == []
        assert len(opened) == CLIENTS
        for connection in opened:
            connection.abort()
            root = connection.get_root()
            assert root._p_oid == ROOT_OID
            assert sorted(root) == keys
    finally:
        for connection in opened:
            connection.close()

    with Connection(ClientStorage(address=address)) as late:
        assert sorted(late.get_root()) == keys


def test_clients_opening_a_new_server_at_once_share_its_root(
    memory_server: Any,
) -> None:
    check_clients_share_one_root(memory_server.address)


def test_clients_opening_a_new_in_process_server_at_once_share_its_root(
    serve_in_thread: Callable[..., StorageServer], socket_path: str
) -> None:
    serve_in_thread(MemoryStorage(), address=socket_path)
    check_clients_share_one_root(socket_path)
