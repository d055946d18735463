"""Issue #5: a client survives a server restart without returning stale data."""

from __future__ import annotations

import pytest
from dhruva.client_storage import ClientStorage, ConnectionLostError
from dhruva.connection import Connection
from dhruva.error import DhruvaError, ReadConflictError
from dhruva.persistent_dict import PersistentDict


@pytest.fixture
def restartable(run_server, tmp_path, socket_path):
    """Start (and restart) a FileStorage server on one file and socket."""
    database = tmp_path / "restart.durus"

    def start():
        return run_server("--file", str(database), "--address", socket_path)

    return start


def kill(server):
    server.process.kill()
    server.process.wait(20)


def test_a_transaction_in_flight_fails_retryably_then_the_client_goes_on(
    restartable, socket_path
):
    server = restartable()
    connection = Connection(ClientStorage(address=socket_path))
    connection.get_root()["count"] = 1
    connection.commit()

    kill(server)
    restartable()
    connection.get_root()["count"] = 2
    with pytest.raises(ConnectionLostError) as info:
        connection.commit()
    assert info.value.retryable
    assert isinstance(info.value, DhruvaError)
    assert "abort()" in str(info.value)

    # The usual retry loop works: abort, run the transaction again.
    connection.abort()
    assert connection.get_root()["count"] == 1
    connection.get_root()["count"] = 2
    connection.commit()
    connection.close()

    check = Connection(ClientStorage(address=socket_path))
    assert check.get_root()["count"] == 2
    check.close()


def test_after_a_restart_a_client_never_returns_data_older_than_seen(
    restartable, socket_path
):
    server = restartable()
    first = Connection(ClientStorage(address=socket_path))
    first.get_root()["child"] = PersistentDict(value="old")
    first.commit()
    assert first.get_root()["child"]["value"] == "old"  # cached by `first`

    # Restart; another client changes the object while `first` is away.
    kill(server)
    restartable()
    second = Connection(ClientStorage(address=socket_path))
    second.get_root()["child"]["value"] = "new"
    second.commit()
    second.close()

    # `first` reconnects on its next operation and drops its whole cache.
    first.abort()
    assert first.get_root()["child"]["value"] == "new"
    first.close()


def test_a_load_after_a_restart_reads_fresh_state(restartable, socket_path):
    server = restartable()
    writer = Connection(ClientStorage(address=socket_path))
    writer.get_root()["a"] = PersistentDict(value=1)
    writer.get_root()["b"] = PersistentDict(value=1)
    writer.commit()
    writer.close()
    reader = Connection(ClientStorage(address=socket_path))
    assert reader.get_root()["a"]["value"] == 1  # a is cached, b a ghost
    reader.abort()

    kill(server)
    restartable()
    second = Connection(ClientStorage(address=socket_path))
    second.get_root()["a"]["value"] = 2
    second.get_root()["b"]["value"] = 2
    second.commit()
    second.close()

    # Without an abort: the first load after the reconnect ghosts the whole
    # cache (or, if this transaction used a cached object, raises a retryable
    # conflict), never mixing old and new state.
    try:
        root = reader.get_root()
        values = (root["b"]["value"], root["a"]["value"])
    except ReadConflictError:
        reader.abort()
        root = reader.get_root()
        values = (root["b"]["value"], root["a"]["value"])
    assert values == (2, 2)
    reader.close()


def test_no_server_gives_a_retryable_error_each_time(restartable, socket_path):
    server = restartable()
    storage = ClientStorage(address=socket_path)
    kill(server)
    for _ in range(2):
        with pytest.raises(ConnectionLostError):
            storage.sync()
    restartable()
    first_sync = storage.sync()
    assert first_sync == [] and getattr(first_sync, "everything", False)
    assert not getattr(storage.sync(), "everything", False)
    storage.close()
