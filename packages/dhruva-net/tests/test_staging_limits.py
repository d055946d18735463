"""Issue #5: records staged past the per-commit limit are dropped as they
come, not held until the commit is refused."""

from __future__ import annotations

import random

from dhruva import server_commit
from dhruva.client_storage import ClientStorage
from dhruva.net_protocol import (
    CMD_COMMIT,
    CMD_SYNC,
    STATUS_ERROR,
    STATUS_OKAY,
    frame,
    pack_records,
)
from dhruva.record import pack_record
from dhruva.storage import MemoryStorage


def test_staging_past_the_limit_is_discarded_then_the_commit_refused(
    serve_in_thread, socket_path, wire, monkeypatch
):
    monkeypatch.setattr(server_commit, "MAX_STAGED_BYTES", 1_000_000)
    server = serve_in_thread(MemoryStorage(), address=socket_path)
    noise = random.Random(3)
    records = [
        (oid, pack_record(oid, noise.randbytes(400_000), b""))
        for oid in (n.to_bytes(8, "big") for n in range(1, 6))
    ]
    with wire.connect(socket_path) as sock:
        wire.shake_hands(sock)
        for oid, record in records:
            sock.sendall(frame(next(iter(pack_records([(oid, record)])))))
        sock.sendall(frame(CMD_SYNC))
        assert wire.read_frame(sock)[:1] == STATUS_OKAY  # all staged by now
        [state] = server.clients
        assert state.staged == {}  # nothing held past the limit
        assert state.staged_bytes > 2_000_000

        sock.sendall(frame(CMD_COMMIT))
        reply = wire.read_frame(sock)
        assert reply[:1] == STATUS_ERROR
        assert b"over the server's limit of 1000000" in reply
        assert state.staged_bytes == 0

    # A commit under the limit still works.
    client = ClientStorage(address=socket_path)
    [oid] = [client.new_oid() for _ in range(1)]
    client.sync()
    client.begin()
    client.store(oid, pack_record(oid, b"small", b""))
    client.end()
    assert client.load(oid) == pack_record(oid, b"small", b"")
    client.close()
