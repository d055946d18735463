"""Issue #5: malformed bodies of the body-less commands, and the log of a
client flooding the server with oid requests."""

from __future__ import annotations

import logging
import time

import pytest
from dhruva.client_storage import ClientStorage
from dhruva.error import StorageError
from dhruva.net_protocol import (
    CMD_ABANDON,
    CMD_PACK,
    CMD_QUIT,
    STATUS_ERROR,
    frame,
    unpack_error,
)
from dhruva.storage import MemoryStorage


@pytest.mark.parametrize("code", [CMD_PACK, CMD_QUIT, CMD_ABANDON])
def test_a_body_on_a_bodyless_command_is_a_protocol_error(
    code, serve_in_thread, socket_path, wire
):
    serve_in_thread(MemoryStorage(), address=socket_path)
    with wire.connect(socket_path) as sock:
        wire.shake_hands(sock)
        sock.sendall(frame(code + b"junk"))
        reply = wire.read_frame(sock)
        assert reply is not None and reply[:1] == STATUS_ERROR
        assert "expected no body, got 4 bytes" in str(unpack_error(reply[1:]))
        assert wire.read_frame(sock) is None  # closed
    # The server goes on serving (a quit with a body did not stop it).
    client = ClientStorage(address=socket_path)
    assert client.get_size() == 0
    client.close()


def test_an_oid_flood_is_one_warning_line_per_connection(
    serve_in_thread, socket_path, caplog
):
    serve_in_thread(MemoryStorage(), address=socket_path, max_reserved=128)
    client = ClientStorage(address=socket_path)
    with caplog.at_level(logging.INFO, logger="dhruva"):
        for _ in range(128):  # one batch
            client.new_oid()
        for _ in range(5):
            with pytest.raises(StorageError, match="new_oids refused"):
                client.new_oid()
        client.close()
        deadline = time.monotonic() + 20  # the server logs it as it closes
        while (
            "5 new_oids requests refused" not in caplog.text
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
    warnings = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "new_oids" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert "5 new_oids requests refused" in caplog.text
