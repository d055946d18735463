"""Packs of the StorageServer, and the listing that starts a full scan.

Both are long work cut into short storage calls, so that other clients' loads
and commits run in between: an incremental packer (``get_packer()``) runs one
step per call, and the listing reads a batch of records per call. A pack and a
listing never overlap (a pack moves the records a listing reads). A storage
without an incremental packer is packed in one call, which holds up the
others' storage calls for its length.

An error during a pack is logged (one ERROR line) and the pack abandoned; the
server serves on. A pack started after ``gcbytes`` that fails is tried again
only after another ``gcbytes`` of commits, not after every commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dhruva.storage_server import StorageServer

log = logging.getLogger(__name__)

#: Records listed per storage call when a full scan starts, and the seconds
#: one such call may take (other clients' calls wait that long at most).
LIST_BATCH = 10_000
LIST_BATCH_SECONDS = 0.05


class PackRunner:
    """Run the packs of ``server`` (asked for, or after ``gcbytes``) and the
    listings of its scans."""

    def __init__(self, server: StorageServer) -> None:
        self.server = server
        #: The pack running, if any.
        self.task: asyncio.Task[None] | None = None
        #: Held by a pack and by a listing.
        self._layout_lock: asyncio.Lock | None = None

    def start(self) -> None:
        """Get ready for a new event loop (the server starts serving)."""
        self._layout_lock = asyncio.Lock()
        self.task = None

    def committed(self, size: int) -> None:
        """Count ``size`` bytes committed; pack once ``gcbytes`` are reached."""
        server = self.server
        server.bytes_since_pack += size
        if 0 < server.gcbytes <= server.bytes_since_pack and self.task is None:
            log.info(
                "%d bytes committed since the last pack: packing",
                server.bytes_since_pack,
            )
            self._start()

    async def pack(self) -> None:
        """Pack (or join the pack running); return when it is done."""
        await asyncio.shield(self._start())

    async def stop(self) -> None:
        """Cancel the pack running, if any, and wait for its end."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def _start(self) -> asyncio.Task[None]:
        if self.task is None:
            self.task = asyncio.ensure_future(self._run())
            self.task.add_done_callback(self._done)
        return self.task

    def _done(self, task: asyncio.Task[None]) -> None:
        self.task = None
        if not task.cancelled() and task.exception() is not None:
            server = self.server
            # Counted again from zero: the next pack after gcbytes more.
            server.bytes_since_pack = 0
            again = (
                f"; the next pack starts after another {server.gcbytes} bytes "
                "of commits"
                if server.gcbytes > 0
                else ""
            )
            log.error(
                "pack failed and was abandoned; the server goes on serving%s: %s",
                again,
                task.exception(),
            )

    async def _run(self) -> None:
        assert self._layout_lock is not None
        async with self._layout_lock:
            await self._steps()

    async def _steps(self) -> None:
        server, storage = self.server, self.server.storage
        log.info("pack started")
        packer = await server.call(storage.get_packer)
        if packer is None:
            await server.call(storage.pack, slow=True)
        else:
            try:
                # One step per worker call: other clients are served between.
                while await server.call(_step, packer, slow=True):
                    pass
            finally:
                close = getattr(packer, "close", None)
                if close is not None:
                    await server.call(close, slow=True)
        server.bytes_since_pack = 0
        log.info("pack finished")

    async def list_oids(self) -> list[bytes]:
        """Return the oid of every record, listed a batch per storage call.

        Other clients' storage calls run between the batches, so a big
        listing delays them by one batch at most.
        """
        assert self._layout_lock is not None
        server = self.server
        async with self._layout_lock:
            records = await server.call(server.storage.gen_oid_record)
            oids: list[bytes] = []
            try:
                while True:
                    batch, done = await server.call(_next_oids, records, slow=True)
                    oids += batch
                    if done:
                        return oids
            finally:
                close = getattr(records, "close", None)
                if close is not None:
                    await server.call(close)


def _next_oids(
    records: Iterator[tuple[bytes, bytes]],
    limit: int = LIST_BATCH,
    seconds: float = LIST_BATCH_SECONDS,
) -> tuple[list[bytes], bool]:
    """Storage call: the oids of the next records of a listing, up to ``limit``
    or for about ``seconds``; and whether the listing is done."""
    deadline = time.monotonic() + seconds
    oids: list[bytes] = []
    for oid, _record in records:
        oids.append(oid)
        if len(oids) >= limit or time.monotonic() > deadline:
            return oids, False
    return oids, True


def _step(packer: Any) -> bool:
    """Run one step of an incremental packer; return False when it is done."""
    try:
        next(packer)
    except StopIteration:
        return False
    return True
