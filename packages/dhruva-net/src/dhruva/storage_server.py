"""StorageServer: one storage shared by many ClientStorage clients.

The server runs one asyncio event loop in one thread. Every connection has its
own reader task and its own state (invalid oids, oids handed out, records
staged for a commit), so a slow or stuck client only ever waits on itself.
Storage calls are made in the event-loop thread, one at a time: storages are
not thread-safe, and they are fast.

What the server keeps per client, as Durus does:

- ``invalid``: oids other clients committed since this client last synced.
  :meth:`~dhruva.client_storage.ClientStorage.sync` returns and clears them; a
  load of one of them is refused (the client raises ReadConflictError); a
  commit while there are some is refused before anything is written, and the
  client hands them to its ``handle_invalidations`` callback.
- ``unused_oids``: oids handed to this client and not committed yet; another
  client may not commit them.

The wire protocol is in :mod:`dhruva.net_protocol` and ``docs/protocol.md``.

Limitations:

- A commit's fsync, a non-incremental ``pack()`` and the start of a full scan
  block the event loop (and so every client) while they run.
- The server answers only clients of its own protocol version.

TODO(#5): a limit on the invalid set of an idle client (today it grows until
the client syncs), on staged bytes per connection, an idle timeout, TLS and
authentication; fsync off the event loop; systemd socket activation and unix
socket owner/group/umask options (Durus had both).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from dhruva.client_storage import stop_server, wait_for_server
from dhruva.error import ConflictError, DhruvaError, ProtocolError, StorageError
from dhruva.net_protocol import (
    CMD_ABANDON,
    CMD_BULK_LOAD,
    CMD_COMMIT,
    CMD_LOAD,
    CMD_NEW_OIDS,
    CMD_PACK,
    CMD_QUIT,
    CMD_SCAN,
    CMD_SIZE,
    CMD_STAGE,
    CMD_SYNC,
    DEFAULT_HOST,
    DEFAULT_PORT,
    FLAG_ITERABLE,
    FLAG_PACKABLE,
    FLAG_READONLY,
    MAX_FRAME_SIZE,
    MAX_HELLO_SIZE,
    MAX_NEW_OIDS,
    MAX_OIDS_PER_FRAME,
    PROTOCOL_VERSION,
    STATUS_CONFLICT,
    STATUS_INVALID,
    STATUS_KEYERROR,
    STATUS_OKAY,
    STATUS_REFUSED,
    Address,
    format_address,
    frame,
    hello,
    pack_error,
    pack_records_reply,
    parse_header,
    parse_hello,
    resolve_address,
    socket_address,
    split_oid_list,
    unpack_records,
    unpack_uint32,
    version_mismatch,
)
from dhruva.storage import Storage

log = logging.getLogger(__name__)

#: Seconds a new connection has to send its hello.
HANDSHAKE_TIMEOUT = 30.0

DEFAULT_GCBYTES = 0


@dataclass(eq=False)
class _Client:
    """What the server knows about one connection."""

    #: The peer, for log lines.
    peer: str
    #: Oids other clients committed since this client last synced.
    invalid: set[bytes] = field(default_factory=set)
    #: Oids handed to this client and not committed yet.
    unused_oids: set[bytes] = field(default_factory=set)
    #: Records sent for the next commit.
    staged: dict[bytes, bytes] = field(default_factory=dict)
    #: Oids still to send in a full scan, or None when no scan is running.
    scan: list[bytes] | None = None


def _take(oids: set[bytes], limit: int = MAX_OIDS_PER_FRAME) -> list[bytes]:
    """Remove and return up to ``limit`` oids from ``oids``, lowest first."""
    if len(oids) <= limit:
        taken = sorted(oids)
        oids.clear()
        return taken
    taken = sorted(oids)[:limit]
    oids.difference_update(taken)
    return taken


class StorageServer:
    """Serve ``storage`` to ClientStorage clients over TCP or a unix socket.

    :param storage: the storage to serve; the server does not close it.
    :param host: the interface to listen on, when ``address`` is not given.
    :param port: the TCP port, when ``address`` is not given; 0 picks a free one.
    :param address: ``(host, port)``, or the path of a unix socket
        (``"@name"`` for Linux's abstract namespace).
    :param gcbytes: pack the storage after this many bytes of commits; 0 never.
    """

    def __init__(
        self,
        storage: Storage,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        address: Address | None = None,
        gcbytes: int = DEFAULT_GCBYTES,
    ) -> None:
        self.storage = storage
        #: The address asked for.
        self.address: Address = resolve_address(host, port, address)
        #: The address listened on, once :meth:`serve` is ready (port 0 resolved).
        self.bound_address: Address | None = None
        self.gcbytes = int(gcbytes)
        #: Bytes committed since the last pack.
        self.bytes_since_pack = 0
        self.clients: set[_Client] = set()
        self._pack_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._stop_requested = threading.Event()
        self._handlers: dict[bytes, Callable[[_Client, bytes], Iterable[bytes]]] = {
            CMD_NEW_OIDS: self._handle_new_oids,
            CMD_LOAD: self._handle_load,
            CMD_BULK_LOAD: self._handle_bulk_load,
            CMD_SYNC: self._handle_sync,
            CMD_STAGE: self._handle_stage,
            CMD_COMMIT: self._handle_commit,
            CMD_ABANDON: self._handle_abandon,
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
        sock = _listening_socket(self.address)
        self.bound_address = _bound_address(sock, self.address)
        connections: set[asyncio.Task[None]] = set()

        async def on_connect(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            task = asyncio.current_task()
            assert task is not None
            connections.add(task)
            try:
                await self._serve_connection(reader, writer)
            except asyncio.CancelledError:
                pass  # the server is stopping; end this task quietly
            finally:
                connections.discard(task)

        self._stopping = stopping = asyncio.Event()
        self._loop = loop
        if self._stop_requested.is_set():
            stopping.set()
        signals = list(stop_signals)
        for signum in signals:
            loop.add_signal_handler(signum, self._on_signal, signum)
        server: asyncio.Server | None = None
        try:
            if sock.family == socket.AF_UNIX:
                server = await asyncio.start_unix_server(on_connect, sock=sock)
            else:
                server = await asyncio.start_server(on_connect, sock=sock)
            log.info(
                "dhruva storage server ready on %s (protocol version %d)",
                format_address(self.bound_address),
                PROTOCOL_VERSION,
            )
            await stopping.wait()
        finally:
            # Stop listening, end every connection and any pack under way.
            if server is not None:
                server.close()
            else:
                sock.close()
            for task in list(connections):
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
            if self._pack_task is not None:
                self._pack_task.cancel()
                await asyncio.gather(self._pack_task, return_exceptions=True)
            if server is not None:
                await server.wait_closed()
            for signum in signals:
                loop.remove_signal_handler(signum)
            _remove_socket_file(self.address)
            self._loop = self._stopping = None
            self._stop_requested.clear()
            log.info(
                "dhruva storage server on %s stopped",
                format_address(self.bound_address),
            )

    def _on_signal(self, signum: int) -> None:
        log.info("stopping on signal %s", signal.Signals(signum).name)
        self.stop()

    # --- one connection --------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = _peer_name(writer)
        client = _Client(peer)
        try:
            if not await self._handshake(reader, writer, peer):
                return
            self.clients.add(client)
            log.debug("client %s connected", peer)
            while True:
                payload = await _read_frame(reader, MAX_FRAME_SIZE, peer)
                if payload is None:
                    break
                # Replies go out one frame at a time, waiting whenever this
                # client reads slower than the server writes.
                for reply in await self._dispatch(client, payload):
                    writer.write(frame(reply))
                    await writer.drain()
        except ProtocolError as exc:
            log.warning("closing the connection from %s: %s", peer, exc)
            with contextlib.suppress(ConnectionError, StorageError):
                writer.write(frame(pack_error(exc)))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("lost the connection from %s: %s", peer, exc)
        except Exception as exc:
            # A bug in the server: end this connection, keep serving the rest.
            log.exception("internal error serving %s; closing its connection", peer)
            with contextlib.suppress(ConnectionError, StorageError):
                writer.write(frame(pack_error(exc)))
                await writer.drain()
        finally:
            self.clients.discard(client)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            log.debug("client %s disconnected", peer)

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> bool:
        """Exchange hellos; return False when the versions differ."""
        try:
            payload = await asyncio.wait_for(
                _read_frame(reader, MAX_HELLO_SIZE, peer), HANDSHAKE_TIMEOUT
            )
        except TimeoutError:
            raise ProtocolError(
                f"no hello within {HANDSHAKE_TIMEOUT} seconds of connecting"
            ) from None
        if payload is None:
            return False
        version, _flags = parse_hello(payload)

        if version != PROTOCOL_VERSION:
            log.warning(
                "refusing client %s: %s",
                peer,
                version_mismatch(version, PROTOCOL_VERSION),
            )

        # Always answer with our own hello, so the client can name both versions.
        writer.write(frame(hello(self._flags())))
        await writer.drain()
        return version == PROTOCOL_VERSION

    def _flags(self) -> int:
        storage = self.storage
        return (
            (FLAG_READONLY if storage.readonly else 0)
            | (FLAG_PACKABLE if storage.packable else 0)
            | (FLAG_ITERABLE if storage.iterable else 0)
        )

    async def _dispatch(self, client: _Client, payload: bytes) -> Iterable[bytes]:
        """Run one command; return the reply payloads (none for some commands).

        :raises ProtocolError: for an unknown command or a malformed body; the
            connection is then closed.
        """
        code, body = payload[:1], payload[1:]
        try:
            if code == CMD_PACK:
                await self._pack()
                return [STATUS_OKAY]
            if code == CMD_QUIT:
                log.info("stop requested by client %s", client.peer)
                self.stop()
                return [STATUS_OKAY]
            handler = self._handlers.get(code)
            if handler is None:
                raise ProtocolError(f"unknown command code {code!r}")
            return handler(client, body)
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

    # --- commands ------------------------------------------------------------

    def _handle_new_oids(self, client: _Client, body: bytes) -> list[bytes]:
        count = unpack_uint32(body, "new_oids")
        if not 0 < count <= MAX_NEW_OIDS:
            raise ProtocolError(
                f"new_oids: asked for {count}, allowed 1 to {MAX_NEW_OIDS}"
            )
        oids: list[bytes] = []
        while len(oids) < count:
            oid = self.storage.new_oid()
            # Never hand out an oid that some client still holds as invalid.
            if not any(oid in other.invalid for other in self.clients):
                oids.append(oid)
        client.unused_oids.update(oids)
        return [STATUS_OKAY + b"".join(oids)]

    def _load_reply(self, client: _Client, oid: bytes) -> bytes:
        if oid in client.invalid:
            return STATUS_INVALID
        try:
            record = self.storage.load(oid)
        except KeyError:
            return STATUS_KEYERROR
        except ConflictError:
            return STATUS_INVALID
        return STATUS_OKAY + record

    def _handle_load(self, client: _Client, body: bytes) -> list[bytes]:
        if len(body) != 8:
            raise ProtocolError(f"load: expected an 8-byte oid, got {len(body)} bytes")
        return [self._load_reply(client, body)]

    def _handle_bulk_load(self, client: _Client, body: bytes) -> Iterator[bytes]:
        oids = split_oid_list(body, "bulk_load")
        return self._gen_load_replies(client, oids)

    def _gen_load_replies(self, client: _Client, oids: list[bytes]) -> Iterator[bytes]:
        # Loaded as they are sent, so a big batch is never all in memory. A
        # commit in between puts its oids in the invalid set, which the
        # following loads see: the batch stays consistent for this client.
        for oid in oids:
            try:
                yield self._load_reply(client, oid)
            except Exception as exc:
                log.exception("bulk load of oid %s failed", int.from_bytes(oid, "big"))
                yield pack_error(exc)

    def _sync_storage(self) -> None:
        # A storage shared with other processes may report their commits.
        self._invalidate_all(self.storage.sync())

    def _invalidate_all(self, oids: Iterable[bytes]) -> None:
        oids = list(oids)
        if oids:
            for client in self.clients:
                client.invalid.update(oids)

    def _handle_sync(self, client: _Client, body: bytes) -> list[bytes]:
        self._sync_storage()
        oids = _take(client.invalid)
        more = b"\1" if client.invalid else b"\0"
        return [STATUS_OKAY + more + b"".join(oids)]

    def _handle_stage(self, client: _Client, body: bytes) -> list[bytes]:
        client.staged.update(unpack_records(body))
        return []

    def _handle_abandon(self, client: _Client, body: bytes) -> list[bytes]:
        client.staged.clear()
        return []

    def _handle_commit(self, client: _Client, body: bytes) -> list[bytes]:
        self._sync_storage()
        if client.invalid:
            # Refused before anything is written; the staged records wait for
            # the client to commit again or abandon them.
            return [STATUS_REFUSED + b"".join(_take(client.invalid))]
        staged, client.staged = client.staged, {}
        if not staged:
            return [STATUS_OKAY]
        for other in self.clients:
            if other is not client and not other.unused_oids.isdisjoint(staged):
                oid = min(other.unused_oids.intersection(staged))
                raise StorageError(
                    f"commit refused: oid {int.from_bytes(oid, 'big')} was handed "
                    f"to client {other.peer}, not to this one"
                )

        self.storage.begin()
        for oid, record in staged.items():
            self.storage.store(oid, record)
        try:
            self.storage.end(self._invalidate_all)
        except ConflictError as exc:
            log.info("commit from %s conflicted: %s", client.peer, exc)
            return [STATUS_CONFLICT + b"".join(exc.oids[:MAX_OIDS_PER_FRAME])]

        # Tell every other client, and count towards the next automatic pack.
        client.unused_oids.difference_update(staged)
        for other in self.clients:
            if other is not client:
                other.invalid.update(staged)
        size = sum(12 + len(record) for record in staged.values())
        self.bytes_since_pack += size
        log.debug(
            "committed %d records, %d bytes, from %s", len(staged), size, client.peer
        )
        if 0 < self.gcbytes <= self.bytes_since_pack and self._pack_task is None:
            log.info(
                "%d bytes committed since the last pack: packing",
                self.bytes_since_pack,
            )
            self._start_pack()
        return [STATUS_OKAY]

    def _handle_scan(self, client: _Client, body: bytes) -> list[bytes]:
        if len(body) != 5:
            raise ProtocolError(f"scan: expected 5 bytes of body, got {len(body)}")
        batch_size = max(1, unpack_uint32(body[1:], "scan batch size"))
        if body[0] or client.scan is None:
            # TODO(#5): listing the oids walks every record in one step; a
            # storage-level oid listing would let other clients in between.
            client.scan = [oid for oid, _record in self.storage.gen_oid_record()]
            client.scan.reverse()
        records: list[tuple[bytes, bytes]] = []
        used = 2
        while client.scan and len(records) < batch_size:
            oid = client.scan[-1]
            try:
                record = self.storage.load(oid)
            except KeyError:
                client.scan.pop()  # packed away since the scan started
                continue
            if used + 12 + len(record) > MAX_FRAME_SIZE and records:
                break
            client.scan.pop()
            records.append((oid, record))
            used += 12 + len(record)
        more = bool(client.scan)
        if not more:
            client.scan = None
        return [pack_records_reply(records, more)]

    def _handle_size(self, client: _Client, body: bytes) -> list[bytes]:
        size = self.storage.get_size()
        return [STATUS_OKAY + (b"" if size is None else size.to_bytes(8, "big"))]

    # --- packing -------------------------------------------------------------

    def _start_pack(self) -> asyncio.Task[None]:
        if self._pack_task is None:
            self._pack_task = asyncio.ensure_future(self._run_pack())
            self._pack_task.add_done_callback(self._pack_done)
        return self._pack_task

    def _pack_done(self, task: asyncio.Task[None]) -> None:
        self._pack_task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("pack failed: %s", task.exception())

    async def _pack(self) -> None:
        """Pack (or join the pack running); return when it is done."""
        await asyncio.shield(self._start_pack())

    async def _run_pack(self) -> None:
        log.info("pack started")
        packer = self.storage.get_packer()
        if packer is None:
            # TODO(#5): a storage without an incremental packer blocks every
            # client while it packs.
            self.storage.pack()
        else:
            for _step in packer:
                await asyncio.sleep(0)  # let other clients' requests in
        self.bytes_since_pack = 0
        log.info("pack finished")


# --- sockets ---------------------------------------------------------------------


async def _read_frame(
    reader: asyncio.StreamReader, limit: int, peer: str
) -> bytes | None:
    """Return the next frame's payload, or None at a clean end of stream."""
    try:
        header = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    size = parse_header(header, limit)
    return await reader.readexactly(size)


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    sockname = writer.get_extra_info("sockname")
    return f"unix socket {sockname or peer!r}"


def _listening_socket(address: Address) -> socket.socket:
    """Return a bound, listening, non-blocking socket for ``address``.

    :raises StorageError: when the address is in use or the path is not a socket.
    """
    family, target = socket_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            if isinstance(target, str) and not target.startswith("\0"):
                _clear_stale_socket_file(target)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(target)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StorageError(
            f"cannot listen on {format_address(address)}: {exc.strerror or exc}; "
            "is another server running there? Stop it (dhruva server --stop) or "
            "choose another --port or --address"
        ) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def _clear_stale_socket_file(path: str) -> None:
    """Remove a socket file left by a server that is gone."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StorageError(
            f"{path} exists and is not a unix socket; remove it or choose "
            "another --address"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        log.info("removing stale socket file %s", path)
        os.unlink(path)
    else:
        raise StorageError(
            f"a server is already listening on {path}; stop it (dhruva server "
            "--stop) or choose another --address"
        )
    finally:
        probe.close()


def _remove_socket_file(address: Address) -> None:
    if isinstance(address, str) and not address.startswith("@"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)


def _bound_address(sock: socket.socket, address: Address) -> Address:
    if isinstance(address, str):
        return address
    name = sock.getsockname()
    return (str(name[0]), int(name[1]))


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "StorageServer",
    "stop_server",
    "wait_for_server",
]
