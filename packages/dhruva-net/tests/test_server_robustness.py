"""Issue #5: no client stalls another, fuzzed input, 100 clients, hostile clients,
released oids, failing packs and prefetch, against real server processes."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

import pytest
from dhruva.client_storage import ClientStorage
from dhruva.connection import Connection
from dhruva.error import ConflictError, StorageError
from dhruva.net_protocol import (
    CMD_BULK_LOAD,
    CMD_COMMIT,
    CMD_NEW_OIDS,
    CMD_SYNC,
    STATUS_CONFLICT,
    STATUS_ERROR,
    STATUS_OKAY,
    STATUS_REFUSED,
    ConnectionLostError,
    frame,
    pack_records,
    pack_uint32,
    unpack_error,
)
from dhruva.persistent import Persistent
from dhruva.persistent_dict import PersistentDict
from dhruva.record import ROOT_OID, unpack_record
from dhruva.storage import MemoryStorage
from dhruva.storage_testing import commit, make_record, new_oids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def timed_commits(address, count=10):
    """Commit ``count`` times; return the slowest commit's seconds."""
    client = ClientStorage(address=address, timeout=20)
    slowest = 0.0
    try:
        with contextlib.suppress(KeyError):
            client.load(ROOT_OID)  # a client writes only what it read
        for i in range(count):
            started = time.monotonic()
            commit(client, make_record(ROOT_OID, b"commit %d" % i))
            slowest = max(slowest, time.monotonic() - started)
        assert unpack_record(client.load(ROOT_OID))[1] == b"commit %d" % (count - 1)
    finally:
        client.close()
    return slowest


def test_stuck_idle_and_slow_clients_do_not_stall_a_commit(wire, memory_server):
    address = memory_server.address
    big = ClientStorage(address=address)
    commit(big, make_record(ROOT_OID, b"x" * 1_000_000))
    big.close()

    silent = wire.connect(address)  # connects, never says hello
    idle = wire.connect(address)
    wire.shake_hands(idle)
    half = wire.connect(address)
    wire.shake_hands(half)
    half.sendall(struct.pack(">I", 100) + b"L\0\0")  # a request cut short
    slow = wire.connect(address)
    wire.shake_hands(slow)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # Ask for 64 MB of replies and never read them.
    for _ in range(4):
        slow.sendall(frame(CMD_BULK_LOAD + ROOT_OID * 16))
    try:
        time.sleep(0.5)  # let the server fill its buffers towards the slow one
        assert timed_commits(address) < 1.0
    finally:
        for sock in (silent, idle, half, slow):
            sock.close()
    assert memory_server.process.poll() is None


def test_timeouts_close_idle_half_sent_and_non_reading_clients(wire, run_server):
    server = run_server(
        "--storage",
        "memory",
        "--port",
        "0",
        "--idle-timeout",
        "1",
        "--request-timeout",
        "1",
    )
    big = ClientStorage(address=server.address)
    commit(big, make_record(ROOT_OID, b"x" * 1_000_000))
    big.close()

    idle = wire.connect(server.address)
    wire.shake_hands(idle)
    half = wire.connect(server.address)
    wire.shake_hands(half)
    half.sendall(struct.pack(">I", 100) + b"L")
    slow = wire.connect(server.address)
    wire.shake_hands(slow)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(frame(CMD_BULK_LOAD + ROOT_OID * 32))
    try:
        assert wire.read_frame(idle) is None  # closed by the server
        reply = wire.read_frame(half)
        assert reply is not None and reply[:1] == STATUS_ERROR
        assert "not complete within 1.0 seconds" in str(unpack_error(reply[1:]))
        deadline = time.monotonic() + 20
        while "did not read its replies" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        assert "idle for 1.0 seconds" in server.log()
    finally:
        for sock in (idle, half, slow):
            sock.close()
    assert timed_commits(server.address, 3) < 1.0


