"""The server process: bad input, versions, stopping, sockets, stalled clients."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from dhruva import client_storage
from dhruva.client_storage import ClientStorage, stop_server, wait_for_server
from dhruva.error import ProtocolError, StorageError
from dhruva.net_protocol import (
    CMD_LOAD,
    CMD_STAGE,
    MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    STATUS_ERROR,
    ConnectionLostError,
    frame,
    hello,
    parse_hello,
    unpack_error,
)
from dhruva.record import ROOT_OID, unpack_record
from dhruva.storage import MemoryStorage
from dhruva.storage_server import StorageServer
from dhruva.storage_testing import commit, make_record


def load_if_there(client, oid):
    """Load ``oid`` when the storage has it: a client writes only what it read."""
    with contextlib.suppress(KeyError):
        client.load(oid)


def assert_server_still_serves(address):
    client = ClientStorage(address=address)
    try:
        load_if_there(client, ROOT_OID)
        commit(client, make_record(ROOT_OID, b"still serving"))
        assert unpack_record(client.load(ROOT_OID))[1] == b"still serving"
    finally:
        client.close()


def expect_protocol_error_then_close(wire, sock):
    reply = wire.read_frame(sock)
    assert reply is not None and reply[:1] == STATUS_ERROR
    error = unpack_error(reply[1:])
    assert isinstance(error, ProtocolError)
    assert wire.read_frame(sock) is None
    return error


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff",  # a frame far over the limit
        b"\0\0\0\0",  # an empty frame
        b"GET / HTTP/1.0\r\n\r\n",  # somebody else's protocol
        b"V\0\0\0\1",  # a Durus 4 client's version check
    ],
)
def test_garbage_before_the_hello_is_refused_and_logged(wire, memory_server, garbage):
    with wire.connect(memory_server.address) as sock:
        sock.sendall(garbage)
        error = expect_protocol_error_then_close(wire, sock)
    assert "dhruva" in str(error)
    assert "closing the connection from 127.0.0.1" in memory_server.log()
    assert_server_still_serves(memory_server.address)


def test_frame_over_the_limit_after_the_hello(wire, memory_server):
    with wire.connect(memory_server.address) as sock:
        wire.shake_hands(sock)
        sock.sendall(struct.pack(">I", MAX_FRAME_SIZE + 1))
        error = expect_protocol_error_then_close(wire, sock)
    assert str(MAX_FRAME_SIZE) in str(error)
    assert_server_still_serves(memory_server.address)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"?", "unknown command code"),
        (CMD_LOAD + b"short", "8-byte oid"),
        (CMD_STAGE + struct.pack(">I", 500) + b"\0" * 20, "claims 500 bytes"),
        (b"S" + b"x", "sync: expected no body"),
        (b"Z" + b"x", "size: expected no body"),
        (b"C" + b"x", "commit: expected no body"),
    ],
)
def test_malformed_command_closes_only_that_connection(
    wire, memory_server, payload, message
):
    bystander = ClientStorage(address=memory_server.address)
    try:
        with wire.connect(memory_server.address) as sock:
            wire.shake_hands(sock)
            sock.sendall(frame(payload))
            error = expect_protocol_error_then_close(wire, sock)
        assert message in str(error)
        assert message in memory_server.log()
        commit(bystander, make_record(ROOT_OID, b"bystander"))
        assert unpack_record(bystander.load(ROOT_OID))[1] == b"bystander"
    finally:
        bystander.close()
    assert_server_still_serves(memory_server.address)


def test_a_client_of_another_version_gets_a_clear_error(memory_server, monkeypatch):
    monkeypatch.setattr(client_storage, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
    with pytest.raises(ProtocolError) as info:
        ClientStorage(address=memory_server.address)
    message = str(info.value)
    assert f"client speaks version {PROTOCOL_VERSION + 1}" in message
    assert f"server version {PROTOCOL_VERSION}" in message
    assert "version mismatch" in memory_server.log()
    monkeypatch.undo()
    assert_server_still_serves(memory_server.address)


def test_the_server_answers_an_old_client_with_its_version_and_closes(
    wire, memory_server
):
    with wire.connect(memory_server.address) as sock:
        sock.sendall(frame(hello(version=PROTOCOL_VERSION + 7)))
        assert parse_hello(wire.read_frame(sock))[0] == PROTOCOL_VERSION
        assert wire.read_frame(sock) is None


def fake_server(behaviour):
    """Listen on loopback; run ``behaviour(conn)`` for one connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def run():
        conn, _addr = listener.accept()
        with conn:
            behaviour(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize(
    "behaviour",
    [
        lambda conn: conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n"),
        lambda conn: conn.recv(100),  # reads the hello, says nothing, hangs up
        lambda conn: time.sleep(2),  # says nothing at all
    ],
    ids=["http", "hangs-up", "silent"],
)
def test_a_peer_that_is_not_a_dhruva_server_is_a_protocol_error(behaviour, monkeypatch):
    monkeypatch.setattr(client_storage, "CONNECT_TIMEOUT", 0.5)
    listener, thread = fake_server(behaviour)
    try:
        started = time.monotonic()
        with pytest.raises(ProtocolError, match="dhruva"):
            ClientStorage(address=listener.getsockname())
        assert time.monotonic() - started < 10
    finally:
        thread.join(10)
        listener.close()


def test_stop_command_ends_the_server(memory_server):
    stop_server(memory_server.address)
    assert memory_server.process.wait(20) == 0
    assert "stopped" in memory_server.log()
    with pytest.raises(StorageError, match="cannot connect"):
        ClientStorage(address=memory_server.address)


def test_sigterm_ends_the_server_cleanly(memory_server):
    client = ClientStorage(address=memory_server.address)
    try:
        memory_server.process.send_signal(signal.SIGTERM)
        assert memory_server.process.wait(20) == 0
        assert "stopping on signal SIGTERM" in memory_server.log()
        # The load tries a new connection once, and finds nobody listening.
        with pytest.raises(ConnectionLostError, match="cannot connect") as info:
            client.load(ROOT_OID)
        assert info.value.retryable
    finally:
        client.close()


def test_unix_socket_serves_and_is_removed_at_stop(run_server, socket_path):
    server = run_server("--storage", "memory", "--address", socket_path)
    assert server.address == socket_path
    assert_server_still_serves(socket_path)
    stop_server(socket_path)
    assert server.process.wait(20) == 0
    assert not os.path.exists(socket_path)


def test_a_stale_unix_socket_file_is_replaced(run_server, socket_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(socket_path)
    stale.close()  # the file stays, nobody listens
    server = run_server("--storage", "memory", "--address", socket_path)
    assert_server_still_serves(server.address)


def test_a_unix_socket_in_use_or_a_regular_file_is_refused(run_server, socket_path):
    run_server("--storage", "memory", "--address", socket_path)
    second = _start_failing(run_server, socket_path)
    assert "already listening" in second

    regular = socket_path + ".txt"
    with open(regular, "w") as f:
        f.write("not a socket")
    third = _start_failing(run_server, regular)
    assert "is not a unix socket" in third


def test_a_port_in_use_is_refused(memory_server, run_server):
    host, port = memory_server.address
    message = _start_failing(run_server, f"{host}:{port}")
    assert f"cannot listen on {host}:{port}" in message


def _start_failing(run_server, address):
    """Run a server that must fail to start; return what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "dhruva.cli", "server", "--storage", "memory"]
        + ["--address", address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0, done.stderr
    return done.stderr


def test_a_stalled_client_does_not_stall_the_others(wire, memory_server):
    with wire.connect(memory_server.address) as stalled:
        wire.shake_hands(stalled)
        stalled.sendall(struct.pack(">I", 100) + CMD_LOAD)  # then nothing more
        other = ClientStorage(address=memory_server.address, timeout=20)
        try:
            started = time.monotonic()
            for i in range(20):
                commit(other, make_record(ROOT_OID, b"%d" % i))
            assert unpack_record(other.load(ROOT_OID))[1] == b"19"
            assert time.monotonic() - started < 10
        finally:
            other.close()


def test_wait_for_server(memory_server, socket_path):
    wait_for_server(memory_server.address, timeout=5)
    started = time.monotonic()
    with pytest.raises(StorageError, match="no dhruva server"):
        wait_for_server(socket_path, timeout=0.3)
    assert time.monotonic() - started < 10


def test_wait_for_server_takes_durus_keywords(memory_server):
    host, port = memory_server.address
    wait_for_server(host=host, port=port, maxtries=10, sleeptime=0.1)


def test_a_server_in_a_thread_of_this_process_stops_when_asked(socket_path):
    server = StorageServer(MemoryStorage(), address=socket_path)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        wait_for_server(socket_path, timeout=20)
        assert server.bound_address == socket_path
        assert_server_still_serves(socket_path)
    finally:
        server.stop()
        thread.join(20)
    assert not thread.is_alive()
    assert not os.path.exists(socket_path)


class SlowPackingStorage(MemoryStorage):
    """A MemoryStorage whose incremental packer takes many slow steps."""

    packing = False
    loads_while_packing = 0

    def get_packer(self):
        def packer():
            self.packing = True
            for _ in range(400):
                time.sleep(0.01)  # each step blocks the server briefly
                yield None
            self.pack()
            self.packing = False

        return packer()

    def load(self, oid):
        if self.packing:
            self.loads_while_packing += 1
        return super().load(oid)


def test_clients_are_served_between_the_steps_of_an_incremental_pack(
    socket_path, serve_in_thread
):
    storage = SlowPackingStorage()
    serve_in_thread(storage, address=socket_path)
    packer_client = ClientStorage(address=socket_path)
    try:
        commit(packer_client, make_record(ROOT_OID, b"root"))
        packing = threading.Thread(target=packer_client.pack, daemon=True)
        packing.start()

        deadline = time.monotonic() + 20
        while not storage.packing:
            assert time.monotonic() < deadline and packing.is_alive()
            time.sleep(0.005)
        reader = ClientStorage(address=socket_path)
        try:
            assert unpack_record(reader.load(ROOT_OID))[1] == b"root"
        finally:
            reader.close()
        assert storage.loads_while_packing == 1

        packing.join(30)
        assert not packing.is_alive() and not storage.packing
    finally:
        packer_client.close()
