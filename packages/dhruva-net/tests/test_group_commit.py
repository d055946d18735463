"""Group commit (#6): concurrent commits share an fsync, each is answered only
once an fsync covers it, and every acknowledged commit survives a crash."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
from dhruva.client_storage import ClientStorage
from dhruva.connection import Connection
from dhruva.error import WriteConflictError
from dhruva.net_protocol import CMD_COMMIT
from dhruva.persistent_dict import PersistentDict
from dhruva.record import ROOT_OID, unpack_record
from dhruva.storage import MemoryStorage
from dhruva.storage_testing import commit, make_record, new_oids

#: A client process: commits its own counter COUNT times, printing each value
#: once the server acknowledged it. Arguments: address (host:port), name, count.
CLIENT = """
import sys
from dhruva.client_storage import ClientStorage
from dhruva.connection import Connection
from dhruva.error import WriteConflictError
from dhruva.net_protocol import CMD_COMMIT
from dhruva.persistent_dict import PersistentDict
from dhruva.error import ConflictError
from dhruva.persistent_dict import PersistentDict

host, _, port = sys.argv[1].rpartition(":")
name, count = sys.argv[2], int(sys.argv[3])
connection = Connection(ClientStorage(address=(host, int(port))))
while True:
    try:
        root = connection.get_root()
        root[name] = PersistentDict(value=0)
        connection.commit()
        break
    except ConflictError:
        connection.abort()
counter = connection.get_root()[name]
for value in range(1, count + 1):
    while True:
        try:
            counter["value"] = value
            connection.commit()
            break
        except ConflictError:
            connection.abort()
    print(value, flush=True)