def test_fuzzed_frames_get_a_protocol_error_and_the_server_serves_on(wire, run_server):
    server = run_server("--storage", "memory", "--port", "0")
    address = server.address

    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        data=st.binary(max_size=200),
        mode=st.sampled_from(["raw", "after-hello", "framed", "truncated", "big"]),
    )
    def fuzz(data: bytes, mode: str) -> None:
        with wire.connect(address, timeout=10) as sock:
            if mode != "raw":
                wire.shake_hands(sock)
            if mode == "framed":
                # A well-formed frame around random content (never "quit").
                data = frame(b"Q" not in data[:1] and data or b"?")
            elif mode == "truncated":
                data = frame(b"T" + data)[: max(1, len(data) // 2)]
            elif mode == "big":
                data = struct.pack(">I", 0xFFFFFFF0) + data
            elif mode == "after-hello" and data[:5] == b"\0\0\0\1Q":
                data = b"?"
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            # The server answers or not, but always ends the connection.
            while sock.recv(65536):
                pass

    fuzz()
    assert server.process.poll() is None
    assert timed_commits(address, 3) < 1.0


class Counter(Persistent):
    def __init__(self) -> None:
        self.value = 0


def test_a_hundred_clients_commit_at_once(memory_server):
    address = memory_server.address
    setup = Connection(ClientStorage(address=address))
    root = setup.get_root()
    for i in range(100):
        root[f"client{i}"] = PersistentDict(commits=0)
    root["shared"] = Counter()
    setup.commit()

    barrier = threading.Barrier(100)
    failures: list[BaseException] = []
    retries = [0]

    def work(i: int) -> None:
        try:
            connection = Connection(ClientStorage(address=address, timeout=60))
            barrier.wait(60)
            for _ in range(3):
                own = connection.get_root()[f"client{i}"]
                own["commits"] += 1
                connection.commit()
            while True:  # everybody changes this one: real conflicts
                try:
                    connection.get_root()["shared"].value += 1
                    connection.commit()
                    break
                except ConflictError:
                    retries[0] += 1
                    connection.abort()
            connection.close()
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures[:3]

    setup.abort()
    root = setup.get_root()
    assert [root[f"client{i}"]["commits"] for i in range(100)] == [3] * 100
    assert root["shared"].value == 100
    setup.close()


def hostile_client(wire, address):
    """A raw connection that has shaken hands and synced."""
    sock = wire.connect(address)
    wire.shake_hands(sock)
    sock.sendall(frame(CMD_SYNC))
    assert wire.read_frame(sock)[:1] == STATUS_OKAY
    return sock


def stage(sock, *records):
    for payload in pack_records((unpack_record(r)[0], r) for r in records):
        sock.sendall(frame(payload))


def test_a_client_that_skips_its_conflict_checks_is_refused(wire, memory_server):
    honest = ClientStorage(address=memory_server.address)
    commit(honest, make_record(ROOT_OID, b"first"))
    with hostile_client(wire, memory_server.address) as hostile:
        commit(honest, make_record(ROOT_OID, b"honest change"))

        # Refused once with the changed oid; committing again regardless is
        # refused as a conflict, and nothing is written.
        stage(hostile, make_record(ROOT_OID, b"overwrite"))
        hostile.sendall(frame(CMD_COMMIT))
        assert wire.read_frame(hostile) == STATUS_REFUSED + ROOT_OID
        hostile.sendall(frame(CMD_COMMIT))
        assert wire.read_frame(hostile) == STATUS_CONFLICT + ROOT_OID

        # Staged, then synced, then committed: still written before it knew.
        commit(honest, make_record(ROOT_OID, b"honest again"))
        stage(hostile, make_record(ROOT_OID, b"overwrite"))
        hostile.sendall(frame(CMD_SYNC))
        assert wire.read_frame(hostile) == STATUS_OKAY + b"\0" + ROOT_OID
        hostile.sendall(frame(CMD_COMMIT))
        assert wire.read_frame(hostile) == STATUS_CONFLICT + ROOT_OID

        # An oid nobody handed out.
        stage(hostile, make_record((10**9).to_bytes(8, "big"), b"made up"))
        hostile.sendall(frame(CMD_COMMIT))
        reply = wire.read_frame(hostile)
        assert reply[:1] == STATUS_ERROR
        assert "oid 1000000000 is not in the storage" in str(unpack_error(reply[1:]))

    assert unpack_record(honest.load(ROOT_OID))[1] == b"honest again"
    assert "writes 1 oids changed since it last synced" in memory_server.log()
    honest.close()


def test_a_stale_record_resent_after_its_refusal_is_refused_every_time(
    memory_server,
):
    good = Connection(ClientStorage(address=memory_server.address))
    root = good.get_root()
    root["v"] = "orig"
    good.commit()
    hostile = ClientStorage(address=memory_server.address)
    stale = hostile.load(ROOT_OID)
    root["v"] = "good-change"
    good.commit()

    # Resending the refused record, with or without syncing between, never
    # overwrites the other client's change.
    for _attempt in range(3):
        hostile.begin()
        hostile.store(ROOT_OID, stale)
        with pytest.raises(ConflictError):
            hostile.end(None)
        hostile.sync()
    hostile.close()

    good.abort()
    assert good.get_root()["v"] == "good-change"
    assert "writes 1 oids changed since it last synced" in memory_server.log()

    # A client that loads the oid again may write it.
    again = ClientStorage(address=memory_server.address)
    current = again.load(ROOT_OID)
    root["v"] = "newest"
    good.commit()
    again.sync()
    again.begin()
    again.store(ROOT_OID, current)
    with pytest.raises(ConflictError):
        again.end(None)
    again.sync()
    newest = again.load(ROOT_OID)
    commit(again, newest)
    again.close()
    good.close()


def test_records_that_are_not_object_records_are_refused(wire, memory_server):
    honest = ClientStorage(address=memory_server.address)
    commit(honest, make_record(ROOT_OID, b"first"))

    # The client refuses them before sending.
    honest.begin()
    with pytest.raises(StorageError, match="oid 0 is not an object record"):
        honest.store(ROOT_OID, ROOT_OID + b"\x00garbage")
    with pytest.raises(StorageError, match="oid 0 starts with oid 7"):
        honest.store(ROOT_OID, make_record((7).to_bytes(8, "big"), b"x"))
    honest.end(None)

    # A client that does not check is refused by the server; nothing is written.
    with hostile_client(wire, memory_server.address) as hostile:
        for payload in pack_records([(ROOT_OID, ROOT_OID + b"\x00garbage")]):
            hostile.sendall(frame(payload))
        hostile.sendall(frame(CMD_COMMIT))
        reply = wire.read_frame(hostile)
        assert reply[:1] == STATUS_ERROR
        message = str(unpack_error(reply[1:]))
        assert "the record for oid 0 is not an object record" in message

        oid = (8).to_bytes(8, "big")
        for payload in pack_records([(ROOT_OID, make_record(oid, b"x"))]):
            hostile.sendall(frame(payload))
        hostile.sendall(frame(CMD_COMMIT))
        reply = wire.read_frame(hostile)
        assert reply[:1] == STATUS_ERROR
        assert "oid 0 starts with oid 8" in str(unpack_error(reply[1:]))

    assert unpack_record(honest.load(ROOT_OID))[1] == b"first"
    honest.pack()
    assert unpack_record(honest.load(ROOT_OID))[1] == b"first"
    honest.close()


def test_oids_of_a_client_that_left_are_released_and_never_reused(wire, memory_server):
    leaving = ClientStorage(address=memory_server.address)
    taken = {leaving.new_oid() for _ in range(5)}
    leaving.close()
    # All but the root oid, handed out again while there is no root record
    # (see test_root_oid_release.py).
    taken.discard(ROOT_OID)

    other = ClientStorage(address=memory_server.address)
    try:
        assert taken.isdisjoint(other.new_oid() for _ in range(300))
        oid = max(taken)
        with pytest.raises(StorageError, match="not handed to this client"):
            commit(other, make_record(oid, b"not mine"))
    finally:
        other.close()
    # A raw client asking for oids gets fresh ones as well.
    with hostile_client(wire, memory_server.address) as sock:
        sock.sendall(frame(CMD_NEW_OIDS + pack_uint32(3)))
        reply = wire.read_frame(sock)
        assert reply[:1] == STATUS_OKAY
        assert taken.isdisjoint(reply[i : i + 8] for i in range(1, 25, 8))


class FailingPackStorage(MemoryStorage):
    """A MemoryStorage whose first incremental pack fails half way."""

    failures = 1

    def get_packer(self):
        def packer():
            yield None
            if self.failures:
                self.failures -= 1
                raise OSError(28, "No space left on device (simulated)")
            self.pack()
            yield None

        return packer()


def test_a_failing_pack_is_logged_and_abandoned(socket_path, caplog, serve_in_thread):
    serve_in_thread(FailingPackStorage(), address=socket_path)
    client = ClientStorage(address=socket_path)
    try:
        (garbage,) = new_oids(client, 1)
        commit(client, make_record(ROOT_OID, b"root"), make_record(garbage))
        commit(client, make_record(ROOT_OID, b"root, no reference"))
        with pytest.raises(StorageError, match="No space left on device"):
            client.pack()
        assert "pack failed and was abandoned" in caplog.text
        assert client.load(garbage)  # nothing was removed

        # The server serves on, and packs the next time.
        commit(client, make_record(ROOT_OID, b"after the failed pack"))
        client.pack()
        with pytest.raises(KeyError):
            client.load(garbage)
    finally:
        client.close()


def test_a_failing_automatic_pack_waits_for_another_gcbytes(
    socket_path, caplog, serve_in_thread
):
    storage = FailingPackStorage()
    storage.failures = 1000
    serve_in_thread(storage, address=socket_path, gcbytes=2000)
    client = ClientStorage(address=socket_path)
    try:
        (oid,) = new_oids(client, 1)
        commit(client, make_record(ROOT_OID, b"root"))
        for number in range(40):  # 4000 bytes and more
            commit(client, make_record(oid, b"%d" % number + b"x" * 100))
        client.sync()  # the pack started by the last commit is over
        failures = caplog.text.count("pack failed and was abandoned")
        assert 1 <= failures <= 3  # not one per commit after the first
        assert "after another 2000 bytes of commits" in caplog.text
    finally:
        client.close()


def test_prefetch_saves_round_trips(memory_server):
    writer = Connection(ClientStorage(address=memory_server.address))
    root = writer.get_root()
    root["children"] = [PersistentDict(number=i) for i in range(60)]
    writer.commit()
    writer.close()

    def walk(prefetch):
        storage = ClientStorage(address=memory_server.address, prefetch=prefetch)
        connection = Connection(storage)
        before = storage.round_trips
        numbers = [child["number"] for child in connection.get_root()["children"]]
        assert numbers == list(range(60))
        trips = storage.round_trips - before
        connection.close()
        return trips

    without, with_prefetch = walk(0), walk(100)
    assert without >= 60
    assert with_prefetch <= 3


def test_prefetched_records_are_dropped_when_others_change_them(memory_server):
    writer = Connection(ClientStorage(address=memory_server.address))
    writer.get_root()["child"] = PersistentDict(value="old")
    writer.commit()

    storage = ClientStorage(address=memory_server.address, prefetch=10)
    reader = Connection(storage)
    reader.get_root()  # prefetches the child
    writer.get_root()["child"]["value"] = "new"
    writer.commit()
    reader.abort()
    assert reader.get_root()["child"]["value"] == "new"
    reader.close()
    writer.close()


def test_a_big_scan_does_not_hold_up_other_clients(run_test_server):
    # Listing the 1000 records that start the scan takes five seconds.
    server = run_test_server("--records", "1000", "--list-delay", "0.005")
    scanner = ClientStorage(address=server.address)
    other = ClientStorage(address=server.address)
    scanned: list[bytes] = []
    scanning = threading.Thread(
        target=lambda: scanned.extend(oid for oid, _r in scanner.gen_oid_record()),
        daemon=True,
    )
    try:
        scanning.start()
        deadline = time.monotonic() + 30
        while "listing started" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.01)

        started = time.monotonic()
        assert unpack_record(other.load(ROOT_OID))[1] == b"root"
        commit(other, make_record(ROOT_OID, b"changed during the scan"))
        assert time.monotonic() - started < 1.0
        assert scanning.is_alive()  # the other client did not wait for the scan

        scanning.join(60)
        assert not scanning.is_alive()
        assert len(scanned) == 1001 and len(set(scanned)) == 1001
    finally:
        scanner.close()
        other.close()


def test_a_stale_record_resent_on_a_new_connection_is_refused(memory_server):
    good = Connection(ClientStorage(address=memory_server.address))
    root = good.get_root()
    root["v"] = "orig"
    good.commit()
    hostile = ClientStorage(address=memory_server.address)
    stale = hostile.load(ROOT_OID)
    hostile.close()
    root["v"] = "good-change"
    good.commit()

    # A new connection that never loaded the oid sends the stale record.
    for _attempt in range(2):
        again = ClientStorage(address=memory_server.address)
        again.begin()
        again.store(ROOT_OID, stale)
        with pytest.raises(ConflictError):
            again.end(None)
        again.close()
    good.abort()
    assert good.get_root()["v"] == "good-change"
    assert "writes 1 oids this connection has not loaded" in memory_server.log()

    # A Connection reconnecting reloads before it writes: it commits.
    other_storage = ClientStorage(address=memory_server.address)
    other = Connection(other_storage)
    other.get_root()["w"] = 1
    other.commit()
    other_storage._drop_socket()  # the connection is lost
    with pytest.raises(ConnectionLostError):
        other.get_root()["w"] = 2
        other.commit()
    other.abort()
    other.get_root()["w"] = 3
    other.commit()
    good.abort()
    assert good.get_root()["w"] == 3
    other.close()
    good.close()


def test_past_max_known_a_connection_still_commits(socket_path, serve_in_thread):
    serve_in_thread(MemoryStorage(), address=socket_path, max_known=3)
    writer = Connection(ClientStorage(address=socket_path))
    root = writer.get_root()
    for number in range(6):
        root[number] = PersistentDict(n=0)
    writer.commit()
    reader = Connection(ClientStorage(address=socket_path))
    counters = [reader.get_root()[number] for number in range(6)]
    assert [counter["n"] for counter in counters] == [0] * 6  # 7 loads
    reader.commit()  # a new transaction
    writer.get_root()[0]["n"] = 1
    writer.commit()
    counters[5]["n"] = 5  # others' changes are told first, then it commits
    reader.commit()
    counters[0]["n"] += 1  # read again since
    reader.commit()
    writer.abort()
    assert writer.get_root()[5]["n"] == 5
    assert writer.get_root()[0]["n"] == 2
    reader.close()
    writer.close()
