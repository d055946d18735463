"""ClientStorage: a storage reached through a dhruva StorageServer.

Use it wherever a storage goes::

    from dhruva.client_storage import ClientStorage
    from dhruva.connection import Connection

    connection = Connection(ClientStorage(address=("127.0.0.1", 2972)))

Other clients' commits reach this one through :meth:`ClientStorage.sync` (a
Connection calls it at each commit and abort). The wire protocol is described
in :mod:`dhruva.net_protocol` and ``docs/protocol.md``.

Limitations:

- One ClientStorage is one socket: use it from one thread at a time.
- One object record can be at most
  :data:`~dhruva.net_protocol.MAX_RECORD_SIZE` bytes; :meth:`ClientStorage.store`
  refuses a bigger one with StorageError.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from dhruva.error import (
    DhruvaKeyError,
    ProtocolError,
    ReadConflictError,
    StorageError,
    WriteConflictError,
)
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
    CMD_SYNC,
    DEFAULT_HOST,
    DEFAULT_PORT,
    FLAG_ITERABLE,
    FLAG_PACKABLE,
    FLAG_READONLY,
    MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    STATUS_CONFLICT,
    STATUS_ERROR,
    STATUS_INVALID,
    STATUS_KEYERROR,
    STATUS_OKAY,
    STATUS_REFUSED,
    Address,
    check_record_size,
    format_address,
    frame,
    hello,
    pack_records,
    pack_uint32,
    parse_header,
    parse_hello,
    resolve_address,
    socket_address,
    split_oid_list,
    unpack_error,
    unpack_records,
    version_mismatch,
)
from dhruva.record import ROOT_OID
from dhruva.storage import InvalidationHandler, Storage, gen_reachable_records

log = logging.getLogger(__name__)

#: Seconds to wait for the server to accept and answer the hello.
CONNECT_TIMEOUT = 10.0

#: Oids fetched from the server per round trip.
OID_BATCH = 128

#: Oids per bulk-load request.
BULK_BATCH = 1024


def _connect(address: Address, timeout: float | None) -> socket.socket:
    """Return a socket connected to ``address``.

    :raises StorageError: naming the address when nothing listens there.
    """
    family, target = socket_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError as exc:
        sock.close()
        raise StorageError(
            f"cannot connect to a dhruva server at {format_address(address)}: "
            f"{exc.strerror or exc}; start one with `dhruva server` "
            "(see --help for --file, --port and --address)"
        ) from exc
    if family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class ClientStorage(Storage):
    """The storage of a StorageServer, reached over TCP or a unix socket.

    :param host: the server's host, when ``address`` is not given.
    :param port: the server's port, when ``address`` is not given.
    :param address: ``(host, port)`` or a unix socket path.
    :param timeout: seconds to wait for any one reply; None waits for ever.
    :raises StorageError: when no server listens at the address.
    :raises ProtocolError: when the server speaks another protocol version.
    """

    invalidating = True

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        address: Address | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        self.address: Address = resolve_address(host, port, address)
        self._sock: socket.socket | None = _connect(self.address, CONNECT_TIMEOUT)
        self._file: BinaryIO = self._sock.makefile("rb")
        self._oid_pool: list[bytes] = []
        self._records: dict[bytes, bytes] = {}
        self._transaction_new_oids: list[bytes] = []
        #: Invalid oids received during a commit that had no callback for them.
        self._pending_invalid: list[bytes] = []
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise
        self._sock.settimeout(timeout)

    def __str__(self) -> str:
        return f"ClientStorage({format_address(self.address)})"

    # --- the wire ------------------------------------------------------------

    def _handshake(self) -> None:
        self._send(hello(version=PROTOCOL_VERSION))
        try:
            reply = self._receive()
        except StorageError as exc:
            raise ProtocolError(
                f"the server at {format_address(self.address)} did not answer "
                f"the dhruva-net hello ({exc}); it may be another program, or a "
                f"dhruva server that does not speak protocol version "
                f"{PROTOCOL_VERSION}"
            ) from None
        version, flags = parse_hello(reply)
        if version != PROTOCOL_VERSION:
            raise version_mismatch(PROTOCOL_VERSION, version)
        self.readonly = bool(flags & FLAG_READONLY)
        self.packable = bool(flags & FLAG_PACKABLE)
        self.iterable = bool(flags & FLAG_ITERABLE)
        log.info("connected to the dhruva server at %s", format_address(self.address))

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise StorageError(f"{self} is closed; open a new ClientStorage")
        return self._sock

    def _send(self, payload: bytes) -> None:
        data = frame(payload)
        sock = self._socket()
        try:
            sock.sendall(data)
        except OSError as exc:
            raise self._lost(exc) from exc
        except BaseException:
            self.close()  # a frame cut short: the stream is out of step
            raise

    def _receive(self) -> bytes:
        self._socket()
        try:
            header = self._file.read(4)
            if len(header) == 4:
                size = parse_header(header, MAX_FRAME_SIZE)
                payload = self._file.read(size)
                if len(payload) == size:
                    return payload
        except OSError as exc:
            raise self._lost(exc) from exc
        except BaseException:
            # A bad header, an interrupt or a timeout mid-frame: nothing
            # after it on this stream can be trusted.
            self.close()
            raise
        raise self._lost(None)

    def _lost(self, exc: OSError | None) -> StorageError:
        self.close()
        why = f": {exc}" if exc else ""
        return StorageError(
            f"lost the connection to the dhruva server at "
            f"{format_address(self.address)}{why}; the server may have stopped. "
            "Open a new ClientStorage once it runs again"
        )

    def _request(self, payload: bytes) -> tuple[bytes, bytes]:
        """Send one command; return the reply's status and body."""
        self._send(payload)
        return self._reply()

    def _reply(self) -> tuple[bytes, bytes]:
        reply = self._receive()
        status, body = reply[:1], reply[1:]
        if status == STATUS_ERROR:
            raise unpack_error(body)
        return status, body

    def _expect_okay(self, status: bytes, what: str) -> None:
        if status != STATUS_OKAY:
            raise ProtocolError(f"{what}: the server answered with status {status!r}")

    # --- the Storage interface --------------------------------------------------

    def new_oid(self) -> bytes:
        if not self._oid_pool:
            status, body = self._request(CMD_NEW_OIDS + pack_uint32(OID_BATCH))
            self._expect_okay(status, "new_oid")
            oids = split_oid_list(body, "new_oid reply")
            oids.reverse()
            self._oid_pool = oids
        oid = self._oid_pool.pop()
        self._transaction_new_oids.append(oid)
        return oid

    def _load_result(self, oid: bytes, status: bytes, body: bytes) -> bytes:
        if status == STATUS_OKAY:
            return body
        if status == STATUS_KEYERROR:
            raise DhruvaKeyError(oid)
        if status == STATUS_INVALID:
            raise ReadConflictError([oid])
        if status == STATUS_ERROR:
            raise unpack_error(body)
        raise ProtocolError(
            f"load of oid {int.from_bytes(oid, 'big')}: unknown status {status!r}"
        )

    def load(self, oid: bytes) -> bytes:
        status, body = self._request(CMD_LOAD + oid)
        return self._load_result(oid, status, body)

    def bulk_load(self, oids: Iterable[bytes]) -> Iterator[bytes]:
        batch: list[bytes] = []
        for oid in oids:
            batch.append(oid)
            if len(batch) == BULK_BATCH:
                yield from self._bulk_load_batch(batch)
                batch = []
        if batch:
            yield from self._bulk_load_batch(batch)

    def _bulk_load_batch(self, oids: list[bytes]) -> list[bytes]:
        self._send(CMD_BULK_LOAD + b"".join(oids))
        # Read every reply before raising, so the stream stays in step.
        replies = [self._receive() for _oid in oids]
        return [
            self._load_result(oid, reply[:1], reply[1:])
            for oid, reply in zip(oids, replies, strict=True)
        ]

    def begin(self) -> None:
        # Oids handed out since the last end() stay listed: a Connection takes
        # them for new objects before it calls begin().
        self._records = {}

    def store(self, oid: bytes, record: bytes) -> None:
        if len(oid) != 8:
            raise StorageError(f"an oid is 8 bytes, not {len(oid)}: {oid!r}")
        check_record_size(oid, record)
        self._records[oid] = record

    def end(self, handle_invalidations: InvalidationHandler | None = None) -> None:
        records, self._records = self._records, {}
        new_oids, self._transaction_new_oids = self._transaction_new_oids, []
        try:
            for payload in pack_records(records.items()):
                self._send(payload)
            self._commit(handle_invalidations)
        except BaseException:
            # Oids of a failed commit are still ours: use them next time.
            new_oids.reverse()
            self._oid_pool.extend(new_oids)
            raise

    def _commit(self, handle_invalidations: InvalidationHandler | None) -> None:
        while True:
            status, body = self._request(CMD_COMMIT)
            if status == STATUS_OKAY:
                return
            if status == STATUS_CONFLICT:
                raise WriteConflictError(split_oid_list(body, "conflict reply"))
            if status != STATUS_REFUSED:
                raise ProtocolError(f"commit: unknown status {status!r}")

            # Refused: other clients changed these oids. Ask the caller whether
            # they matter; if not, commit the records still held by the server.
            oids = split_oid_list(body, "refused commit reply")
            if handle_invalidations is None:
                self._pending_invalid.extend(oids)
                continue
            try:
                handle_invalidations(oids)
            except BaseException:
                self._send(CMD_ABANDON)
                raise

    def sync(self) -> list[bytes]:
        result, self._pending_invalid = self._pending_invalid, []
        more = True
        while more:
            status, body = self._request(CMD_SYNC)
            self._expect_okay(status, "sync")
            more = body[:1] == b"\1"
            result.extend(split_oid_list(body[1:], "sync reply"))
        return result

    def pack(self) -> None:
        """Pack the server's storage; return when the pack is done."""
        status, _body = self._request(CMD_PACK)
        self._expect_okay(status, "pack")

    def get_size(self) -> int | None:
        status, body = self._request(CMD_SIZE)
        self._expect_okay(status, "get_size")
        return int.from_bytes(body, "big") if body else None

    def gen_oid_record(
        self, start_oid: bytes | None = None, batch_size: int = 100
    ) -> Iterator[tuple[bytes, bytes]]:
        if start_oid is not None or not self.iterable:
            return gen_reachable_records(self, start_oid or ROOT_OID, batch_size)
        return self._scan(batch_size)

    def _scan(self, batch_size: int) -> Iterator[tuple[bytes, bytes]]:
        start = b"\1"
        more = True
        while more:
            status, body = self._request(CMD_SCAN + start + pack_uint32(batch_size))
            self._expect_okay(status, "scan")
            start = b"\0"
            more = body[:1] == b"\1"
            yield from unpack_records(body[1:])

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self._file.close()
            sock.close()

    def stop_server(self) -> None:
        """Ask the server to stop; this storage is closed afterwards."""
        try:
            status, _body = self._request(CMD_QUIT)
            self._expect_okay(status, "quit")
        finally:
            self.close()


