"""StorageServer: one storage shared by many ClientStorage clients.

The server runs one asyncio event loop. Every connection has its own task and
its own state, so a slow, idle or stuck client only ever waits on itself:

- reads of a request have a deadline once its first byte arrived
  (``request_timeout``), idle connections may be closed (``idle_timeout``), and
  replies wait for a slow reader at most ``write_timeout`` seconds;
- storage calls that may take long (a commit and its fsync, a pack step, a
  batch of the listing that starts a scan) run in one worker thread, so the
  loop keeps accepting, handshaking and answering. Storages are not
  thread-safe: every storage call, in the loop or the worker, holds one lock,
  and quick calls (loads) run in the loop only when nobody else holds it.
  Long work is cut into short calls (pack steps, listing batches of at most
  ``LIST_BATCH_SECONDS``), so that other clients' calls run in between.

What the server keeps per client, as Durus does, and checks itself:

- ``invalid``: oids other clients committed since this client last synced.
  :meth:`~dhruva.client_storage.ClientStorage.sync` returns and clears them; a
  load of one is refused (the client raises ReadConflictError); a commit while
  there are some is refused before anything is written.
- ``unread``: oids other clients changed that this client has not loaded
  (load, bulk load or prefetch) since. A commit writing one is refused as a
  conflict every time, whatever the client synced or was told: a client that
  never re-read an object cannot overwrite another's change to it (an old,
  buggy or hostile client resending a stale record). It holds at most
  ``max_unread`` oids: a client further behind has both sets dropped, its
  loads and commits refused until it syncs, and that sync answers
  "everything" (a Connection then drops every object it holds).
- ``refused``: oids a refused commit told the client about, for its staged
  records.
- ``unused_oids``: oids handed to this client and not committed yet. A record
  is accepted only for an oid the storage holds or this client was given; the
  client's unused oids are forgotten when it disconnects (the storage never
  hands out an oid twice).

The wire protocol is in :mod:`dhruva.net_protocol` and ``docs/protocol.md``.

Limitations:

- Storage calls are serialized: while the worker runs a commit's fsync or a
  non-incremental ``pack()``, other clients' loads wait for it (their
  connections stay served).
- A scan that starts while a pack runs waits for the end of the pack, and a
  pack waits for the listing of a scan that started first.
- The server answers only clients of its own protocol version.
- Once a client fell ``max_unread`` changed oids behind, the stale-write check
  knows only of the changes made after its "everything" sync: a client that
  ignores that answer and resends records it held before is not caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import signal
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dhruva.client_storage import stop_server, wait_for_server
from dhruva.error import ConflictError, DhruvaError, ProtocolError, StorageError
from dhruva.net_protocol import (
    CMD_ABANDON,
    CMD_AUTH,
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
    MAX_FRAME_SIZE,
    MAX_HELLO_SIZE,
    MAX_NEW_OIDS,
    MAX_OIDS_PER_FRAME,
    MAX_PREFETCH,
    NONCE_SIZE,
    PROOF_SIZE,
    PROTOCOL_VERSION,
    STATUS_CHALLENGE,
    STATUS_CONFLICT,
    STATUS_INVALID,
    STATUS_KEYERROR,
    STATUS_OKAY,
    STATUS_REFUSED,
    STATUS_RESYNC,
    SYNC_DONE,
    SYNC_EVERYTHING,
    SYNC_MORE,
    Address,
    AuthenticationError,
    auth_proof,
    format_address,
    frame,
    hello,
    pack_error,
    pack_records_reply,
    parse_header,
    parse_hello,
    resolve_address,
    split_oid_list,
    unpack_records,
    unpack_uint32,
    version_mismatch,
)
from dhruva.record import ROOT_OID, split_oids, unpack_record
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

#: Seconds a new connection has for the TLS handshake, its hello and its
#: authentication.
HANDSHAKE_TIMEOUT = 30.0

#: Seconds a client has to send the rest of a request it started.
REQUEST_TIMEOUT = 120.0

#: Seconds a reply may wait for a client that does not read.
WRITE_TIMEOUT = 120.0

#: Unsent reply bytes per connection before the server waits for the reader.
WRITE_BUFFER = 1024 * 1024

#: Record bytes one client may stage for one commit.
MAX_STAGED_BYTES = 1024 * 1024 * 1024

#: Invalid oids kept for one client; beyond it, the client must resync all.
MAX_INVALID = 1_000_000

#: Changed oids a client has not read again, kept for its stale-write check;
#: beyond it, the client must resync all (and read again what it writes).
MAX_UNREAD = 1_000_000

#: Oids loaded per storage call in a bulk load.
LOAD_CHUNK = 256

#: Records listed per storage call when a full scan starts, and the seconds
#: one such call may take (other clients' calls wait that long at most).
LIST_BATCH = 10_000
LIST_BATCH_SECONDS = 0.05

DEFAULT_GCBYTES = 0

#: At shutdown, loop turns left for a just-accepted connection to get its task
#: (asyncio needs three), and how many times to cut the connections found.
SHUTDOWN_TURNS = 8
SHUTDOWN_ROUNDS = 5


@dataclass(eq=False)
class _Client:
    """What the server knows about one connection."""

    #: The peer, for log lines.
    peer: str
    #: Changed oids kept in ``unread`` (and ``invalid``) before the client is
    #: told to drop everything instead.
    max_unread: int = MAX_UNREAD
    #: Oids other clients committed since this client last synced.
    invalid: set[bytes] = field(default_factory=set)
    #: True once the client fell too far behind: ``invalid`` and ``unread``
    #: were dropped, and its next sync answers "everything".
    invalid_overflow: bool = False
    #: Oids other clients changed that this client has not loaded since.
    unread: set[bytes] = field(default_factory=set)
    #: Oids a refused commit told this client about, for the staged records.
    refused: set[bytes] = field(default_factory=set)
    #: Oids handed to this client and not committed yet.
    unused_oids: set[bytes] = field(default_factory=set)
    #: Records sent for the next commit, and their size.
    staged: dict[bytes, bytes] = field(default_factory=dict)
    staged_bytes: int = 0
    #: Oids still to send in a full scan, or None when no scan is running.
    scan: list[bytes] | None = None

    def invalidate(self, oids: Iterable[bytes]) -> None:
        """Note that other clients changed ``oids``."""
        if self.invalid_overflow:
            return  # the "everything" of the next sync covers them
        oids = list(oids)
        self.unread.update(oids)
        self.invalid.update(oids)
        if len(self.unread) > self.max_unread or len(self.invalid) > MAX_INVALID:
            # Until it syncs, its loads and commits are refused; the sync
            # tells it to drop every object it holds, so it reads them again.
            log.info(
                "client %s is %d changed oids behind; it will resync all",
                self.peer,
                len(self.unread),
            )
            self.invalid = set()
            self.unread = set()
            self.invalid_overflow = True


def _take(oids: set[bytes], limit: int = MAX_OIDS_PER_FRAME) -> list[bytes]:
    """Remove and return up to ``limit`` oids from ``oids``, lowest first."""
    if len(oids) <= limit:
        taken = sorted(oids)
        oids.clear()
        return taken
    taken = sorted(oids)[:limit]
    oids.difference_update(taken)
    return taken


def _oid_int(oid: bytes) -> int:
    return int.from_bytes(oid, "big")


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
        self.clients: set[_Client] = set()
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

        # One lock around every storage call; one worker for the slow ones.
        self._storage_lock = threading.Lock()
        self._worker: ThreadPoolExecutor | None = None
        self._commit_lock: asyncio.Lock | None = None
        #: Held by a pack and by the listing that starts a scan: a pack moves
        #: the records a listing reads.
        self._layout_lock: asyncio.Lock | None = None
        #: The records the commit being written replaces (None: a new oid).
        #: Loads of those oids meanwhile are answered from here, as before it.
        self._writing: dict[bytes, bytes | None] = {}

        self._pack_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._stop_requested = threading.Event()
        self._handlers: dict[
            bytes, Callable[[_Client, bytes], Awaitable[Iterable[bytes]]]
        ] = {
            CMD_NEW_OIDS: self._handle_new_oids,
            CMD_LOAD: self._handle_load,
            CMD_PREFETCH_LOAD: self._handle_prefetch_load,
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
        self._stopping = stopping = asyncio.Event()
        self._loop = loop
        self._commit_lock = asyncio.Lock()
        self._layout_lock = asyncio.Lock()
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
                    if self.tls is not None and not await self._start_tls(writer):
                        return
                    await self._serve_connection(reader, writer)
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
        if self._pack_task is not None:
            self._pack_task.cancel()
            await asyncio.gather(self._pack_task, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2)

    def _on_signal(self, signum: int) -> None:
        log.info("stopping on signal %s", signal.Signals(signum).name)
        self.stop()

    # --- storage calls ---------------------------------------------------------

    async def _call(
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

    # --- one connection --------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = _peer_name(writer)
        client = _Client(peer, self.max_unread)
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER)
        try:
            try:
                accepted = await asyncio.wait_for(
                    self._handshake(reader, writer, peer), self.handshake_timeout
                )
            except TimeoutError:
                raise ProtocolError(
                    f"no hello (and authentication) within {self.handshake_timeout} "
                    "seconds of connecting"
                ) from None
            if not accepted:
                return
            self.clients.add(client)
            log.debug("client %s connected", peer)
            while True:
                payload = await self._read_request(reader, peer)
                if payload is None:
                    break
                # Replies go out one frame at a time, waiting whenever this
                # client reads slower than the server writes.
                for reply in await self._dispatch(client, payload):
                    await self._send(writer, reply)
        except (ProtocolError, AuthenticationError) as exc:
            log.warning("closing the connection from %s: %s", peer, exc)
            await self._send_quietly(writer, pack_error(exc))
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.info("lost the connection from %s: %s", peer, exc)
        except TimeoutError:
            log.warning(
                "closing the connection from %s: it did not read its replies "
                "within %s seconds",
                peer,
                self.write_timeout,
            )
        except Exception as exc:
            # A bug in the server: end this connection, keep serving the rest.
            log.exception("internal error serving %s; closing its connection", peer)
            await self._send_quietly(writer, pack_error(exc))
        finally:
            self.clients.discard(client)
            if client.unused_oids:
                log.debug(
                    "released %d oids reserved by %s", len(client.unused_oids), peer
                )
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a client that does not read
            else:
                writer.close()
            with contextlib.suppress(
                ConnectionError, asyncio.CancelledError, ssl.SSLError, TimeoutError
            ):
                await asyncio.wait_for(writer.wait_closed(), 5)
            log.debug("client %s disconnected", peer)

    async def _start_tls(self, writer: asyncio.StreamWriter) -> bool:
        """Run the TLS handshake; log and close on failure, returning False."""
        assert self.tls is not None
        peer = _peer_name(writer)
        try:
            await writer.start_tls(
                self.tls, ssl_handshake_timeout=self.handshake_timeout
            )
        except (OSError, TimeoutError) as exc:
            refused = isinstance(exc, ssl.SSLError) and not isinstance(
                exc, ssl.SSLEOFError
            )
            if refused or isinstance(exc, TimeoutError | ConnectionAbortedError):
                log.warning("TLS handshake with %s failed: %s", peer, exc)
            else:
                log.info("TLS handshake with %s ended early: %s", peer, exc)
            writer.transport.abort()
            return False
        return True

    async def _send(self, writer: asyncio.StreamWriter, payload: bytes) -> None:
        writer.write(frame(payload))
        await asyncio.wait_for(writer.drain(), self.write_timeout)

    async def _send_quietly(self, writer: asyncio.StreamWriter, payload: bytes) -> None:
        with contextlib.suppress(
            ConnectionError, StorageError, TimeoutError, ssl.SSLError
        ):
            writer.write(frame(payload))
            await asyncio.wait_for(writer.drain(), min(5.0, self.write_timeout))

    async def _read_request(
        self, reader: asyncio.StreamReader, peer: str
    ) -> bytes | None:
        """Return the next frame, or None at a clean end of stream.

        Waiting for a request's first byte is bounded by ``idle_timeout``; the
        rest of it must arrive within ``request_timeout``.
        """
        try:
            first = await asyncio.wait_for(reader.read(1), self.idle_timeout)
        except TimeoutError:
            log.info(
                "closing the connection from %s: idle for %s seconds",
                peer,
                self.idle_timeout,
            )
            return None
        if not first:
            return None
        try:
            return await asyncio.wait_for(
                _read_rest_of_frame(reader, first, MAX_FRAME_SIZE), self.request_timeout
            )
        except TimeoutError:
            raise ProtocolError(
                f"a request was not complete within {self.request_timeout} seconds"
            ) from None

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> bool:
        """Exchange hellos and authenticate; return False to close quietly."""
        first = await reader.read(1)
        if not first:
            return False  # a port probe
        payload = await _read_rest_of_frame(reader, first, MAX_HELLO_SIZE)
        version, _flags = parse_hello(payload)

        if version != PROTOCOL_VERSION:
            log.warning(
                "refusing client %s: %s",
                peer,
                version_mismatch(version, PROTOCOL_VERSION),
            )

        # Always answer with our own hello, so the client can name both versions.
        await self._send(writer, hello(self._flags()))
        if version != PROTOCOL_VERSION:
            return False
        if self.auth_key is not None:
            await self._authenticate(reader, writer, peer, self.auth_key)
        return True

    async def _authenticate(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        key: bytes,
    ) -> None:
        """Challenge the client, check its proof, prove ourselves in turn.

        :raises AuthenticationError: when the client's proof is wrong.
        """
        nonce = secrets.token_bytes(NONCE_SIZE)
        await self._send(writer, STATUS_CHALLENGE + nonce)
        first = await reader.read(1)
        if not first:
            raise ConnectionResetError("closed during authentication")
        answer = await _read_rest_of_frame(reader, first, MAX_HELLO_SIZE)
        if len(answer) != 1 + NONCE_SIZE + PROOF_SIZE or answer[:1] != CMD_AUTH:
            raise AuthenticationError(
                f"client {peer} did not authenticate (the server needs a key: "
                "give auth_key= or --auth-file)"
            )
        client_nonce = answer[1 : 1 + NONCE_SIZE]
        proof = answer[1 + NONCE_SIZE :]
        expected = auth_proof(key, b"client", nonce, client_nonce)
        if not hmac.compare_digest(proof, expected):
            raise AuthenticationError(
                f"client {peer} failed authentication: it does not know the "
                "server's key"
            )
        await self._send(
            writer, STATUS_OKAY + auth_proof(key, b"server", client_nonce, nonce)
        )
        log.debug("client %s authenticated", peer)

    def _flags(self) -> int:
        storage = self.storage
        return (
            (FLAG_READONLY if storage.readonly else 0)
            | (FLAG_PACKABLE if storage.packable else 0)
            | (FLAG_ITERABLE if storage.iterable else 0)
            | (FLAG_AUTH if self.auth_key is not None else 0)
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

    def _load_records(self, oids: list[bytes]) -> list[bytes | None]:
        """Storage call: the records of ``oids`` (None for a missing one)."""
        result: list[bytes | None] = []
        for oid in oids:
            try:
                result.append(self.storage.load(oid))
            except KeyError:
                result.append(None)
            except ConflictError:
                result.append(b"")
        return result

    async def _read(self, oids: list[bytes]) -> dict[bytes, bytes | None]:
        """Return the current records of ``oids`` (None: missing, b"": conflict).

        An oid a commit is writing right now is answered as it was before that
        commit: the commit's invalidations are not out yet.
        """
        writing = self._writing
        wanted = [oid for oid in oids if oid not in writing]
        loaded = await self._call(self._load_records, wanted) if wanted else []
        records = dict(zip(wanted, loaded, strict=True))
        records.update((oid, writing[oid]) for oid in oids if oid in writing)
        return records

    async def _load_replies(self, client: _Client, oids: list[bytes]) -> list[bytes]:
        if client.invalid_overflow:
            return [STATUS_INVALID] * len(oids)
        records = await self._read([oid for oid in oids if oid not in client.invalid])
        replies = []
        for oid in oids:
            record = records.get(oid, b"")
            if oid not in records or record == b"":
                replies.append(STATUS_INVALID)
            elif record is None:
                replies.append(STATUS_KEYERROR)
            else:
                replies.append(STATUS_OKAY + record)
            if replies[-1] != STATUS_INVALID:
                client.unread.discard(oid)  # it has the current record now
        return replies

    async def _handle_load(self, client: _Client, body: bytes) -> list[bytes]:
        if len(body) != 8:
            raise ProtocolError(f"load: expected an 8-byte oid, got {len(body)} bytes")
        return await self._load_replies(client, [body])

    async def _handle_prefetch_load(self, client: _Client, body: bytes) -> list[bytes]:
        if len(body) != 12:
            raise ProtocolError(f"prefetch load: expected 12 bytes, got {len(body)}")
        oid, limit = body[:8], min(unpack_uint32(body[8:], "prefetch"), MAX_PREFETCH)
        [reply] = await self._load_replies(client, [oid])
        prefetched: list[tuple[bytes, bytes]] = []
        if reply[:1] == STATUS_OKAY and limit:
            refs = [
                ref
                for ref in dict.fromkeys(split_oids(unpack_record(reply[1:])[2]))
                if ref != oid and ref not in client.invalid and ref not in self._writing
            ][:limit]
            if refs and not client.invalid_overflow:
                records = await self._call(self._load_records, refs)
                prefetched = [
                    (r, rec) for r, rec in zip(refs, records, strict=True) if rec
                ]
                client.unread.difference_update(r for r, _rec in prefetched)
        return [reply, pack_records_reply(prefetched, False)]

    async def _handle_bulk_load(self, client: _Client, body: bytes) -> list[bytes]:
        oids = split_oid_list(body, "bulk_load")
        replies: list[bytes] = []
        for start in range(0, len(oids), LOAD_CHUNK):
            replies += await self._load_replies(
                client, oids[start : start + LOAD_CHUNK]
            )
        return replies

    # --- oids, sync ------------------------------------------------------------

    def _new_oids(self, count: int) -> list[bytes]:
        return [self.storage.new_oid() for _ in range(count)]

    async def _handle_new_oids(self, client: _Client, body: bytes) -> list[bytes]:
        count = unpack_uint32(body, "new_oids")
        if not 0 < count <= MAX_NEW_OIDS:
            raise ProtocolError(
                f"new_oids: asked for {count}, allowed 1 to {MAX_NEW_OIDS}"
            )
        oids: list[bytes] = []
        while len(oids) < count:
            for oid in await self._call(self._new_oids, count - len(oids)):
                # Never hand out an oid some client still holds as invalid.
                if not any(oid in other.invalid for other in self.clients):
                    oids.append(oid)
        client.unused_oids.update(oids)
        return [STATUS_OKAY + b"".join(oids)]

    async def _sync_storage(self) -> None:
        # A storage shared with other processes may report their commits.
        self._invalidate_all(await self._call(self.storage.sync))

    def _invalidate_all(self, oids: Iterable[bytes]) -> None:
        oids = list(oids)
        if oids:
            for client in self.clients:
                client.invalidate(oids)

    async def _handle_sync(self, client: _Client, body: bytes) -> list[bytes]:
        await self._sync_storage()
        if client.invalid_overflow:
            client.invalid_overflow = False
            self._drop_staged(client)  # staged before it learned: all suspect
            return [STATUS_OKAY + bytes([SYNC_EVERYTHING])]
        oids = _take(client.invalid)
        if client.staged:
            # Records staged before the client learned of these changes must
            # not overwrite them (see _commit).
            client.refused.update(oids)
        more = SYNC_MORE if client.invalid else SYNC_DONE
        return [STATUS_OKAY + bytes([more]) + b"".join(oids)]

    # --- commits -------------------------------------------------------------

    async def _handle_stage(self, client: _Client, body: bytes) -> list[bytes]:
        for oid, record in unpack_records(body):
            client.staged_bytes += 12 + len(record)
            client.staged[oid] = record
        return []

    async def _handle_abandon(self, client: _Client, body: bytes) -> list[bytes]:
        client.staged.clear()
        client.staged_bytes = 0
        client.refused.clear()
        return []

    def _write(self, staged: dict[bytes, bytes], reported: list[bytes]) -> None:
        """Storage call: one transaction of ``staged`` records."""
        self.storage.begin()
        for oid, record in staged.items():
            self.storage.store(oid, record)
        self.storage.end(reported.extend)

    async def _handle_commit(self, client: _Client, body: bytes) -> list[bytes]:
        assert self._commit_lock is not None
        async with self._commit_lock:
            return await self._commit(client)

    async def _commit(self, client: _Client) -> list[bytes]:
        await self._sync_storage()
        if client.invalid_overflow:
            self._drop_staged(client)
            return [STATUS_RESYNC]
        if client.invalid:
            # Refused before anything is written; the staged records wait for
            # the client to commit again or abandon them.
            oids = _take(client.invalid)
            client.refused.update(oids)
            return [STATUS_REFUSED + b"".join(oids)]

        staged, size, refused = client.staged, client.staged_bytes, client.refused
        self._drop_staged(client)
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
                _oid_int(stale[0]),
            )
            return [STATUS_CONFLICT + b"".join(stale[:MAX_OIDS_PER_FRAME])]

        _check_records(staged)
        old = await self._check_allocated(client, staged)

        # Write in the worker. Meanwhile loads of these oids get the records
        # from before the commit, until every other client has them in its
        # invalid set.
        self._writing = old
        reported: list[bytes] = []
        try:
            await self._call(self._write, staged, reported, slow=True)
        except ConflictError as exc:
            log.info("commit from %s conflicted: %s", client.peer, exc)
            return [STATUS_CONFLICT + b"".join(exc.oids[:MAX_OIDS_PER_FRAME])]
        else:
            # Tell every other client, and count towards the next pack.
            client.unused_oids.difference_update(staged)
            for other in self.clients:
                if other is not client:
                    other.invalidate(staged)
        finally:
            self._invalidate_all(reported)
            self._writing = {}

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

    def _drop_staged(self, client: _Client) -> None:
        client.staged = {}
        client.staged_bytes = 0
        client.refused = set()

    async def _check_allocated(
        self, client: _Client, staged: dict[bytes, bytes]
    ) -> dict[bytes, bytes | None]:
        """Refuse records for oids neither stored nor handed to this client.

        :return: the records ``staged`` replaces (None for a new oid).
        :raises StorageError: naming the first such oid.
        """
        for other in self.clients:
            if other is not client and not other.unused_oids.isdisjoint(staged):
                oid = min(other.unused_oids.intersection(staged))
                raise StorageError(
                    f"commit refused: oid {_oid_int(oid)} was handed to client "
                    f"{other.peer}, not to this one"
                )
        old = dict.fromkeys(staged)
        stored = [oid for oid in staged if oid not in client.unused_oids]
        if stored:
            loaded = await self._call(self._load_records, stored)
            old.update(zip(stored, loaded, strict=True))
        # The root's oid is everybody's: a new database's first commit makes it.
        missing = [
            oid
            for oid in stored
            if old[oid] is None and oid not in client.unused_oids and oid != ROOT_OID
        ]
        if missing:
            raise StorageError(
                f"commit refused: oid {_oid_int(min(missing))} is not in the "
                "storage and was not handed to this client; new objects must "
                "get their oids from new_oid()"
            )
        return old

    # --- scans, size -----------------------------------------------------------

    async def _list_oids(self) -> list[bytes]:
        """Return the oid of every record, listed a batch per storage call.

        Other clients' storage calls run between the batches, so a big
        listing delays them by one batch at most. No pack runs meanwhile:
        it could move the records the listing is reading.
        """
        assert self._layout_lock is not None
        async with self._layout_lock:
            records = await self._call(self.storage.gen_oid_record)
            oids: list[bytes] = []
            try:
                while True:
                    batch, done = await self._call(_next_oids, records, slow=True)
                    oids += batch
                    if done:
                        return oids
            finally:
                close = getattr(records, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        await self._call(close)

    async def _handle_scan(self, client: _Client, body: bytes) -> list[bytes]:
        if len(body) != 5:
            raise ProtocolError(f"scan: expected 5 bytes of body, got {len(body)}")
        batch_size = max(1, unpack_uint32(body[1:], "scan batch size"))
        if body[0] or client.scan is None:
            client.scan = await self._list_oids()
            client.scan.reverse()
        scan = client.scan
        records: list[tuple[bytes, bytes]] = []
        used = 2
        while scan and len(records) < batch_size:
            oids = scan[-min(LOAD_CHUNK, batch_size - len(records)) :][::-1]
            current = await self._read(oids)
            for oid in oids:
                record = current[oid]
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

    async def _handle_size(self, client: _Client, body: bytes) -> list[bytes]:
        size = await self._call(self.storage.get_size)
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
            log.error(
                "pack failed and was abandoned; the server goes on serving: %s",
                task.exception(),
            )

    async def _pack(self) -> None:
        """Pack (or join the pack running); return when it is done."""
        await asyncio.shield(self._start_pack())

    async def _run_pack(self) -> None:
        assert self._layout_lock is not None
        async with self._layout_lock:
            await self._pack_steps()

    async def _pack_steps(self) -> None:
        log.info("pack started")
        packer = await self._call(self.storage.get_packer)
        if packer is None:
            await self._call(self.storage.pack, slow=True)
        else:
            try:
                # One step per worker call: other clients are served between.
                while await self._call(_step, packer, slow=True):
                    pass
            finally:
                close = getattr(packer, "close", None)
                if close is not None:
                    await self._call(close, slow=True)
        self.bytes_since_pack = 0
        log.info("pack finished")


def _check_records(staged: dict[bytes, bytes]) -> None:
    """Refuse a commit holding a record that is not a whole object record.

    :raises StorageError: naming the first such oid; nothing is written.
    """
    for oid, record in staged.items():
        try:
            record_oid = unpack_record(record)[0]
        except StorageError as exc:
            raise StorageError(
                f"commit refused: the record for oid {_oid_int(oid)} is not an "
                f"object record ({exc}); nothing was written"
            ) from None
        if record_oid != oid:
            raise StorageError(
                f"commit refused: the record stored for oid {_oid_int(oid)} "
                f"starts with oid {_oid_int(record_oid)}; nothing was written"
            )


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


# --- sockets ---------------------------------------------------------------------


async def _read_rest_of_frame(
    reader: asyncio.StreamReader, first: bytes, limit: int
) -> bytes:
    """Return the payload of a frame whose first header byte was read."""
    header = first + await reader.readexactly(3)
    size = parse_header(header, limit)
    return await reader.readexactly(size)


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    sockname = writer.get_extra_info("sockname")
    return f"unix socket {sockname or peer!r}"


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "StorageServer",
    "stop_server",
    "wait_for_server",
]
