"""Issue #5: the root oid, taken by a client that left without committing it,
is handed out again while there is no root record."""

from __future__ import annotations

import time

from dhruva.client_storage import ClientStorage
from dhruva.connection import Connection
from dhruva.record import ROOT_OID
from dhruva.storage import MemoryStorage


def wait_for_no_clients(server) -> None:
    deadline = time.monotonic() + 20
    while server.clients and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.clients


def test_the_root_oid_of_a_client_that_left_is_handed_out_again(
    serve_in_thread, socket_path
):
    server = serve_in_thread(MemoryStorage(), address=socket_path)
    first = ClientStorage(address=socket_path)
    assert first.new_oid() == ROOT_OID  # a fresh database
    first.close()  # without committing it
    wait_for_no_clients(server)

    second = ClientStorage(address=socket_path)
    assert second.new_oid() == ROOT_OID
    second.close()
    wait_for_no_clients(server)

    connection = Connection(ClientStorage(address=socket_path))
    connection.get_root()["made"] = True
    connection.commit()
    connection.close()
    wait_for_no_clients(server)

    # Once the root exists, oid 0 is never handed out again.
    third = ClientStorage(address=socket_path)
    assert ROOT_OID not in {third.new_oid() for _ in range(300)}
    third.close()
    check = Connection(ClientStorage(address=socket_path))
    assert check.get_root()["made"] is True
    check.close()
