"""StorageServer: one storage shared by many ClientStorage clients.

The server runs one asyncio event loop. Every connection has its own task and
its own state, so a slow, idle or stuck client only ever waits on itself:

- reads of a request have a deadline once its first byte arrived
  (``request_timeout``), idle connections may be closed (``idle_timeout``), and
  replies wait for a slow reader at most ``write_timeout`` seconds;
- storage calls that may take long (a commit, a pack step, a batch of the
  listing that starts a scan) run in one worker thread, so the loop keeps
  accepting, handshaking and answering. Storages are not thread-safe: every
  storage call, in the loop or the worker, holds one lock, and quick calls
  (loads) run in the loop only when nobody else holds it. Long work is cut
  into short calls (pack steps, listing batches), so that other clients'
  calls run in between;
- with a storage that defers durability, concurrent commits share an fsync
  (group commit, :mod:`dhruva.server_commit`).

The modules it is made of: :mod:`dhruva.server_session` serves one
connection (and says what the server keeps, and checks, per client),
:mod:`dhruva.server_commit` checks and writes commits, and
:mod:`dhruva.server_pack` runs packs and the listings that start scans.

The wire protocol is in :mod:`dhruva.net_protocol` and ``docs/protocol.md``.

Limitations:

- Storage calls are serialized: while the worker runs a non-incremental
  ``pack()``, or the fsync of a commit to a storage without
  ``deferred_durability`` (no group commit), other clients' loads wait for it
  (their connections stay served).
- A scan that starts while a pack runs waits for the end of the pack, and a
  pack waits for the listing of a scan that started first.
- The server answers only clients of its own protocol version.
- Once a client fell ``max_unread`` changed oids behind, the stale-write check
  knows only of the changes made after its "everything" sync; a client that
  ignores that answer and resends records it held before is still refused
  for the oids it has not loaded since (its known oids were dropped too).
- A connection that loaded more than ``max_known`` oids is no longer checked
  for writing oids it has not loaded (see :mod:`dhruva.server_session`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from dhruva.client_storage import stop_server, wait_for_server
from dhruva.error import ConflictError, DhruvaError, ProtocolError, StorageError
from dhruva.net_protocol import (
    CMD_ABANDON,
    CMD_BULK_LOAD,
    CMD_COMMIT,
    CMD_LOAD,
    CMD_NEW_OIDS,
    CMD_PACK,
    CMD_PREFETCH_LOAD,
    CMD_QUIT,
    CMD_SCAN,
    CMD_SIZE,
    CMD_STAGE,
    CMD_SYNC,
    DEFAULT_HOST,
    DEFAULT_PORT,
    FLAG_AUTH,
    FLAG_ITERABLE,
    FLAG_PACKABLE,
    FLAG_READONLY,
    MAX_BULK_OIDS,
    MAX_FRAME_SIZE,
    MAX_NEW_OIDS,
    MAX_PREFETCH,
    PROTOCOL_VERSION,
    STATUS_INVALID,
    STATUS_KEYERROR,
    STATUS_OKAY,
    SYNC_DONE,
    SYNC_EVERYTHING,
    SYNC_MORE,
    Address,
    format_address,
    pack_error,
    pack_records_reply,
    resolve_address,
    split_oid_list,
    unpack_uint32,
)
from dhruva.record import ROOT_OID, split_oids, unpack_record
from dhruva.server_commit import Committer
from dhruva.server_pack import PackRunner
from dhruva.server_session import (
    HANDSHAKE_TIMEOUT,
    MAX_KNOWN,
    MAX_RESERVED,
    MAX_UNREAD,
    REQUEST_TIMEOUT,
    WRITE_TIMEOUT,
    ClientState,
    Session,
    oid_int,
    take_oids,
)
from dhruva.server_sockets import (
    bound_address,
    check_exposure,
    is_local,
    listening_socket,
    remove_socket_file,
    server_tls_context,
)
from dhruva.storage import Storage

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Oids loaded per storage call in a bulk load.
LOAD_CHUNK = 256

#: Record bytes a bulk load reads before it sends them (it reads fewer oids
#: at a time when records are large).
BULK_REPLY_BYTES = 4 * 1024 * 1024

DEFAULT_GCBYTES = 0

#: At shutdown, loop turns left for a just-accepted connection to get its task
#: (asyncio needs three), and how many times to cut the connections found.
SHUTDOWN_TURNS = 8
SHUTDOWN_ROUNDS = 5

#: Bytes of records one prefetch reply carries at most, besides the record
#: asked for (always sent).
PREFETCH_BYTES = 4 * 1024 * 1024

#: Seconds a graceful stop waits for the commits under way to be answered.
SHUTDOWN_COMMIT_WAIT = 30.0


class StorageServer:
    """Serve ``storage`` to ClientStorage clients over TCP or a unix socket.

    :param storage: the storage to serve; the server does not close it.
    :param host: the interface to listen on, when ``address`` is not given.
    :param port: the TCP port, when ``address`` is not given; 0 picks a free one.
    :param address: ``(host, port)``, or the path of a unix socket
        (``"@name"`` for Linux's abstract namespace).
    :param gcbytes: pack the storage after this many bytes of commits; 0 never.
    :param auth_key: the shared secret every client must prove it knows.
    :param tls_cert: PEM certificate (chain) for TLS; ``tls_key`` its key.
    :param tls_ca: with TLS, require client certificates signed by this CA.
    :param insecure: allow a non-loopback address without auth or TLS.
    :param sock: a listening socket to serve (systemd socket activation)
        instead of binding ``address``.
    :param socket_owner: user for a unix socket file; ``socket_group`` its
        group; ``socket_mode`` its permission bits.
    :param idle_timeout: close a connection silent this many seconds; None never.
    :param request_timeout: seconds to receive the rest of a started request.
    :param write_timeout: seconds a reply may wait for a client to read.
    :param handshake_timeout: seconds for TLS, hello and authentication.
    :param max_unread: changed oids kept per client for its checks; a client
        further behind is told to drop all its objects at its next sync.
    :param max_known: oids a client loaded or committed kept for its checks
        (see :mod:`dhruva.server_session`).
    :param max_reserved: oids one connection may hold handed out and not
        committed; asking for more is refused.
    """

    def __init__(
        self,
        storage: Storage,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        address: Address | None = None,
        gcbytes: int = DEFAULT_GCBYTES,
        *,
        auth_key: bytes | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        insecure: bool = False,
        sock: socket.socket | None = None,
        socket_owner: str | int | None = None,
        socket_group: str | int | None = None,
        socket_mode: int | None = None,
        idle_timeout: float | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_unread: int = MAX_UNREAD,
        max_known: int = MAX_KNOWN,
        max_reserved: int = MAX_RESERVED,
    ) -> None:
        self.storage = storage
        #: The address asked for (or the passed socket's).
        self.address: Address = (
            bound_address(sock)
            if sock is not None
            else resolve_address(host, port, address)
        )
        #: The address listened on, once :meth:`serve` is ready (port 0 resolved).
        self.bound_address: Address | None = None
        self.gcbytes = int(gcbytes)
        #: Bytes committed since the last pack.
        self.bytes_since_pack = 0
        self.clients: set[ClientState] = set()
        #: True when a client that was handed the root oid left without
        #: committing it: the next asker gets it again, if there is still
        #: no root record (else no Connection could ever make the root).
        self.root_oid_released = False
        self.auth_key = auth_key
        self.tls: ssl.SSLContext | None = (
            server_tls_context(tls_cert, tls_key, tls_ca) if tls_cert else None
        )
        secured = auth_key is not None or self.tls is not None
        check_exposure(self.address, secured, insecure)
        self._exposed = not secured
        self._sock = sock
        self._socket_access = (socket_owner, socket_group, socket_mode)
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.write_timeout = write_timeout
        self.handshake_timeout = handshake_timeout
        self.max_unread = max_unread
        self.max_known = max_known
        self.max_reserved = max_reserved

        # One lock around every storage call; one worker for the slow ones.
        self._storage_lock = threading.Lock()
        self._worker: ThreadPoolExecutor | None = None
        #: The commit commands, and the packs and scan listings.
        self.commits = Committer(self)
        self.packs = PackRunner(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._stop_requested = threading.Event()
        self._handlers: dict[
            bytes, Callable[[ClientState, bytes], Awaitable[Replies]]
        ] = {
            CMD_NEW_OIDS: self._handle_new_oids,
            CMD_LOAD: self._handle_load,
            CMD_PREFETCH_LOAD: self._handle_prefetch_load,
            CMD_BULK_LOAD: self._handle_bulk_load,
            CMD_SYNC: self._handle_sync,
            CMD_STAGE: self.commits.handle_stage,
            CMD_COMMIT: self.commits.handle_commit,
            CMD_ABANDON: self.commits.handle_abandon,
            CMD_SCAN: self._handle_scan,
            CMD_SIZE: self._handle_size,
        }

    def __str__(self) -> str:
        return f"StorageServer({format_address(self.bound_address or self.address)})"

    # --- running -------------------------------------------------------------

    def serve(self, stop_signals: Iterable[int] = ()) -> None:
        """Listen and serve clients until :meth:`stop`, a ``quit`` command, or
        one of ``stop_signals`` (for example ``signal.SIGTERM``).

        :raises StorageError: when the address is in use.
        """
        asyncio.run(self.serve_async(stop_signals))

    def stop(self) -> None:
        """Ask :meth:`serve` to return; safe to call from any thread."""
        self._stop_requested.set()
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)

    async def serve_async(self, stop_signals: Iterable[int] = ()) -> None:
        """The coroutine :meth:`serve` runs."""
        loop = asyncio.get_running_loop()
        self._stopping = stopping = asyncio.Event()
        self._loop = loop
        self.commits.start()
        self.packs.start()
        if self._stop_requested.is_set():
            stopping.set()

        # The signal handlers come first: once the socket listens, a client may
        # see it and send the signal, which must stop the server cleanly.
        signals = list(stop_signals)
        for signum in signals:
            loop.add_signal_handler(signum, self._on_signal, signum)
        connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        server: asyncio.Server | None = None
        sock: socket.socket | None = None
        try:
            if self._sock is not None:
                sock = self._sock
            else:
                owner, group, mode = self._socket_access
                sock = listening_socket(
                    self.address, owner=owner, group=group, mode=mode
                )
            self.bound_address = bound_address(sock)

            async def on_connect(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter
            ) -> None:
                if stopping.is_set():
                    writer.transport.abort()  # accepted as the server stopped
                    return
                task = asyncio.current_task()
                assert task is not None
                connections[task] = writer
                try:
                    await Session(self, reader, writer).run()
                except asyncio.CancelledError:
                    pass  # the server is stopping; end this task quietly
                finally:
                    connections.pop(task, None)

            self._worker = ThreadPoolExecutor(1, thread_name_prefix="dhruva-storage")
            # TLS starts in on_connect, so that a failed handshake is logged.
            # Serving starts only once ``server`` is set, so that the finally
            # below always closes it (never the socket under its feet).
            if sock.family == socket.AF_UNIX:
                server = await asyncio.start_unix_server(
                    on_connect, sock=sock, start_serving=False
                )
            else:
                server = await asyncio.start_server(
                    on_connect, sock=sock, start_serving=False
                )
            await server.start_serving()
            log.info(
                "dhruva storage server ready on %s (protocol version %d%s%s)",
                format_address(self.bound_address),
                PROTOCOL_VERSION,
                ", TLS" if self.tls else "",
                ", authentication" if self.auth_key else "",
            )
            if self._exposed and not is_local(self.bound_address):
                log.warning(
                    "--insecure: serving %s to the network with neither "
                    "authentication nor TLS; anyone who reaches it can read and "
                    "change the database (give --auth-file or --tls-cert/--tls-key)",
                    format_address(self.bound_address),
                )
            await stopping.wait()
        finally:
            stopping.set()
            await self._shut_down(server, sock, connections)
            for signum in signals:
                loop.remove_signal_handler(signum)
            if self._worker is not None:
                self._worker.shutdown(wait=True)
                self._worker = None
            if self._sock is None and sock is not None:
                remove_socket_file(self.address)
            self._loop = self._stopping = None
            self._stop_requested.clear()
            if sock is not None:
                log.info(
                    "dhruva storage server on %s stopped",
                    format_address(self.bound_address or self.address),
                )

    async def _shut_down(
        self,
        server: asyncio.Server | None,
        sock: socket.socket | None,
        connections: dict[asyncio.Task[None], asyncio.StreamWriter],
    ) -> None:
        """Stop listening, end every connection and any pack under way.

        Connections accepted just before the listening socket closed still get
        their task a few loop turns later: those turns are waited for, so that
        nothing of the server runs (or logs a traceback) once this returns.
        """
        if server is not None:
            server.close()
        elif sock is not None:
            sock.close()
        # A commit read before the stop is written, made durable and
        # answered: cut off, its client could not tell whether it happened.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_COMMIT_WAIT
        while any(client.answering_commit for client in self.clients):
            if loop.time() > deadline:
                log.warning(
                    "stopping with commits still unanswered after %s seconds; "
                    "their clients will report their outcome as unknown",
                    SHUTDOWN_COMMIT_WAIT,
                )
                break
            await asyncio.sleep(0.01)
        for _round in range(SHUTDOWN_ROUNDS):
            for _turn in range(SHUTDOWN_TURNS):
                await asyncio.sleep(0)
            if not connections:
                break
            # Cut every connection: Python 3.11's wait_for() can swallow a
            # cancellation that comes as the awaited call finishes.
            for task, writer in list(connections.items()):
                task.cancel()
                writer.transport.abort()
            await asyncio.gather(*connections, return_exceptions=True)
        await self.packs.stop()
        await self.commits.stop()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2)

    @property
    def stopping(self) -> bool:
        """True once the server was asked to stop."""
        stopping = self._stopping
        return stopping is not None and stopping.is_set()

    def _on_signal(self, signum: int) -> None:
        log.info("stopping on signal %s", signal.Signals(signum).name)
        self.stop()

    # --- storage calls ---------------------------------------------------------

    async def call(
        self, function: Callable[..., T], *args: Any, slow: bool = False
    ) -> T:
        """Run one storage call, holding the storage lock.

        A quick call runs right here when the storage is free; a slow one, or
        one that finds the storage busy, runs in the worker thread while the
        loop goes on serving.
        """
        if not slow and self._storage_lock.acquire(blocking=False):
            try:
                return function(*args)
            finally:
                self._storage_lock.release()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self._locked, function, args)

    def _locked(self, function: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._storage_lock:
            return function(*args)

    def flags(self) -> int:
        """The capability flags of the hello this server sends."""
        storage = self.storage
        return (
            (FLAG_READONLY if storage.readonly else 0)
            | (FLAG_PACKABLE if storage.packable else 0)
            | (FLAG_ITERABLE if storage.iterable else 0)
            | (FLAG_AUTH if self.auth_key is not None else 0)
        )

    async def dispatch(self, client: ClientState, payload: bytes) -> Replies:
        """Run one command; return the reply payloads (none for some commands),
        or an asynchronous iterator of them, sent as they come (bulk loads).

        :raises ProtocolError: for an unknown command or a malformed body; the
            connection is then closed.
        """
        code, body = payload[:1], payload[1:]
        if body and code in _NO_BODY:
            raise ProtocolError(
                f"{_NO_BODY[code]}: expected no body, got {len(body)} bytes"
            )
        try:
            if code == CMD_PACK:
                await self.packs.pack()
                return [STATUS_OKAY]
            if code == CMD_QUIT:
                log.info("stop requested by client %s", client.peer)
                self.stop()
                return [STATUS_OKAY]
            handler = self._handlers.get(code)
            if handler is None:
                raise ProtocolError(f"unknown command code {code!r}")
            return await handler(client, body)
        except ProtocolError:
            raise
        except asyncio.CancelledError:
            raise
        except DhruvaError as exc:
            # A refused request (read-only storage, say) ends only itself.
            log.warning("command %r from %s refused: %s", code, client.peer, exc)
            return [pack_error(exc)]
        except Exception as exc:
            # So does a storage failure, but its traceback belongs in the log.
            log.exception("command %r from %s failed", code, client.peer)
            return [pack_error(exc)]

    # --- loads ---------------------------------------------------------------

    def load_records(self, oids: list[bytes]) -> list[Loaded]:
        """Storage call: the records of ``oids`` (None for a missing one,
        a :class:`Damaged` for one the storage cannot read)."""
        result: list[Loaded] = []
        for oid in oids:
            try:
                result.append(self.storage.load(oid))
            except KeyError:
                result.append(None)
            except ConflictError:
                result.append(b"")
            except DhruvaError as exc:
                # One damaged record fails only its own load.
                log.error("cannot load oid %d: %s", oid_int(oid), exc)
                result.append(Damaged(oid, exc))
        return result

    async def _read(
        self, oids: list[bytes], client: ClientState | None = None
    ) -> dict[bytes, Loaded]:
        """Return the current records of ``oids`` (None: missing, b"": conflict,
        :class:`Damaged`: unreadable).

        An oid of a commit not published yet is answered as it was before
        that commit (the commits of ``client`` wait for its publication, as
        for every oid it read).
        """
        writing = self.commits.writing
        wanted = [oid for oid in oids if oid not in writing]
        loaded = await self.call(self.load_records, wanted) if wanted else []
        records = dict(zip(wanted, loaded, strict=True))
        # Looked up again: the call above may have let commits be written.
        before = [oid for oid in oids if oid in writing]
        records.update((oid, writing[oid]) for oid in before)
        if client is not None:
            client.note_known(
                oid for oid, record in records.items() if isinstance(record, bytes)
            )
        return records

    async def _load_replies(
        self, client: ClientState, oids: list[bytes]
    ) -> list[bytes]:
        records = await self._load_for(client, oids)
        return [self._load_reply(client, oid, records) for oid in oids]

    async def _load_for(
        self, client: ClientState, oids: list[bytes]
    ) -> dict[bytes, Loaded]:
        """The records of ``oids`` a load answers with (each read once)."""
        if client.invalid_overflow:
            return {}
        wanted = dict.fromkeys(oid for oid in oids if oid not in client.invalid)
        return await self._read(list(wanted), client)

    def _load_reply(
        self, client: ClientState, oid: bytes, records: dict[bytes, Loaded]
    ) -> bytes:
        """The reply to the load of ``oid``, read into ``records``."""
        if client.invalid_overflow:
            return STATUS_INVALID
        record = records.get(oid, b"")
        if oid not in records or record == b"" or oid in client.invalid:
            return STATUS_INVALID
        client.unread.discard(oid)  # it has the current record now
        if record is None:
            return STATUS_KEYERROR
        if isinstance(record, Damaged):
            return pack_error(record.error())
        return STATUS_OKAY + record

    async def _handle_load(self, client: ClientState, body: bytes) -> list[bytes]:
        if len(body) != 8:
            raise ProtocolError(f"load: expected an 8-byte oid, got {len(body)} bytes")
        return await self._load_replies(client, [body])

    async def _handle_prefetch_load(
        self, client: ClientState, body: bytes
    ) -> list[bytes]:
        if len(body) != 12:
            raise ProtocolError(f"prefetch load: expected 12 bytes, got {len(body)}")
        oid, limit = body[:8], min(unpack_uint32(body[8:], "prefetch"), MAX_PREFETCH)
        [reply] = await self._load_replies(client, [oid])
        prefetched: list[tuple[bytes, bytes]] = []
        if reply[:1] == STATUS_OKAY and limit:
            refs = [
                ref
                for ref in dict.fromkeys(split_oids(unpack_record(reply[1:])[2]))
                if ref != oid
                and ref not in client.invalid
                and not self.commits.is_unpublished(ref)
            ][:limit]
            if refs and not client.invalid_overflow:
                prefetched = await self.call(self.load_prefetched, refs, PREFETCH_BYTES)
                client.unread.difference_update(r for r, _rec in prefetched)
                client.note_known(r for r, _rec in prefetched)
        return [reply, pack_records_reply(prefetched, False)]

    def load_prefetched(
        self, oids: list[bytes], budget: int
    ) -> list[tuple[bytes, bytes]]:
        """Storage call: the records of ``oids``, in order, as long as their
        sizes add up to at most ``budget`` bytes (a reply stays well under
        the frame limit, and the server's memory bounded).

        A missing record, or one that cannot be read, is left out: its own
        load reports it.
        """
        result: list[tuple[bytes, bytes]] = []
        for oid in oids:
            [record] = self.load_records([oid])  # one at a time: memory bounded
            if not isinstance(record, bytes) or not record:
                continue
            budget -= 12 + len(record)
            if budget < 0:
                break
            result.append((oid, record))
        return result

    async def _handle_bulk_load(
        self, client: ClientState, body: bytes
    ) -> AsyncIterator[bytes]:
        oids = split_oid_list(body, "bulk_load")
        if len(oids) > MAX_BULK_OIDS:
            raise ProtocolError(
                f"bulk_load: {len(oids)} oids in one request, allowed at most "
                f"{MAX_BULK_OIDS}; ask in smaller batches"
            )
        return self._bulk_replies(client, oids)

    async def _bulk_replies(
        self, client: ClientState, oids: list[bytes]
    ) -> AsyncIterator[bytes]:
        """One load reply per oid, built as they are sent: a few records at a
        time (about ``BULK_REPLY_BYTES``), each read once per batch."""
        sent = 0
        batch = min(LOAD_CHUNK, 16)
        try:
            while sent < len(oids):
                oids_now = oids[sent : sent + batch]
                records = await self._load_for(client, oids_now)
                size = sum(len(r) for r in records.values() if isinstance(r, bytes))
                for oid in oids_now:
                    reply = self._load_reply(client, oid, records)
                    sent += 1
                    yield reply
                del records
                # Fewer oids next time when the records are large.
                average = size // max(1, len(oids_now))
                batch = max(1, min(LOAD_CHUNK, BULK_REPLY_BYTES // max(1, average)))
        except DhruvaError as exc:
            # Still one reply per oid: the client reads as many as it asked for.
            log.warning("bulk load from %s failed: %s", client.peer, exc)
            error = pack_error(exc)
            for _oid in range(len(oids) - sent):
                yield error

    # --- oids, sync ------------------------------------------------------------

    def _has_root(self) -> bool:
        """Storage call: False when the storage holds no root record."""
        try:
            self.storage.load(ROOT_OID)
        except KeyError:
            return False
        except DhruvaError:
            return True  # damaged, say: surely not to be handed out again
        return True

    def _new_oids(self, count: int) -> list[bytes]:
        return [self.storage.new_oid() for _ in range(count)]

    async def _handle_new_oids(self, client: ClientState, body: bytes) -> list[bytes]:
        count = unpack_uint32(body, "new_oids")
        if not 0 < count <= MAX_NEW_OIDS:
            raise ProtocolError(
                f"new_oids: asked for {count}, allowed 1 to {MAX_NEW_OIDS}"
            )
        if len(client.unused_oids) + count > self.max_reserved:
            error = StorageError(
                f"new_oids refused: this connection holds {len(client.unused_oids)} "
                f"oids it was given and has not committed, and may hold at most "
                f"{self.max_reserved}; commit the new objects (or reconnect, "
                "which releases them) before asking for more"
            )
            # One line per connection, not one per request of a flood; the
            # rest are counted and reported when it closes.
            client.oid_refusals += 1
            if client.oid_refusals == 1:
                log.warning(
                    "command %r from %s refused: %s", CMD_NEW_OIDS, client.peer, error
                )
            return [pack_error(error)]
        oids: list[bytes] = []
        if self.root_oid_released:
            self.root_oid_released = False
            if not await self.call(self._has_root):
                log.info("handing the root oid to %s again", client.peer)
                oids.append(ROOT_OID)
        while len(oids) < count:
            for oid in await self.call(self._new_oids, count - len(oids)):
                # Never hand out an oid some client still holds as invalid.
                if not any(oid in other.invalid for other in self.clients):
                    oids.append(oid)
        client.unused_oids.update(oids)
        return [STATUS_OKAY + b"".join(oids)]

    async def sync_storage(self) -> None:
        """Tell every client of the commits ``storage.sync()`` reports."""
        # A storage shared with other processes may report their commits.
        self.invalidate_all(await self.call(self.storage.sync))

    def invalidate_all(self, oids: Iterable[bytes]) -> None:
        """Tell every client that ``oids`` changed."""
        oids = list(oids)
        if oids:
            for client in self.clients:
                client.invalidate(oids)

    async def _handle_sync(self, client: ClientState, body: bytes) -> list[bytes]:
        if body:
            raise ProtocolError(f"sync: expected no body, got {len(body)} bytes")
        await self.sync_storage()
        if client.invalid_overflow:
            client.invalid_overflow = False
            client.drop_staged()  # staged before it learned: all suspect
            return [STATUS_OKAY + bytes([SYNC_EVERYTHING])]
        oids = take_oids(client.invalid)
        if client.staged:
            # Records staged before the client learned of these changes must
            # not overwrite them (see _commit).
            client.refused.update(oids)
        more = SYNC_MORE if client.invalid else SYNC_DONE
        return [STATUS_OKAY + bytes([more]) + b"".join(oids)]

    # --- scans, size -----------------------------------------------------------

    async def _handle_scan(self, client: ClientState, body: bytes) -> list[bytes]:
        if len(body) != 5:
            raise ProtocolError(f"scan: expected 5 bytes of body, got {len(body)}")
        batch_size = max(1, unpack_uint32(body[1:], "scan batch size"))
        if body[0] or client.scan is None:
            client.scan = await self.packs.list_oids()
            client.scan.reverse()
        scan = client.scan
        records: list[tuple[bytes, bytes]] = []
        used = 2
        while scan and len(records) < batch_size:
            oids = scan[-min(LOAD_CHUNK, batch_size - len(records)) :][::-1]
            current = await self._read(oids, client)
            for oid in oids:
                record = current[oid]
                if isinstance(record, Damaged):
                    raise record.error()
                if record:
                    if used + 12 + len(record) > MAX_FRAME_SIZE and records:
                        break
                    records.append((oid, record))
                    used += 12 + len(record)
                scan.pop()  # sent, or packed away since the scan started
            else:
                continue
            break
        more = bool(scan)
        if not more:
            client.scan = None
        return [pack_records_reply(records, more)]

    async def _handle_size(self, client: ClientState, body: bytes) -> list[bytes]:
        if body:
            raise ProtocolError(f"size: expected no body, got {len(body)} bytes")
        size = await self.call(self.storage.get_size)
        return [STATUS_OKAY + (b"" if size is None else size.to_bytes(8, "big"))]


#: Commands whose request is the code alone (the others check their body).
_NO_BODY = {CMD_PACK: "pack", CMD_QUIT: "quit", CMD_ABANDON: "abandon"}


class Damaged:
    """A record the storage could not read, in place of its bytes."""

    def __init__(self, oid: bytes, exc: DhruvaError) -> None:
        self.oid = oid
        self.exc = exc

    def error(self) -> StorageError:
        """The error a client gets for loading it."""
        return StorageError(
            f"the record of oid {oid_int(self.oid)} cannot be read from the "
            f"server's storage: {self.exc}; the storage needs a repair (see "
            "dhruva verify)"
        )


#: What the server reads for one oid.
Loaded = bytes | Damaged | None

#: What a command answers: reply payloads, or an iterator of them.
Replies = Iterable[bytes] | AsyncIterator[bytes]


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "StorageServer",
    "stop_server",
    "wait_for_server",
]
