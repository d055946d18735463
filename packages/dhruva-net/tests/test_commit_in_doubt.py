"""A commit whose answer is lost is never reported retryable when it may have
been applied (issue #5: a retry would apply it twice)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from dhruva.client_storage import (
    ClientStorage,
    CommitOutcomeUnknownError,
    ConnectionLostError,
)
from dhruva.connection import Connection
from dhruva.net_protocol import CMD_COMMIT
from dhruva.persistent_dict import PersistentDict
from dhruva.storage import MemoryStorage


def lose_commit_answer(storage: ClientStorage, *, deliver: bool) -> None:
    """Make the next commit's answer get lost; the commit request reaches
    the server only when ``deliver``."""
    send, reply = storage._send, storage._reply
    state = {"commit": False}

    def fake_send(payload: bytes) -> None:
        if payload == CMD_COMMIT and not state["commit"]:
            state["commit"] = True
            if not deliver:
                return
        send(payload)

    def fake_reply() -> tuple[bytes, bytes]:
        if state["commit"] and state["commit"] != "done":
            state["commit"] = "done"  # type: ignore[assignment]
            if deliver:
                reply()  # the server has answered; the answer is lost
            raise storage._lost(ConnectionResetError("reset by peer"))
        return reply()

    storage._send = fake_send  # type: ignore[method-assign]
    storage._reply = fake_reply  # type: ignore[method-assign]


def count(address: Any) -> Any:
    check = Connection(ClientStorage(address=address))
    try:
        return check.get_root().get("count")
    finally:
        check.close()


def test_a_commit_applied_before_its_answer_was_lost_is_reported_done(
    serve_in_thread, socket_path
):
    serve_in_thread(MemoryStorage(), address=socket_path)
    storage = ClientStorage(address=socket_path)
    connection = Connection(storage)
    connection.get_root()["count"] = 1
    connection.commit()

    lose_commit_answer(storage, deliver=True)
    connection.get_root()["count"] = 2
    connection.get_root()["new"] = PersistentDict()
    connection.commit()  # no error: the server holds what was sent

    assert count(socket_path) == 2
    connection.abort()
    connection.get_root()["count"] = 3
    connection.commit()
    assert count(socket_path) == 3
    connection.close()


def test_a_commit_of_unknown_outcome_is_not_retryable_and_names_its_oids(
    serve_in_thread, socket_path
):
    serve_in_thread(MemoryStorage(), address=socket_path)
    storage = ClientStorage(address=socket_path)
    connection = Connection(storage)
    connection.get_root()["count"] = 1
    connection.commit()

    lose_commit_answer(storage, deliver=False)
    connection.get_root()["count"] = 2
    with pytest.raises(CommitOutcomeUnknownError) as info:
        connection.commit()
    error = info.value
    assert isinstance(error, ConnectionLostError)
    assert not error.retryable
    assert error.oids == [b"\0" * 8]
    assert "outcome of a commit" in str(error) and "oids 0" in str(error)
    connection.abort()
    assert count(socket_path) == 1
    connection.close()


def test_a_connection_lost_before_the_commit_request_stays_retryable(
    serve_in_thread, socket_path
):
    serve_in_thread(MemoryStorage(), address=socket_path)
    storage = ClientStorage(address=socket_path)
    connection = Connection(storage)
    connection.get_root()["count"] = 1
    connection.commit()

    send = storage._send

    def fail_commit(payload: bytes) -> None:
        if payload == CMD_COMMIT:
            raise storage._lost(BrokenPipeError("broken pipe"))
        send(payload)

    storage._send = fail_commit  # type: ignore[method-assign]
    connection.get_root()["count"] = 2
    with pytest.raises(ConnectionLostError) as info:
        connection.commit()
    assert info.value.retryable
    assert not isinstance(info.value, CommitOutcomeUnknownError)
    storage._send = send  # type: ignore[method-assign]
    connection.abort()
    connection.get_root()["count"] = 2
    connection.commit()
    assert count(socket_path) == 2
    connection.close()


class SlowStorage(MemoryStorage):
    """A MemoryStorage whose commits take a while once ``slow`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.slow = False
        self.writing = threading.Event()

    def end(self, *args: Any, **kwargs: Any) -> None:
        if self.slow:
            self.writing.set()
            time.sleep(0.5)
        super().end(*args, **kwargs)


def test_a_graceful_stop_answers_the_commit_it_is_writing(serve_in_thread, socket_path):
    storage = SlowStorage()
    server = serve_in_thread(storage, address=socket_path)
    client = ClientStorage(address=socket_path)
    connection = Connection(client)
    connection.get_root()["count"] = 1
    connection.commit()

    outcome: list[BaseException | None] = []

    def commit() -> None:
        try:
            connection.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)
        else:
            outcome.append(None)

    storage.slow = True
    connection.get_root()["count"] = 2
    committer = threading.Thread(target=commit)
    committer.start()
    assert storage.writing.wait(20)
    server.stop()  # as SIGTERM does
    committer.join(20)
    client.close()  # the server is gone: no Connection.close() (it syncs)
    assert outcome == [None]
    storage.slow = False
    assert Connection(storage).get_root()["count"] == 2
