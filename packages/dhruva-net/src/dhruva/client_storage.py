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

import hmac
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from dhruva.error import (
    DhruvaKeyError,
    ProtocolError,
    ReadConflictError,
    StorageError,
    WriteConflictError,
)
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
    CMD_SYNC,
    DEFAULT_HOST,
    DEFAULT_PORT,
    FLAG_AUTH,
    FLAG_ITERABLE,
    FLAG_PACKABLE,
    FLAG_READONLY,
    MAX_FRAME_SIZE,
    MAX_PREFETCH,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    STATUS_CHALLENGE,
    STATUS_CONFLICT,
    STATUS_ERROR,
    STATUS_INVALID,
    STATUS_KEYERROR,
    STATUS_OKAY,
    STATUS_REFUSED,
    STATUS_RESYNC,
    SYNC_EVERYTHING,
    SYNC_MORE,
    Address,
    AuthenticationError,
    CommitOutcomeUnknownError,
    ConnectionLostError,
    auth_proof,
    check_auth_key,
    check_record_size,
    format_address,
    frame,
    hello,
    pack_records,
    pack_uint32,
    parse_header,
    parse_hello,
    read_auth_file,
    resolve_address,
    socket_address,
    split_oid_list,
    unpack_error,
    unpack_records,
    version_mismatch,
)
from dhruva.record import ROOT_OID, unpack_record
from dhruva.server_sockets import client_tls_context
from dhruva.storage import InvalidationHandler, Storage, gen_reachable_records

log = logging.getLogger(__name__)

#: Seconds to wait for the server to accept and answer the hello.
CONNECT_TIMEOUT = 10.0

#: Oids fetched from the server per round trip.
OID_BATCH = 128

#: Oids per bulk-load request.
BULK_BATCH = 1024

#: The most prefetched records a client keeps before it drops them all.
PREFETCH_CACHE = 100_000

#: The environment variable that may hold the authentication key.
AUTH_KEY_ENV = "DHRUVA_AUTH_KEY"

#: The environment variables ClientStorage reads for options not given:
#: a file holding the key, and the TLS CA, client certificate and key.
AUTH_FILE_ENV = "DHRUVA_AUTH_FILE"
TLS_CA_ENV = "DHRUVA_TLS_CA"
TLS_CERT_ENV = "DHRUVA_TLS_CERT"
TLS_KEY_ENV = "DHRUVA_TLS_KEY"


class _EverythingInvalid(list[bytes]):
    """A :meth:`ClientStorage.sync` answer meaning "any object may have changed".

    It is an empty list to code that does not know it; a Connection sees
    ``everything`` and ghosts its whole cache.
    """

    everything = True


def _connect(
    address: Address,
    timeout: float | None,
    tls: ssl.SSLContext | None = None,
    tls_hostname: str | None = None,
) -> socket.socket:
    """Return a socket connected to ``address`` (TLS-wrapped with ``tls``).

    :raises StorageError: naming the address when nothing listens there, or
        the TLS handshake fails.
    """
    family, target = socket_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError as exc:
        sock.close()
        raise ConnectionLostError(
            f"cannot connect to a dhruva server at {format_address(address)}: "
            f"{exc.strerror or exc}; start one with `dhruva server` "
            "(see --help for --file, --port and --address)"
        ) from exc
    if family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is None:
        return sock
    hostname = tls_hostname
    if hostname is None and not isinstance(address, str):
        hostname = address[0]
    try:
        return tls.wrap_socket(sock, server_hostname=hostname)
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        raise StorageError(
            f"TLS handshake with the dhruva server at {format_address(address)} "
            f"failed: {exc}; check --tls-ca (the CA that signed the server's "
            "certificate) and that the server was started with --tls-cert"
        ) from exc


