"""Issue #5: a prefetch reply stays bounded however big the records it could
carry (it used to outgrow the frame limit and the server's memory)."""

from __future__ import annotations

import random

from dhruva.client_storage import ClientStorage
from dhruva.connection import Connection
from dhruva.persistent import Persistent
from dhruva.storage import MemoryStorage


class Blob(Persistent):
    def __init__(self, data: bytes) -> None:
        self.data = data


def test_a_root_of_seventy_one_megabyte_objects_opens_with_prefetch(
    serve_in_thread, socket_path
):
    storage = MemoryStorage()
    writer = Connection(storage)
    root = writer.get_root()
    noise = random.Random(7)
    for number in range(70):  # 70 MB (not compressible): more than a frame holds
        root[number] = Blob(bytes([number]) + noise.randbytes(1024 * 1024))
    writer.commit()
    serve_in_thread(storage, address=socket_path)

    client = ClientStorage(address=socket_path, prefetch=100)
    connection = Connection(client)
    root = connection.get_root()
    assert [root[n].data[0] for n in range(70)] == list(range(70))
    # Some were prefetched with the root, far from all 70 MB of them.
    assert 0 < client.round_trips < 70
    connection.close()
