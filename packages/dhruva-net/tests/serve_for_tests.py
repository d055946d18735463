"""A server process for the tests, serving storages the command line cannot.

Run as ``python serve_for_tests.py [--records N] [--list-delay SECONDS]
[--max-unread N]``: it serves a MemoryStorage (with ``--records``, an
opaque root and N more records) on a free loopback port, logging ``ready on
HOST:PORT`` like ``dhruva server``. With ``--list-delay``, listing every
record (the start of a full scan) takes that long per record and logs
``listing started``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from collections.abc import Iterator

from dhruva.record import ROOT_OID
from dhruva.storage import MemoryStorage
from dhruva.storage_server import StorageServer
from dhruva.storage_testing import make_record

log = logging.getLogger("serve_for_tests")


class SlowListingStorage(MemoryStorage):
    """A MemoryStorage whose full listing takes ``delay`` seconds a record."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def gen_oid_record(
        self, start_oid: bytes | None = None, batch_size: int = 100
    ) -> Iterator[tuple[bytes, bytes]]:
        if start_oid is not None:
            return super().gen_oid_record(start_oid, batch_size)
        return self._slowly(list(self.records.items()))

    def _slowly(
        self, items: list[tuple[bytes, bytes]]
    ) -> Iterator[tuple[bytes, bytes]]:
        log.info("listing started")
        for item in items:
            time.sleep(self.delay)
            yield item
        log.info("listing done")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=0)
    parser.add_argument("--list-delay", type=float, default=0.0)
    parser.add_argument("--max-unread", type=int, default=None)
    options = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    storage = SlowListingStorage(options.list_delay)
    if options.records:
        oids = [storage.new_oid() for _ in range(options.records + 1)]
        storage.begin()
        storage.store(ROOT_OID, make_record(ROOT_OID, b"root"))
        for oid in oids[1:]:
            storage.store(oid, make_record(oid, b"record"))
        storage.end()
    limits = {} if options.max_unread is None else {"max_unread": options.max_unread}
    server = StorageServer(storage, address=("127.0.0.1", 0), **limits)
    server.serve(stop_signals=(signal.SIGTERM, signal.SIGINT))


if __name__ == "__main__":
    main()