class ClientStorage(Storage):
    """The storage of a StorageServer, reached over TCP or a unix socket.

    After the connection breaks (the server restarted, say), the operation
    under way raises :class:`~dhruva.net_protocol.ConnectionLostError`
    (retryable) and the next one connects again. What this client knew may be
    out of date then: loads are refused with ReadConflictError and commits with
    ConnectionLostError until :meth:`sync`, which answers "everything may have
    changed" (a Connection ghosts its whole cache). A connection lost after
    a commit was sent and before its answer is settled by loading what the
    commit wrote: the commit succeeds if the server holds it all as sent,
    otherwise :class:`~dhruva.net_protocol.CommitOutcomeUnknownError` (not
    retryable) names its oids.

    :param host: the server's host, when ``address`` is not given.
    :param port: the server's port, when ``address`` is not given.
    :param address: ``(host, port)`` or a unix socket path.
    :param timeout: seconds to wait for any one reply; None waits for ever.
    :param auth_key: the server's shared secret; by default the
        ``DHRUVA_AUTH_KEY`` environment variable, or the contents of the file
        ``DHRUVA_AUTH_FILE`` names, if set.
    :param auth_file: a file holding the shared secret (``--auth-file``), read
        when ``auth_key`` is not given; it comes before the variables.
    :param tls_ca: PEM file of the CA that signed the server's certificate;
        giving it (or ``tls=True``) turns TLS on. By default
        ``DHRUVA_TLS_CA``, if set.
    :param tls_cert: a client certificate, for servers that require one;
        ``tls_key`` its key (by default ``DHRUVA_TLS_CERT``, ``DHRUVA_TLS_KEY``).
    :param tls_hostname: the name to check the server's certificate against
        (by default the host connected to).
    :param prefetch: with each load, also fetch up to this many records the
        loaded one refers to, saving their round trips; 0 turns it off.
    :raises StorageError: when no server listens at the address.
    :raises ProtocolError: when the server speaks another protocol version.
    :raises AuthenticationError: when the keys differ or one side has none.
    """

    invalidating = True

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        address: Address | None = None,
        *,
        timeout: float | None = None,
        auth_key: bytes | str | None = None,
        auth_file: str | None = None,
        tls: bool = False,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_hostname: str | None = None,
        prefetch: int = 0,
    ) -> None:
        self.address: Address = resolve_address(host, port, address)
        self.timeout = timeout
        env = os.environ
        if auth_key is None and auth_file is not None:
            auth_key = read_auth_file(auth_file)
        elif auth_key is None and env.get(AUTH_KEY_ENV):
            auth_key = env[AUTH_KEY_ENV]
        elif auth_key is None and env.get(AUTH_FILE_ENV):
            auth_key = read_auth_file(env[AUTH_FILE_ENV])
        tls_ca = tls_ca or env.get(TLS_CA_ENV) or None
        tls_cert = tls_cert or env.get(TLS_CERT_ENV) or None
        tls_key = tls_key or env.get(TLS_KEY_ENV) or None
        if isinstance(auth_key, str):
            auth_key = auth_key.encode()
        self._auth_key = (
            None if auth_key is None else check_auth_key(auth_key, "auth_key")
        )
        self._tls = (
            client_tls_context(tls_ca, tls_cert, tls_key) if tls or tls_ca else None
        )
        self._tls_hostname = tls_hostname
        self._tls_has_cert = tls_cert is not None
        self.prefetch = max(0, min(int(prefetch), MAX_PREFETCH))
        #: Requests sent to the server (each waits for its replies).
        self.round_trips = 0
        self._sock: socket.socket | None = None
        self._file: BinaryIO | None = None
        self._closed = False
        self._oid_pool: list[bytes] = []
        self._records: dict[bytes, bytes] = {}
        self._transaction_new_oids: list[bytes] = []
        self._prefetched: dict[bytes, bytes] = {}
        #: Invalid oids received during a commit that had no callback for them.
        self._pending_invalid: list[bytes] = []
        #: True after a reconnect or a resync, until sync() says so.
        self._everything_invalid = False
        #: The oid whose last load was refused as invalid: sync() loads it
        #: again in the same round trip, so a busy writer cannot starve us.
        self._reload: bytes | None = None
        self._open()

    def __str__(self) -> str:
        return f"ClientStorage({format_address(self.address)})"

    # --- the wire ------------------------------------------------------------

    def _open(self) -> None:
        self._sock = _connect(
            self.address, CONNECT_TIMEOUT, self._tls, self._tls_hostname
        )
        self._file = self._sock.makefile("rb")
        try:
            self._handshake()
        except BaseException:
            self._drop_socket()
            raise
        self._sock.settimeout(self.timeout)

    def _handshake(self) -> None:
        self._send(hello(version=PROTOCOL_VERSION))
        try:
            reply = self._receive()
        except StorageError as exc:
            cause = exc.__cause__
            if self._tls is not None and isinstance(cause, ssl.SSLError):
                raise tls_refused(self.address, cause) from None
            if self._tls is not None and not self._tls_has_cert:
                # TLS 1.3: the server checks the client's certificate after
                # the handshake, then hangs up before answering the hello.
                raise ProtocolError(
                    f"the server at {format_address(self.address)} closed the "
                    "TLS connection before answering the dhruva-net hello: it "
                    "requires a client certificate, most likely (give "
                    "--tls-cert and --tls-key, or tls_cert= and tls_key=, with "
                    "a certificate signed by the CA the server trusts), or it "
                    f"does not speak protocol version {PROTOCOL_VERSION}"
                ) from None
            if self._tls is None:
                # A TLS server takes the hello for a broken TLS handshake and
                # hangs up (or answers with a TLS alert).
                raise ProtocolError(
                    f"the server at {format_address(self.address)} did not "
                    "answer the dhruva-net hello: it may require TLS (give "
                    "--tls-ca, or tls_ca=, with the CA that signed its "
                    "certificate), or be another program or a dhruva server "
                    f"that does not speak protocol version {PROTOCOL_VERSION}"
                ) from None
            raise ProtocolError(
                f"the server at {format_address(self.address)} did not answer "
                f"the dhruva-net hello ({exc}); it may be another program, or a "
                f"dhruva server that does not speak protocol version "
                f"{PROTOCOL_VERSION}"
            ) from None
        version, flags = parse_hello(reply)
        if version != PROTOCOL_VERSION:
            raise version_mismatch(PROTOCOL_VERSION, version)
        if flags & FLAG_AUTH:
            self._authenticate()
        elif self._auth_key is not None:
            raise AuthenticationError(
                f"the server at {format_address(self.address)} does not ask for "
                "authentication, but this client has a key: it may not be the "
                "server you mean. Start the server with the same --auth-file, "
                "or connect without a key"
            )
        self.readonly = bool(flags & FLAG_READONLY)
        self.packable = bool(flags & FLAG_PACKABLE)
        self.iterable = bool(flags & FLAG_ITERABLE)
        # Quiet for a tool that connects once (dhruva server --stop); a
        # reconnect is worth an INFO line (see _socket).
        log.debug("connected to the dhruva server at %s", format_address(self.address))

    def _authenticate(self) -> None:
        where = format_address(self.address)
        if self._auth_key is None:
            raise AuthenticationError(
                f"the dhruva server at {where} requires authentication; give "
                f"auth_key=, --auth-file or the {AUTH_KEY_ENV} environment variable"
            )
        challenge = self._receive()
        if challenge[:1] != STATUS_CHALLENGE or len(challenge) != 1 + NONCE_SIZE:
            raise ProtocolError(f"expected an authentication challenge from {where}")
        server_nonce = challenge[1:]
        nonce = secrets.token_bytes(NONCE_SIZE)
        proof = auth_proof(self._auth_key, b"client", server_nonce, nonce)
        self._send(CMD_AUTH + nonce + proof)
        try:
            status, body = self._reply()
        except AuthenticationError as exc:
            raise AuthenticationError(
                f"the dhruva server at {where} refused this client's key ({exc}); "
                "use the server's --auth-file"
            ) from None
        expected = auth_proof(self._auth_key, b"server", nonce, server_nonce)
        if status != STATUS_OKAY or not hmac.compare_digest(body, expected):
            raise AuthenticationError(
                f"the dhruva server at {where} could not prove it knows the key; "
                "it may be an impostor"
            )

    def _socket(self) -> socket.socket:
        """Return the socket, connecting again after a lost connection."""
        if self._sock is None:
            if self._closed:
                raise StorageError(f"{self} is closed; open a new ClientStorage")
            self._reconnect()
        assert self._sock is not None
        return self._sock

    def _reconnect(self) -> None:
        log.info("connecting again to the dhruva server at %s", self.address)
        self._open()
        # Oids handed out before are released by the server; what we knew may
        # be out of date.
        self._oid_pool = []
        self._prefetched = {}
        self._pending_invalid = []
        self._everything_invalid = True

    def _send(self, payload: bytes) -> None:
        data = frame(payload)
        sock = self._socket()
        try:
            sock.sendall(data)
        except OSError as exc:
            raise self._lost(exc) from exc
        except BaseException:
            self._drop_socket()  # a frame cut short: the stream is out of step
            raise

    def _receive(self) -> bytes:
        file = self._file
        if self._sock is None or file is None:
            raise self._lost(None)
        try:
            header = file.read(4)
            if len(header) == 4:
                size = parse_header(header, MAX_FRAME_SIZE)
                payload = file.read(size)
                if len(payload) == size:
                    return payload
        except TimeoutError:
            self._drop_socket()
            raise ConnectionLostError(
                f"the dhruva server at {format_address(self.address)} did not "
                f"answer within {self.timeout} seconds; the request may or may "
                "not have been carried out"
            ) from None
        except OSError as exc:
            raise self._lost(exc) from exc
        except BaseException:
            # A bad header or an interrupt mid-frame: nothing after it on this
            # stream can be trusted.
            self._drop_socket()
            raise
        raise self._lost(None)

    def _lost(self, exc: OSError | None) -> ConnectionLostError:
        self._drop_socket()
        why = f": {exc}" if exc else ""
        return ConnectionLostError(
            f"lost the connection to the dhruva server at "
            f"{format_address(self.address)}{why}; the server may have "
            "restarted. The next operation connects again; call "
            "connection.abort() and run the transaction again"
        )

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        file, self._file = self._file, None
        if file is not None:
            file.close()
        if sock is not None:
            sock.close()

    def _request(self, payload: bytes) -> tuple[bytes, bytes]:
        """Send one command; return the reply's status and body."""
        self._send(payload)
        self.round_trips += 1
        return self._reply()

    def _reply(self) -> tuple[bytes, bytes]:
        reply = self._receive()
        status, body = reply[:1], reply[1:]
        if status == STATUS_ERROR:
            raise unpack_error(body)
        return status, body

    def _retrying(self, payload: bytes) -> tuple[bytes, bytes]:
        """Send a request that is safe to repeat, once more on a new
        connection when the old one turns out to be gone."""
        connected = self._sock is not None
        try:
            return self._request(payload)
        except ConnectionLostError:
            if not connected or self._closed:
                raise
        return self._request(payload)

    def _expect_okay(self, status: bytes, what: str) -> None:
        if status != STATUS_OKAY:
            raise ProtocolError(f"{what}: the server answered with status {status!r}")

    # --- the Storage interface --------------------------------------------------

    def new_oid(self) -> bytes:
        if not self._oid_pool:
            status, body = self._retrying(CMD_NEW_OIDS + pack_uint32(OID_BATCH))
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
            self._reload = oid
            raise ReadConflictError([oid])
        if status == STATUS_ERROR:
            raise unpack_error(body)
        raise ProtocolError(
            f"load of oid {int.from_bytes(oid, 'big')}: unknown status {status!r}"
        )

    def _check_current(self, oids: list[bytes]) -> None:
        """Refuse loads until a sync after a reconnect or resync."""
        if self._everything_invalid:
            raise ReadConflictError(oids[:1])

    def load(self, oid: bytes) -> bytes:
        self._socket()
        self._check_current([oid])
        record = self._prefetched.pop(oid, None)
        if record is not None:
            return record
        if not self.prefetch:
            status, body = self._retrying(CMD_LOAD + oid)
            self._check_current([oid])
            return self._load_result(oid, status, body)

        status, body = self._retrying(
            CMD_PREFETCH_LOAD + oid + pack_uint32(self.prefetch)
        )
        more_status, more = self._reply()
        self._expect_okay(more_status, "prefetch")
        self._check_current([oid])
        if len(self._prefetched) > PREFETCH_CACHE:
            self._prefetched.clear()
        self._prefetched.update(unpack_records(more[1:]))
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
        self._socket()
        self._check_current(oids)
        self._send(CMD_BULK_LOAD + b"".join(oids))
        self.round_trips += 1
        # Read every reply before raising, so the stream stays in step.
        replies = []
        for _oid in oids:
            reply = self._receive()
            if reply[:1] == STATUS_ERROR:
                error = unpack_error(reply[1:])
                if isinstance(error, ProtocolError):
                    # The request as a whole was refused: no more replies
                    # come, and the server closes the connection.
                    self._drop_socket()
                    raise error
            replies.append(reply)
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
        # The server refuses it too; failing here names the caller's mistake.
        try:
            record_oid = unpack_record(record)[0]
        except StorageError as exc:
            raise StorageError(
                f"the record stored for oid {int.from_bytes(oid, 'big')} is not "
                f"an object record: {exc}; make it with pack_record()"
            ) from None
        if record_oid != oid:
            raise StorageError(
                f"the record stored for oid {int.from_bytes(oid, 'big')} starts "
                f"with oid {int.from_bytes(record_oid, 'big')}; store "
                "pack_record(oid, data, refs) under its own oid"
            )
        self._records[oid] = record

    def end(self, handle_invalidations: InvalidationHandler | None = None) -> None:
        records, self._records = self._records, {}
        new_oids, self._transaction_new_oids = self._transaction_new_oids, []
        connected = self._sock is not None
        if not connected or self._everything_invalid:
            self._socket()
            raise ConnectionLostError(
                f"the connection to the dhruva server at "
                f"{format_address(self.address)} was lost and made again since "
                "this transaction began; nothing was committed. Call "
                "connection.abort() and run the transaction again"
            )
        try:
            for payload in pack_records(records.items()):
                self._send(payload)
            self._commit(handle_invalidations, records)
        except CommitOutcomeUnknownError:
            raise
        except BaseException:
            # Oids of a failed commit are still ours: use them next time, as
            # long as the connection that was given them is still there.
            if self._sock is not None:
                new_oids.reverse()
                self._oid_pool.extend(new_oids)
            raise
        for oid in records:
            self._prefetched.pop(oid, None)

    def _commit(
        self,
        handle_invalidations: InvalidationHandler | None,
        records: dict[bytes, bytes],
    ) -> None:
        while True:
            self._send(CMD_COMMIT)  # lost here: not sent, so retryable
            self.round_trips += 1
            try:
                status, body = self._reply()
            except ConnectionLostError as exc:
                # Sent, not answered: the server may have written it.
                self._settle_in_doubt(records, exc)
                return
            if status == STATUS_OKAY:
                return
            if status == STATUS_CONFLICT:
                raise WriteConflictError(split_oid_list(body, "conflict reply"))
            if status == STATUS_RESYNC:
                self._everything_invalid = True
                raise WriteConflictError()
            if status != STATUS_REFUSED:
                raise ProtocolError(f"commit: unknown status {status!r}")

            # Refused: other clients changed these oids. Ask the caller whether
            # they matter; if not, commit the records still held by the server.
            oids = split_oid_list(body, "refused commit reply")
            for oid in oids:
                self._prefetched.pop(oid, None)
            if handle_invalidations is None:
                self._pending_invalid.extend(oids)
                continue
            try:
                handle_invalidations(oids)
            except BaseException:
                self._send(CMD_ABANDON)
                raise

    def _settle_in_doubt(
        self, records: dict[bytes, bytes], lost: ConnectionLostError
    ) -> None:
        """Find out whether a commit whose answer was lost happened: it did
        when every record it wrote is on the server exactly as sent.

        :raises CommitOutcomeUnknownError: otherwise (or when the server
            cannot be reached to ask).
        """
        oids = sorted(records)
        try:
            self._socket()  # connects again
            found: list[bytes] = []
            for start in range(0, len(oids), BULK_BATCH):
                batch = oids[start : start + BULK_BATCH]
                self._send(CMD_BULK_LOAD + b"".join(batch))
                self.round_trips += 1
                found.extend(self._receive() for _oid in batch)
        except (StorageError, OSError) as exc:
            self._drop_socket()
            why = f"the server could not be asked ({exc})"
        else:
            if all(
                reply == STATUS_OKAY + records[oid]
                for oid, reply in zip(oids, found, strict=True)
            ):
                log.info(
                    "the answer to a commit of %d records was lost; the "
                    "server holds them all as sent, so it was committed",
                    len(oids),
                )
                return
            why = "the server does not hold all of its records as sent"
        numbers = ", ".join(str(int.from_bytes(oid, "big")) for oid in oids[:10])
        more = f" and {len(oids) - 10} more" if len(oids) > 10 else ""
        raise CommitOutcomeUnknownError(
            f"the outcome of a commit to the dhruva server at "
            f"{format_address(self.address)} is unknown: the connection was "
            f"lost after the commit was sent and before its answer ({lost}), "
            f"and {why}. It wrote oids {numbers}{more}; it may or may not "
            "have been applied (another client may have changed them since). "
            "Do not simply run the transaction again: call connection.abort(), "
            "then check those objects",
            oids,
        ) from lost

    def sync(self) -> list[bytes]:
        self._socket()
        result, self._pending_invalid = self._pending_invalid, []
        reload, self._reload = self._reload, None
        more = True
        everything = False
        reloaded: tuple[bytes, bytes] | None = None
        while more:
            if reload is not None and not self._everything_invalid:
                # The load that was refused goes right behind the sync: the
                # server answers both without waiting for us in between.
                self._send(CMD_SYNC)
                status, body = self._request(CMD_LOAD + reload)
                load_status, load_body = self._reply()
                if load_status == STATUS_OKAY:
                    reloaded = (reload, load_body)
                reload = None
            else:
                status, body = self._retrying(CMD_SYNC)
            self._expect_okay(status, "sync")
            more = body[:1] == bytes([SYNC_MORE])
            everything = everything or body[:1] == bytes([SYNC_EVERYTHING])
            result.extend(split_oid_list(body[1:], "sync reply"))
        if everything or self._everything_invalid:
            self._everything_invalid = False
            self._prefetched = {}
            return _EverythingInvalid()
        for oid in result:
            self._prefetched.pop(oid, None)
        if reloaded is not None:
            # Read after the sync: newer than every change the sync reports.
            self._prefetched[reloaded[0]] = reloaded[1]
        return result

    def pack(self) -> None:
        """Pack the server's storage; return when the pack is done."""
        status, _body = self._retrying(CMD_PACK)
        self._expect_okay(status, "pack")

    def get_size(self) -> int | None:
        status, body = self._retrying(CMD_SIZE)
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
        self._closed = True
        self._drop_socket()

    def stop_server(self) -> None:
        """Ask the server to stop; this storage is closed afterwards."""
        try:
            status, _body = self._request(CMD_QUIT)
            self._expect_okay(status, "quit")
        finally:
            self.close()


