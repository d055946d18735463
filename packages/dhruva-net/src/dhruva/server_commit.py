"""Commits of the StorageServer: staging, the server's own checks, writing.

A client stages records, then asks for the commit. The server refuses it,
before anything is written, when the client has not synced changes others
made (``REFUSED``: the client syncs and commits again), when it writes an oid
others changed that it has not read again (``CONFLICT``), when a record is
not an object record, or when an oid was neither stored nor handed to that
client. Then it writes the records in one storage transaction and tells every
other client which oids changed.

While a commit is written, loads of its oids are answered with the records
from before it (:attr:`Committer.writing`): the other clients learn of the
commit only once it is written.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from dhruva.error import ConflictError, StorageError
from dhruva.net_protocol import (
    MAX_OIDS_PER_FRAME,
    STATUS_CONFLICT,
    STATUS_OKAY,
    STATUS_REFUSED,
    STATUS_RESYNC,
    unpack_records,
)
from dhruva.record import ROOT_OID, unpack_record
from dhruva.server_session import ClientState, oid_int, take_oids

if TYPE_CHECKING:
    from dhruva.storage_server import StorageServer

log = logging.getLogger(__name__)

#: Record bytes one client may stage for one commit.
MAX_STAGED_BYTES = 1024 * 1024 * 1024


class Committer:
    """The commit commands of ``server``."""

    def __init__(self, server: StorageServer) -> None:
        self.server = server
        #: The records the commit being written replaces (None: a new oid).
        #: Loads of those oids meanwhile are answered from here, as before it.
        self.writing: dict[bytes, bytes | None] = {}
        self._lock: asyncio.Lock | None = None

    def start(self) -> None:
        """Get ready for a new event loop (the server starts serving)."""
        self._lock = asyncio.Lock()
        self.writing = {}

    async def handle_stage(self, client: ClientState, body: bytes) -> list[bytes]:
        for oid, record in unpack_records(body):
            client.staged_bytes += 12 + len(record)
            client.staged[oid] = record
        return []

    async def handle_abandon(self, client: ClientState, body: bytes) -> list[bytes]:
        client.drop_staged()
        return []

    async def handle_commit(self, client: ClientState, body: bytes) -> list[bytes]:
        assert self._lock is not None
        async with self._lock:
            return await self._commit(client)

    async def _commit(self, client: ClientState) -> list[bytes]:
        server = self.server
        await server.sync_storage()
        if client.invalid_overflow:
            client.drop_staged()
            return [STATUS_RESYNC]
        if client.invalid:
            # Refused before anything is written; the staged records wait for
            # the client to commit again or abandon them.
            oids = take_oids(client.invalid)
            client.refused.update(oids)
            return [STATUS_REFUSED + b"".join(oids)]

        staged, size, refused = client.staged, client.staged_bytes, client.refused
        client.drop_staged()
        if not staged:
            return [STATUS_OKAY]
        if size > MAX_STAGED_BYTES:
            raise StorageError(
                f"commit refused: {size} bytes of records, over the server's "
                f"limit of {MAX_STAGED_BYTES} per transaction; commit in smaller "
                "transactions"
            )

        # Records staged before the client learned that others changed these
        # oids, or for oids it has not loaded since, would overwrite those
        # changes: a client that checks never sends them, an old or hostile
        # one is refused here, as often as it tries.
        stale = sorted((refused | client.unread).intersection(staged))
        if stale:
            log.warning(
                "commit from %s refused: it writes %d oids changed since it "
                "last synced (first: %d)",
                client.peer,
                len(stale),
                oid_int(stale[0]),
            )
            return [STATUS_CONFLICT + b"".join(stale[:MAX_OIDS_PER_FRAME])]

        check_records(staged)
        old = await self._check_allocated(client, staged)

        # Write in the worker. Meanwhile loads of these oids get the records
        # from before the commit, until every other client has them in its
        # invalid set.
        self.writing = old
        reported: list[bytes] = []
        try:
            await server.call(self._write, staged, reported, slow=True)
        except ConflictError as exc:
            log.info("commit from %s conflicted: %s", client.peer, exc)
            return [STATUS_CONFLICT + b"".join(exc.oids[:MAX_OIDS_PER_FRAME])]
        else:
            # Tell every other client, and count towards the next pack.
            client.unused_oids.difference_update(staged)
            for other in server.clients:
                if other is not client:
                    other.invalidate(staged)
        finally:
            server.invalidate_all(reported)
            self.writing = {}

        log.debug(
            "committed %d records, %d bytes, from %s", len(staged), size, client.peer
        )
        server.packs.committed(size)
        return [STATUS_OKAY]

    def _write(self, staged: dict[bytes, bytes], reported: list[bytes]) -> None:
        """Storage call: one transaction of ``staged`` records."""
        storage = self.server.storage
        storage.begin()
        for oid, record in staged.items():
            storage.store(oid, record)
        storage.end(reported.extend)

    async def _check_allocated(
        self, client: ClientState, staged: dict[bytes, bytes]
    ) -> dict[bytes, bytes | None]:
        """Refuse records for oids neither stored nor handed to this client.

        :return: the records ``staged`` replaces (None for a new oid).
        :raises StorageError: naming the first such oid.
        """
        server = self.server
        for other in server.clients:
            if other is not client and not other.unused_oids.isdisjoint(staged):
                oid = min(other.unused_oids.intersection(staged))
                raise StorageError(
                    f"commit refused: oid {oid_int(oid)} was handed to client "
                    f"{other.peer}, not to this one"
                )
        old = dict.fromkeys(staged)
        stored = [oid for oid in staged if oid not in client.unused_oids]
        if stored:
            loaded = await server.call(server.load_records, stored)
            old.update(zip(stored, loaded, strict=True))
        # The root's oid is everybody's: a new database's first commit makes it.
        missing = [
            oid
            for oid in stored
            if old[oid] is None and oid not in client.unused_oids and oid != ROOT_OID
        ]
        if missing:
            raise StorageError(
                f"commit refused: oid {oid_int(min(missing))} is not in the "
                "storage and was not handed to this client; new objects must "
                "get their oids from new_oid()"
            )
        return old


def check_records(staged: dict[bytes, bytes]) -> None:
    """Refuse a commit holding a record that is not a whole object record.

    :raises StorageError: naming the first such oid; nothing is written.
    """
    for oid, record in staged.items():
        try:
            record_oid = unpack_record(record)[0]
        except StorageError as exc:
            raise StorageError(
                f"commit refused: the record for oid {oid_int(oid)} is not an "
                f"object record ({exc}); nothing was written"
            ) from None
        if record_oid != oid:
            raise StorageError(
                f"commit refused: the record stored for oid {oid_int(oid)} "
                f"starts with oid {oid_int(record_oid)}; nothing was written"
            )
