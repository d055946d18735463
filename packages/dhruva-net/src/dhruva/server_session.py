"""One client of the StorageServer: what the server knows of it, and the task
that serves its connection (TLS, hello, authentication, framing, timeouts).

A session only ever waits on its own client: reading a request has a deadline
once its first byte arrived (``request_timeout``), an idle connection may be
closed (``idle_timeout``), and a reply waits for a slow reader at most
``write_timeout`` seconds. The commands themselves are the server's
(:meth:`dhruva.storage_server.StorageServer.dispatch`).

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
  hands out an oid twice). A connection holds at most ``MAX_RESERVED`` of them.
- ``known``: oids this connection loaded (load, bulk load, prefetch, scan) or
  committed. A commit writing an existing oid outside it is refused as a
  conflict (the client must read the object first: a record kept from an
  earlier connection is stale), and the oids others changed since this client
  last synced matter to a commit only when they are in it: a commit whose
  client knows none of them is written at once, and the client hears of them
  at its next sync. It holds at most ``max_known`` oids; past that bound it is
  dropped (``known_overflow``): every commit with oids to hear of is refused
  with them first (the client decides whether they conflict), and records of
  oids the connection did not load since are accepted (a client that loaded
  that many objects is not told apart from one resending stale records).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dhruva.error import ProtocolError, StorageError
from dhruva.net_protocol import (
    CMD_AUTH,
    CMD_COMMIT,
    MAX_FRAME_SIZE,
    MAX_HELLO_SIZE,
    MAX_OIDS_PER_FRAME,
    NONCE_SIZE,
    PROOF_SIZE,
    PROTOCOL_VERSION,
    STATUS_CHALLENGE,
    STATUS_OKAY,
    AuthenticationError,
    auth_proof,
    frame,
    hello,
    pack_error,
    parse_header,
    parse_hello,
    version_mismatch,
)
from dhruva.record import ROOT_OID

if TYPE_CHECKING:
    from dhruva.storage_server import StorageServer

log = logging.getLogger(__name__)

#: Seconds a new connection has for the TLS handshake, its hello and its
#: authentication.
HANDSHAKE_TIMEOUT = 30.0

#: Seconds a client has to send the rest of a request it started.
REQUEST_TIMEOUT = 120.0

#: Seconds a reply may wait for a client that does not read.
WRITE_TIMEOUT = 120.0

#: Unsent reply bytes per connection before the server waits for the reader.
WRITE_BUFFER = 1024 * 1024

#: Reply bytes gathered into one write to the socket.
WRITE_CHUNK = 64 * 1024

#: Invalid oids kept for one client; beyond it, the client must resync all.
MAX_INVALID = 1_000_000

#: Changed oids a client has not read again, kept for its stale-write check;
#: beyond it, the client must resync all (and read again what it writes).
MAX_UNREAD = 1_000_000

#: Oids one connection loaded or committed, kept for its checks (``known``).
MAX_KNOWN = 1_000_000

#: Oids one connection may hold reserved (asked for, not committed yet).
MAX_RESERVED = 1_000_000


@dataclass(eq=False)
class ClientState:
    """What the server knows about one connection."""

    #: The peer, for log lines.
    peer: str
    #: Changed oids kept in ``unread`` (and ``invalid``) before the client is
    #: told to drop everything instead.
    max_unread: int = MAX_UNREAD
    #: Oids kept in ``known`` before it is dropped (``known_overflow``).
    max_known: int = MAX_KNOWN
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
    #: Oids this connection loaded or committed (see the module docstring).
    known: set[bytes] = field(default_factory=set)
    #: True once ``known`` outgrew ``max_known`` and was dropped.
    known_overflow: bool = False
    #: Records sent for the next commit, and their size.
    staged: dict[bytes, bytes] = field(default_factory=dict)
    staged_bytes: int = 0
    #: Oids still to send in a full scan, or None when no scan is running.
    scan: list[bytes] | None = None
    #: True from reading a commit request until its answer is sent: a
    #: graceful stop waits for it (a written commit is never left in doubt).
    answering_commit: bool = False
    #: new_oids requests refused (only the first is logged as it happens).
    oid_refusals: int = 0

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
            # It drops every object it holds: it reads again what it writes.
            self.known = set()
            self.known_overflow = False

    def note_known(self, oids: Iterable[bytes]) -> None:
        """Note that this connection read (or wrote) the current ``oids``."""
        if self.known_overflow:
            return
        self.known.update(oids)
        if len(self.known) > self.max_known:
            log.info(
                "client %s read over %d oids; its commits are checked less "
                "closely from now on",
                self.peer,
                self.max_known,
            )
            self.known = set()
            self.known_overflow = True

    def may_have_read(self, oid: bytes) -> bool:
        """True unless this connection surely holds no record of ``oid``."""
        return self.known_overflow or oid in self.known

    def drop_staged(self) -> None:
        """Forget the records staged for the next commit."""
        self.staged = {}
        self.staged_bytes = 0
        self.refused = set()


def take_oids(oids: set[bytes], limit: int = MAX_OIDS_PER_FRAME) -> list[bytes]:
    """Remove and return up to ``limit`` oids from ``oids``, lowest first."""
    if len(oids) <= limit:
        taken = sorted(oids)
        oids.clear()
        return taken
    taken = sorted(oids)[:limit]
    oids.difference_update(taken)
    return taken


def oid_int(oid: bytes) -> int:
    """The number of ``oid``, for messages."""
    return int.from_bytes(oid, "big")


class Session:
    """Serve one connection of ``server`` until it ends.

    :param server: the server whose commands the client sends.
    """

    def __init__(
        self,
        server: StorageServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        #: The peer, for log lines.
        self.peer = peer_name(writer)
        self.client = ClientState(self.peer, server.max_unread, server.max_known)

    async def run(self) -> None:
        """Shake hands, then answer requests until the client leaves."""
        server, writer, peer = self.server, self.writer, self.peer
        client = self.client
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER)
        set_nodelay(writer)
        try:
            if server.tls is not None and not await self.start_tls():
                return
            try:
                accepted = await asyncio.wait_for(
                    self.handshake(), server.handshake_timeout
                )
            except TimeoutError:
                raise ProtocolError(
                    "no hello (and authentication) within "
                    f"{server.handshake_timeout} seconds of connecting"
                ) from None
            if not accepted:
                return
            server.clients.add(client)
            log.debug("client %s connected", peer)
            while True:
                payload = await self.read_request()
                if payload is None:
                    break
                client.answering_commit = payload[:1] == CMD_COMMIT
                try:
                    replies = await server.dispatch(client, payload)
                    if isinstance(replies, AsyncIterator):
                        await self.send_stream(replies)
                    else:
                        await self.send_all(replies)
                finally:
                    client.answering_commit = False
                if server.stopping:
                    break  # answered; the server is closing every connection
        except (ProtocolError, AuthenticationError) as exc:
            log.warning("closing the connection from %s: %s", peer, exc)
            await self.send_quietly(pack_error(exc))
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.info("lost the connection from %s: %s", peer, exc)
        except TimeoutError:
            log.warning(
                "closing the connection from %s: it did not read its replies "
                "within %s seconds",
                peer,
                server.write_timeout,
            )
        except Exception as exc:
            # A bug in the server: end this connection, keep serving the rest.
            log.exception("internal error serving %s; closing its connection", peer)
            await self.send_quietly(pack_error(exc))
        finally:
            await self._close()

    async def _close(self) -> None:
        server, writer, client = self.server, self.writer, self.client
        server.clients.discard(client)
        if client.oid_refusals > 1:
            log.info(
                "client %s had %d new_oids requests refused (over its reserved "
                "oids limit)",
                self.peer,
                client.oid_refusals,
            )
        if client.unused_oids:
            log.debug(
                "released %d oids reserved by %s", len(client.unused_oids), self.peer
            )
            if ROOT_OID in client.unused_oids:
                server.root_oid_released = True
            client.unused_oids = set()
        if writer.transport.get_write_buffer_size():
            writer.transport.abort()  # a client that does not read
        else:
            writer.close()
        with contextlib.suppress(
            ConnectionError, asyncio.CancelledError, ssl.SSLError, TimeoutError
        ):
            await asyncio.wait_for(writer.wait_closed(), 5)
        log.debug("client %s disconnected", self.peer)

    async def start_tls(self) -> bool:
        """Run the TLS handshake; log and close on failure, returning False."""
        server, writer = self.server, self.writer
        assert server.tls is not None
        try:
            await writer.start_tls(
                server.tls, ssl_handshake_timeout=server.handshake_timeout
            )
        except (OSError, TimeoutError) as exc:
            refused = isinstance(exc, ssl.SSLError) and not isinstance(
                exc, ssl.SSLEOFError
            )
            if refused or isinstance(exc, TimeoutError | ConnectionAbortedError):
                log.warning("TLS handshake with %s failed: %s", self.peer, exc)
            else:
                log.info("TLS handshake with %s ended early: %s", self.peer, exc)
            writer.transport.abort()
            return False
        return True

    async def send(self, payload: bytes) -> None:
        """Send one frame, waiting at most ``write_timeout`` for the reader."""
        await self.send_all([payload])

    async def send_all(self, payloads: Iterable[bytes]) -> None:
        """Send frames, a few per write, waiting at most ``write_timeout``
        whenever this client reads slower than the server writes."""
        writer = self.writer
        chunk: list[bytes] = []
        size = 0
        for payload in payloads:
            chunk.append(frame(payload))
            size += len(chunk[-1])
            if size >= WRITE_CHUNK:
                writer.write(b"".join(chunk))
                chunk, size = [], 0
                await self._drain()
        if chunk:
            writer.write(b"".join(chunk))
            await self._drain()

    async def send_stream(self, payloads: AsyncIterator[bytes]) -> None:
        """Send frames as ``payloads`` makes them, a few per write, waiting
        for a slow reader before making more."""
        writer = self.writer
        chunk: list[bytes] = []
        size = 0
        async for payload in payloads:
            chunk.append(frame(payload))
            size += len(chunk[-1])
            if size >= WRITE_CHUNK:
                writer.write(b"".join(chunk))
                chunk, size = [], 0
                await self._drain()
        if chunk:
            writer.write(b"".join(chunk))
            await self._drain()

    async def _drain(self) -> None:
        if self.writer.transport.get_write_buffer_size() or self.writer.is_closing():
            await asyncio.wait_for(self.writer.drain(), self.server.write_timeout)

    async def send_quietly(self, payload: bytes) -> None:
        """Send a last frame to a client whose connection is closing."""
        with contextlib.suppress(
            ConnectionError, StorageError, TimeoutError, ssl.SSLError
        ):
            self.writer.write(frame(payload))
            await asyncio.wait_for(
                self.writer.drain(), min(5.0, self.server.write_timeout)
            )

    async def read_request(self) -> bytes | None:
        """Return the next frame, or None at a clean end of stream.

        Waiting for a request's first byte is bounded by ``idle_timeout``; the
        rest of it must arrive within ``request_timeout``.
        """
        server = self.server
        try:
            first = await asyncio.wait_for(self.reader.read(1), server.idle_timeout)
        except TimeoutError:
            log.info(
                "closing the connection from %s: idle for %s seconds",
                self.peer,
                server.idle_timeout,
            )
            return None
        if not first:
            return None
        try:
            return await asyncio.wait_for(
                read_rest_of_frame(self.reader, first, MAX_FRAME_SIZE),
                server.request_timeout,
            )
        except TimeoutError:
            raise ProtocolError(
                f"a request was not complete within {server.request_timeout} seconds"
            ) from None

    async def handshake(self) -> bool:
        """Exchange hellos and authenticate; return False to close quietly."""
        first = await self.reader.read(1)
        if not first:
            return False  # a port probe
        payload = await read_rest_of_frame(self.reader, first, MAX_HELLO_SIZE)
        version, _flags = parse_hello(payload)

        if version != PROTOCOL_VERSION:
            log.warning(
                "refusing client %s: %s",
                self.peer,
                version_mismatch(version, PROTOCOL_VERSION),
            )

        # Always answer with our own hello, so the client can name both versions.
        await self.send(hello(self.server.flags()))
        if version != PROTOCOL_VERSION:
            return False
        if self.server.auth_key is not None:
            await self.authenticate(self.server.auth_key)
        return True

    async def authenticate(self, key: bytes) -> None:
        """Challenge the client, check its proof, prove ourselves in turn.

        :raises AuthenticationError: when the client's proof is wrong.
        """
        peer = self.peer
        nonce = secrets.token_bytes(NONCE_SIZE)
        await self.send(STATUS_CHALLENGE + nonce)
        first = await self.reader.read(1)
        if not first:
            raise ConnectionResetError("closed during authentication")
        answer = await read_rest_of_frame(self.reader, first, MAX_HELLO_SIZE)
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
        await self.send(STATUS_OKAY + auth_proof(key, b"server", client_nonce, nonce))
        log.debug("client %s authenticated", peer)


async def read_rest_of_frame(
    reader: asyncio.StreamReader, first: bytes, limit: int
) -> bytes:
    """Return the payload of a frame whose first header byte was read."""
    header = first + await reader.readexactly(3)
    size = parse_header(header, limit)
    return await reader.readexactly(size)


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    """Send replies at once on a TCP connection (no Nagle delay).

    asyncio does so only for sockets made with ``proto=IPPROTO_TCP``; a
    listening socket made with the default protocol (ours, systemd's) hands
    out connections that would hold back a reply's second frame until the
    client's delayed ACK of the first, 40 ms later.
    """
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def peer_name(writer: asyncio.StreamWriter) -> str:
    """Name the peer of a connection, for log lines."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    sockname = writer.get_extra_info("sockname")
    return f"unix socket {sockname or peer!r}"