def stop_server(
    address: Address = (DEFAULT_HOST, DEFAULT_PORT),
    timeout: float = CONNECT_TIMEOUT,
    **options: Any,
) -> None:
    """Ask the server at ``address`` to stop; return once it has agreed.

    :param options: ``auth_key``, ``tls_ca`` and the other security options of
        :class:`ClientStorage`.
    :raises StorageError: when no server listens at ``address``.
    """
    ClientStorage(address=address, timeout=timeout, **options).stop_server()


def tls_refused(address: Address, exc: ssl.SSLError) -> ProtocolError:
    """The error for a TLS handshake the server ended with an alert."""
    reason = str(exc.reason or exc)
    if "CERTIFICATE_REQUIRED" in reason:
        hint = (
            "the server requires a client certificate: give --tls-cert and "
            "--tls-key (tls_cert=, tls_key=) with a certificate signed by the "
            "CA the server trusts (its --tls-ca)"
        )
    elif "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
        hint = (
            "the server did not accept this client's certificate: give one "
            "signed by the CA the server trusts (its --tls-ca)"
        )
    else:
        hint = "check the TLS options of both sides"
    return ProtocolError(
        f"the server at {format_address(address)} refused the TLS handshake "
        f"({reason}): {hint}"
    )


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


__all__ = [
    "AuthenticationError",
    "ClientStorage",
    "CommitOutcomeUnknownError",
    "ConnectionLostError",
    "stop_server",
    "wait_for_server",
]