def stop_server(
    address: Address = (DEFAULT_HOST, DEFAULT_PORT), timeout: float = CONNECT_TIMEOUT
) -> None:
    """Ask the server at ``address`` to stop; return once it has agreed.

    :raises StorageError: when no server listens at ``address``.
    """
    ClientStorage(address=address, timeout=timeout).stop_server()


def wait_for_server(
    address: Address | None = None,
    timeout: float = 30.0,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    maxtries: int | None = None,
    sleeptime: float | None = None,
) -> None:
    """Return once something accepts connections at ``address``.

    :param address: ``(host, port)`` or a unix socket path; by default
        ``(host, port)``.
    :param timeout: seconds to keep trying.
    :param maxtries: with ``sleeptime``, Durus's way to give the timeout
        (their product); accepted so that Durus code keeps working.
    :raises StorageError: when nothing does within ``timeout`` seconds.
    """
    address = resolve_address(host, port, address)
    if maxtries is not None or sleeptime is not None:
        timeout = (maxtries or 300) * (sleeptime if sleeptime is not None else 2)
    deadline = time.monotonic() + timeout
    while True:
        try:
            _connect(address, min(1.0, timeout)).close()
            return
        except StorageError as exc:
            if time.monotonic() >= deadline:
                raise StorageError(
                    f"no dhruva server at {format_address(address)} after "
                    f"{timeout} seconds; is it running? ({exc})"
                ) from None
        time.sleep(0.05)


__all__ = ["ClientStorage", "stop_server", "wait_for_server"]
