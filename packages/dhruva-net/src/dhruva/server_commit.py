"""Commits of the StorageServer: staging, the server's own checks, writing,
and group commit.

A client stages records, then asks for the commit. The server refuses it,
before anything is written, when the client has not synced changes others
made (``REFUSED``: the client syncs and commits again), when it writes an oid
others changed that it has not read again (``CONFLICT``), when a record is
not an object record, or when an oid was neither stored nor handed to that
client. Then it writes the records in one storage transaction and tells every
other client which oids changed.

Group commit: with a storage that can defer durability
(``deferred_durability``: ``end(durable=False)`` then ``make_durable()``),
commits are written one after the other without their fsync, and one
``make_durable()`` in a thread covers every commit written before it began,
while the next commits are checked and written. Each commit is answered, and
the other clients are told of its changes, only once an fsync covers it: no
client sees a change a crash could still take back. With other storages each
commit is durable when written, and published right after.

Until a commit is published, loads of its oids are answered with the records
from before it (:attr:`Committer.writing`). A commit of another client that
writes one of its oids, or whose client read one of them (its ``known`` oids,
see :mod:`dhruva.server_session`), waits (without holding up the loop or the
other commits) until it is published, and is then checked as usual: it
conflicts, or is refused with the oids its client has to hear of. Any other
commit is checked and written at once, and shares the next fsync.

The usual check, against what the client has not synced yet: a commit
writing an oid others changed that the client has not read again is refused as
a conflict; while the client has changes of others to hear of that it may have
read (in its ``known`` oids), the commit is refused with them (``REFUSED``: the
client's invalidation handler decides whether they conflict, then it commits
again); changes of others it never read do not hold the commit up, its next
sync reports them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dhruva.error import ConflictError, ProtocolError, StorageError
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
    from dhruva.storage_server import Loaded, StorageServer

log = logging.getLogger(__name__)

#: Record bytes one client may stage for one commit.
MAX_STAGED_BYTES = 1024 * 1024 * 1024


class Committer:
    """The commit commands of ``server``."""

    def __init__(self, server: StorageServer) -> None:
        self.server = server
        #: The records that commits written but not yet published replace
        #: (None: a new oid). Loads of those oids are answered from here.
        self.writing: dict[bytes, Loaded] = {}
        #: The commits written but not yet published, by oid.
        self._unpublished: dict[bytes, _Written] = {}
        self._lock: asyncio.Lock | None = None
        self._durability: _Durability | None = None

    def start(self) -> None:
        """Get ready for a new event loop (the server starts serving)."""
        self._lock = asyncio.Lock()
        self.writing = {}
        self._unpublished = {}
        storage = self.server.storage
        self._durability = (
            _Durability(storage.make_durable)
            if getattr(storage, "deferred_durability", False)
            else None
        )

    async def stop(self) -> None:
        """Wait for the fsync under way, if any."""
        if self._durability is not None:
            await self._durability.stop()

    async def handle_stage(self, client: ClientState, body: bytes) -> list[bytes]:
        over = client.staged_bytes > MAX_STAGED_BYTES
        for oid, record in unpack_records(body):
            client.staged_bytes += 12 + len(record)
            if not over:
                client.staged[oid] = record
        if not over and client.staged_bytes > MAX_STAGED_BYTES:
            # Past the limit: keep counting, hold nothing; the commit that
            # follows is refused (the server's memory stays bounded).
            log.warning(
                "client %s staged over %d bytes of records for one commit; "
                "they are discarded and the commit will be refused",
                client.peer,
                MAX_STAGED_BYTES,
            )
            client.staged = {}
        return []

    async def handle_abandon(self, client: ClientState, body: bytes) -> list[bytes]:
        client.drop_staged()
        return []

    async def handle_commit(self, client: ClientState, body: bytes) -> list[bytes]:
        if body:
            raise ProtocolError(f"commit: expected no body, got {len(body)} bytes")
        lock = self._lock
        assert lock is not None
        while True:
            # Commits written before, not published yet, that this one must
            # come after: it writes their oids or read what they replace.
            await self.wait_published(self._before(client))
            async with lock:
                if self._before(client):
                    continue  # one was written while this one waited
                written = await self._commit(client)
                break
        if isinstance(written, list):
            return written  # refused, or nothing to write
        return await self._publish(client, written)

    def _before(self, client: ClientState) -> set[_Written]:
        """The unpublished commits of others that a commit of ``client`` must
        come after: they write oids it writes or may have read."""
        return {
            written
            for oid, written in self._unpublished.items()
            if written.client is not client
            and (oid in client.staged or client.may_have_read(oid))
        }

    async def wait_published(self, commits: Iterable[_Written]) -> None:
        """Return once ``commits`` are published."""
        waiting = [written.published.wait() for written in commits]
        if waiting:
            await asyncio.gather(*waiting)

    def is_unpublished(self, oid: bytes) -> bool:
        """True when a commit writing ``oid`` awaits its fsync."""
        return oid in self._unpublished

    async def _commit(self, client: ClientState) -> list[bytes] | _Written:
        """Check and write the client's staged records (not durably, with
        group commit); return the replies of a commit that wrote nothing."""
        server = self.server
        await server.sync_storage()
        if client.invalid_overflow:
            client.drop_staged()
            return [STATUS_RESYNC]
        if client.staged_bytes > MAX_STAGED_BYTES:
            size = client.staged_bytes
            client.drop_staged()
            raise StorageError(
                f"commit refused: {size} bytes of records, over the server's "
                f"limit of {MAX_STAGED_BYTES} per transaction; commit in smaller "
                "transactions"
            )
        staged = client.staged
        if any(oid in staged or client.may_have_read(oid) for oid in client.invalid):
            # Refused before anything is written; the staged records wait for
            # the client to commit again or abandon them.
            oids = take_oids(client.invalid)
            client.refused.update(oids)
            return [STATUS_REFUSED + b"".join(oids)]

        size, refused = client.staged_bytes, client.refused
        client.drop_staged()
        if not staged:
            return [STATUS_OKAY]

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
        # An existing object this connection never read: its record comes
        # from an earlier connection (a client resending what it was refused)
        # and may overwrite others' changes.
        unknown = sorted(
            oid
            for oid, record in old.items()
            if record is not None
            and oid not in client.unused_oids
            and not client.may_have_read(oid)
        )
        if unknown:
            log.warning(
                "commit from %s refused: it writes %d oids this connection has "
                "not loaded (first: %d)",
                client.peer,
                len(unknown),
                oid_int(unknown[0]),
            )
            return [STATUS_CONFLICT + b"".join(unknown[:MAX_OIDS_PER_FRAME])]

        # Write in the worker. Until the commit is published, loads of these
        # oids get the records from before it.
        written = _Written(client, staged, size, asyncio.Event())
        self.writing.update(old)
        self._unpublished.update(dict.fromkeys(staged, written))
        durable = self._durability is None
        try:
            # Without its fsync a write is quick: it runs in the loop when it can.
            await server.call(
                self._write, staged, written.reported, durable, slow=durable
            )
        except ConflictError as exc:
            log.info("commit from %s conflicted: %s", client.peer, exc)
            self._forget(written)
            return [STATUS_CONFLICT + b"".join(exc.oids[:MAX_OIDS_PER_FRAME])]
        except BaseException:
            self._forget(written)
            raise
        client.unused_oids.difference_update(staged)
        client.note_known(staged)
        if self._durability is not None:
            written.number = self._durability.written()
        return written

    async def _publish(self, client: ClientState, written: _Written) -> list[bytes]:
        """Wait until ``written`` is durable, then tell every other client of
        it and answer its client."""
        server = self.server
        try:
            if self._durability is not None:
                await self._durability.wait(written.number)
        finally:
            # Even when the fsync failed: the commit is in the storage, so
            # the others must learn of it.
            for other in server.clients:
                if other is not client:
                    other.invalidate(written.staged)
            server.invalidate_all(written.reported)
            self._forget(written)

        log.debug(
            "committed %d records, %d bytes, from %s",
            len(written.staged),
            written.size,
            client.peer,
        )
        server.packs.committed(written.size)
        return [STATUS_OKAY]

    def _forget(self, written: _Written) -> None:
        """The commit is published (or was not written): loads read it now."""
        for oid in written.staged:
            self.writing.pop(oid, None)
            self._unpublished.pop(oid, None)
        written.published.set()

    def _write(
        self, staged: dict[bytes, bytes], reported: list[bytes], durable: bool
    ) -> None:
        """Storage call: one transaction of ``staged`` records."""
        storage = self.server.storage
        storage.begin()
        for oid, record in staged.items():
            storage.store(oid, record)
        if durable:
            storage.end(reported.extend)
        else:
            # Only storages with deferred_durability take durable=.
            end: Callable[..., None] = storage.end
            end(reported.extend, durable=False)

    async def _check_allocated(
        self, client: ClientState, staged: dict[bytes, bytes]
    ) -> dict[bytes, Loaded]:
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
        old: dict[bytes, Loaded] = dict.fromkeys(staged)
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


@dataclass(eq=False)
class _Written:
    """A commit written to the storage, not yet published."""

    client: ClientState
    staged: dict[bytes, bytes]
    size: int
    #: Set once the other clients were told of it.
    published: asyncio.Event
    #: Oids the storage reported changed by others (a shared storage).
    reported: list[bytes] = field(default_factory=list)
    #: Its number among the commits written (group commit).
    number: int = 0


class _Durability:
    """Group commit: one ``make_durable()`` (in a thread) for every commit
    written before it began, while the next ones are written."""

    def __init__(self, make_durable: Callable[[], None]) -> None:
        self._make_durable = make_durable
        #: Commits written, and how many of them are durable.
        self._written = 0
        self._durable = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    def written(self) -> int:
        """Count one more commit written; return its number."""
        self._written += 1
        return self._written

    async def wait(self, number: int) -> None:
        """Return once commit ``number`` is durable.

        :raises StorageError: when the fsync that should cover it failed.
        """
        if number <= self._durable:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((number, future))
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        await future

    async def stop(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        try:
            while self._waiters:
                # Everything written so far: end() returned for each of them.
                target = self._written
                try:
                    await asyncio.to_thread(self._make_durable)
                except Exception as exc:
                    self._settle(target, exc)
                else:
                    self._durable = max(self._durable, target)
                    self._settle(target, None)
        finally:
            self._task = None

    def _settle(self, target: int, error: Exception | None) -> None:
        """Answer the waiters for commits up to ``target``."""
        done = [(n, f) for n, f in self._waiters if n <= target]
        self._waiters = [(n, f) for n, f in self._waiters if n > target]
        if len(done) > 1:
            log.debug("one fsync made %d commits durable", len(done))
        for _number, future in done:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