connection.close()
"""


def start_clients(server, count, commits):
    # The root first: clients of a new database would all try to make it.
    Connection(ClientStorage(address=server.address)).close()
    host, port = server.address
    return [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, f"{host}:{port}", f"c{i}", str(commits)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]


def counters(storage):
    connection = Connection(storage)
    try:
        root = connection.get_root()
        return {name: root[name]["value"] for name in root}
    finally:
        connection.close()


def test_eight_clients_committing_at_once_all_succeed(run_server, tmp_path):
    server = run_server("--file", str(tmp_path / "db.durus"), "--port", "0")
    clients = start_clients(server, 8, 40)
    for process in clients:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert out.split() == [str(value) for value in range(1, 41)]
    storage = ClientStorage(address=server.address)
    assert counters(storage) == {f"c{i}": 40 for i in range(8)}


def test_every_acknowledged_commit_survives_a_kill_of_the_server(run_server, tmp_path):
    from dhruva.file_storage import FileStorage

    path = tmp_path / "db.durus"
    server = run_server("--file", str(path), "--port", "0")
    clients = start_clients(server, 8, 100_000)
    time.sleep(3)  # let them commit for a while
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(20)

    acknowledged = {}
    for number, process in enumerate(clients):
        out, _err = process.communicate(timeout=60)
        values = out.split()
        acknowledged[f"c{number}"] = int(values[-1]) if values else 0
    assert sum(acknowledged.values()) > 8  # they did commit before the kill

    with FileStorage(str(path)) as storage:
        found = counters(storage)
    for name, value in acknowledged.items():
        # The last acknowledged value, or a later one written before the kill.
        assert found.get(name, 0) >= value, (name, found, acknowledged)


class SlowDurableStorage(MemoryStorage):
    """A MemoryStorage with deferred durability whose fsync takes 0.3 s."""

    deferred_durability = True

    def __init__(self, fsync_seconds=0.3):
        super().__init__()
        self.fsync_seconds = fsync_seconds
        self.syncs = 0
        self.syncing = threading.Event()
        self._pending = 0

    def end(self, handle_invalidations=None, *, durable=True):
        super().end(handle_invalidations)
        self._pending += 1
        if durable:
            self.make_durable()

    def make_durable(self):
        if not self._pending:
            return
        self._pending = 0
        self.syncs += 1
        self.syncing.set()
        time.sleep(self.fsync_seconds)
        self.syncing.clear()


def test_concurrent_commits_share_an_fsync_and_are_seen_after_it(
    socket_path, serve_in_thread
):
    storage = SlowDurableStorage()
    serve_in_thread(storage, address=socket_path)
    setup = ClientStorage(address=socket_path)
    oids = new_oids(setup, 8)
    commit(setup, make_record(ROOT_OID, b"root"), *(make_record(o, b"0") for o in oids))
    storage.syncs = 0

    clients = [ClientStorage(address=socket_path) for _ in oids]
    for client, oid in zip(clients, oids, strict=True):
        client.load(oid)  # a client writes only what it read
    done = []

    def commit_one(client, oid):
        commit(client, make_record(oid, b"1"))
        done.append(oid)

    threads = [
        threading.Thread(target=commit_one, args=pair, daemon=True)
        for pair in zip(clients, oids, strict=True)
    ]
    try:
        for thread in threads:
            thread.start()
        assert storage.syncing.wait(20)
        # While an fsync runs, its commits are not answered, and others read
        # the records from before them.
        assert done == []
        assert {unpack_record(setup.load(oid))[1] for oid in oids} == {b"0"}

        for thread in threads:
            thread.join(30)
        assert sorted(done) == sorted(oids)
        assert storage.syncs < len(oids)  # commits shared fsyncs
        setup.sync()
        assert {unpack_record(setup.load(oid))[1] for oid in oids} == {b"1"}
    finally:
        setup.close()
        for client in clients:
            client.close()


def test_a_commit_awaiting_its_fsync_conflicts_with_a_client_that_read_it(
    socket_path, serve_in_thread
):
    storage = SlowDurableStorage()
    serve_in_thread(storage, address=socket_path)
    a, b = ClientStorage(address=socket_path), ClientStorage(address=socket_path)
    x, y = new_oids(a, 2)
    commit(a, make_record(ROOT_OID), make_record(x, b"0"), make_record(y, b"0"))
    b.sync()
    assert unpack_record(b.load(y))[1] == b"0"
    assert unpack_record(b.load(x))[1] == b"0"  # b reads x

    told: list[bytes] = []

    def b_read_x(oids):
        told.extend(oids)
        if x in oids:
            raise WriteConflictError(oids)

    writing = threading.Thread(target=commit, args=(a, make_record(x, b"a's")))
    try:
        writing.start()
        assert storage.syncing.wait(20)

        # b writes y, having read x: its commit waits for a's to be
        # published, then b hears of x.
        b.begin()
        b.store(y, make_record(y, b"b's"))
        with pytest.raises(WriteConflictError):
            b.end(b_read_x)
        assert x in told
        writing.join(20)

        # Synced, b reads a's x and commits.
        b.sync()
        assert unpack_record(b.load(x))[1] == b"a's"
        commit(b, make_record(y, b"b's"))
        a.sync()
        assert unpack_record(a.load(y))[1] == b"b's"
    finally:
        writing.join(20)
        a.close()
        b.close()


def test_clients_on_disjoint_objects_commit_without_refusals_sharing_fsyncs(
    socket_path, serve_in_thread, monkeypatch
):
    storage = SlowDurableStorage(fsync_seconds=0.02)
    serve_in_thread(storage, address=socket_path)
    count, rounds = 20, 5
    setup = Connection(ClientStorage(address=socket_path))
    root = setup.get_root()
    for number in range(count):
        root[number] = PersistentDict(n=0)
    setup.commit()
    storage.syncs = 0

    commit_frames = []
    send = ClientStorage._send

    def counting_send(self, payload):
        if payload[:1] == CMD_COMMIT:
            commit_frames.append(payload)
        send(self, payload)

    monkeypatch.setattr(ClientStorage, "_send", counting_send)
    connections = [Connection(ClientStorage(address=socket_path)) for _ in range(count)]
    start = threading.Barrier(count)
    errors = []

    def work(number):
        try:
            counter = connections[number].get_root()[number]
            start.wait()
            for _round in range(rounds):
                counter["n"] += 1
                connections[number].commit()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(count)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        # Every commit was sent once: none was refused.
        assert len(commit_frames) == count * rounds
        assert storage.syncs < count * rounds  # commits shared fsyncs
        setup.abort()
        assert [setup.get_root()[n]["n"] for n in range(count)] == [rounds] * count
    finally:
        setup.close()
        for connection in connections:
            connection.close()
