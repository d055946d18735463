"""The wire protocol between ClientStorage and StorageServer.

Everything on the wire is a *frame*: a 4-byte big-endian unsigned length
followed by that many payload bytes. The first payload byte is a command code
(client to server) or a status code (server to client); the rest is the body.
``docs/protocol.md`` at the repository root describes the commands, the
handshake and how versions are told apart; this module holds the constants and
the small pure functions both sides share.

Limitations:

- A frame carries at most :data:`MAX_FRAME_SIZE` bytes, so one object record
  can be at most that large (less a few bytes of header); a bigger record
  raises :class:`~dhruva.error.StorageError` before anything is sent. A
  transaction may hold any number of records: they travel in several frames.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
from collections.abc import Iterable, Iterator

from dhruva import error
from dhruva.error import DhruvaError, ProtocolError, StorageError

#: The protocol version this code speaks. Bump it on any incompatible change.
#: Version 2 added authentication, the load with prefetch, the "everything
#: changed" sync answer and the resync status.
PROTOCOL_VERSION = 2

#: The first bytes of both hello payloads; they never change between versions.
MAGIC = b"DHRUVA\r\n"

#: The most payload bytes one frame may carry (64 MiB).
MAX_FRAME_SIZE = 64 * 1024 * 1024

#: The most payload bytes the first frame (the client's hello) may carry.
MAX_HELLO_SIZE = 256

#: The most oids one ``new_oids`` request may ask for.
MAX_NEW_OIDS = 1024

#: The most records one prefetching load sends besides the one asked for.
MAX_PREFETCH = 1024

#: The most oids one bulk load (``B``) may list.
MAX_BULK_OIDS = 16384

#: The most oids one frame can list.
MAX_OIDS_PER_FRAME = (MAX_FRAME_SIZE - 16) // 8

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 2972

#: A server address: ``(host, port)``, or the path of a unix socket
#: (``"@name"`` for a name in Linux's abstract namespace).
Address = tuple[str, int] | str

_header = struct.Struct(">I")
_uint32 = struct.Struct(">I")
_hello = struct.Struct(">8sII")

# --- command codes (client to server) -----------------------------------------

CMD_HELLO = b"H"
CMD_NEW_OIDS = b"N"
CMD_LOAD = b"L"
CMD_BULK_LOAD = b"B"
CMD_SYNC = b"S"
CMD_STAGE = b"T"
CMD_COMMIT = b"C"
CMD_ABANDON = b"A"
CMD_PACK = b"P"
CMD_SCAN = b"R"
CMD_SIZE = b"Z"
CMD_QUIT = b"Q"
CMD_PREFETCH_LOAD = b"G"
CMD_AUTH = b"U"

# --- status codes (server to client) ------------------------------------------

STATUS_OKAY = b"O"
STATUS_KEYERROR = b"K"
STATUS_INVALID = b"I"
STATUS_REFUSED = b"F"
STATUS_CONFLICT = b"W"
STATUS_ERROR = b"E"
STATUS_RESYNC = b"X"
STATUS_CHALLENGE = b"U"

# --- the more byte of a sync reply --------------------------------------------

SYNC_DONE = 0
SYNC_MORE = 1
#: The server stopped tracking this client's invalid oids: anything may have
#: changed since it last synced.
SYNC_EVERYTHING = 2

# --- capability flags in the server's hello -----------------------------------

FLAG_READONLY = 1
FLAG_PACKABLE = 2
FLAG_ITERABLE = 4
FLAG_AUTH = 8

# --- authentication -----------------------------------------------------------

#: Bytes of each side's random challenge.
NONCE_SIZE = 32

#: Bytes of an HMAC-SHA256 proof.
PROOF_SIZE = 32

#: The most bytes an authentication key may have (and the least).
MAX_AUTH_KEY_SIZE = 4096
MIN_AUTH_KEY_SIZE = 16


class AuthenticationError(StorageError):
    """The client and the server do not share the same secret key."""


class ConnectionLostError(StorageError):
    """The connection to the server broke; the operation did not complete.

    The client reconnects on its next operation. A transaction in flight is
    lost: call ``connection.abort()`` and run it again.
    """

    retryable = True


class CommitOutcomeUnknownError(ConnectionLostError):
    """The connection broke after a commit request was sent and before its
    answer, and the records it wrote are not all on the server as sent.

    The commit may or may not have happened (another client may have changed
    those objects since): it is not retryable, since running the transaction
    again could apply it twice. Check the objects named by :attr:`oids`.
    """

    retryable = False

    def __init__(self, message: str, oids: list[bytes]) -> None:
        super().__init__(message)
        #: The oids the commit wrote.
        self.oids = oids


def auth_proof(key: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    """Return the HMAC-SHA256 proof that the sender of ``role`` knows ``key``.

    :param role: ``b"client"`` or ``b"server"``; the proofs differ, so one side's
        answer is never valid for the other.
    :param first: the nonce of the side that must prove itself last.
    :param second: the other nonce.
    """
    message = b"dhruva-net auth v%d %s " % (PROTOCOL_VERSION, role) + first + second
    return hmac.new(key, message, hashlib.sha256).digest()


def check_auth_key(key: bytes, where: str) -> bytes:
    """Return ``key`` stripped of surrounding white space, once it is usable.

    :raises AuthenticationError: naming ``where`` for a key too short or long.
    """
    key = key.strip()
    if not MIN_AUTH_KEY_SIZE <= len(key) <= MAX_AUTH_KEY_SIZE:
        raise AuthenticationError(
            f"the authentication key from {where} has {len(key)} bytes; use "
            f"{MIN_AUTH_KEY_SIZE} to {MAX_AUTH_KEY_SIZE} random bytes, for "
            "example `python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return key


def read_auth_file(path: str) -> bytes:
    """Return the key kept in the file at ``path``.

    :raises AuthenticationError: when the file cannot be read or the key is
        unusable.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_AUTH_KEY_SIZE + 1)
    except OSError as exc:
        raise AuthenticationError(
            f"cannot read the authentication key file {path}: {exc.strerror or exc}"
        ) from exc
    return check_auth_key(data, path)


def frame(payload: bytes) -> bytes:
    """Return ``payload`` with its length header in front.

    :raises StorageError: when the payload is longer than :data:`MAX_FRAME_SIZE`.
    """
    if len(payload) > MAX_FRAME_SIZE:
        raise StorageError(
            f"a protocol frame of {len(payload)} bytes is over the limit of "
            f"{MAX_FRAME_SIZE} bytes; store smaller objects (split big bytes "
            "values over several persistent objects)"
        )
    return _header.pack(len(payload)) + payload


def parse_header(header: bytes, limit: int = MAX_FRAME_SIZE) -> int:
    """Return the payload length a 4-byte frame header announces.

    :raises ProtocolError: for an empty frame or one longer than ``limit``.
    """
    (size,) = _header.unpack(header)
    if size == 0 or size > limit:
        raise ProtocolError(
            f"frame header announces {size} bytes (allowed: 1 to {limit}); "
            "the peer is not a dhruva-net peer of this protocol version"
        )
    return size


def hello(flags: int = 0, version: int = PROTOCOL_VERSION) -> bytes:
    """Return a hello payload: command code, magic, version and flags."""
    return CMD_HELLO + _hello.pack(MAGIC, version, flags)


def parse_hello(payload: bytes) -> tuple[int, int]:
    """Return ``(version, flags)`` from a hello payload.

    :raises ProtocolError: when the payload is not a dhruva hello at all.
    """
    if len(payload) != 1 + _hello.size or payload[:1] != CMD_HELLO:
        raise ProtocolError(
            f"expected a dhruva-net hello, got {payload[:24]!r}; the peer is "
            "not a dhruva storage server or client"
        )
    magic, version, flags = _hello.unpack_from(payload, 1)
    if magic != MAGIC:
        raise ProtocolError(
            f"bad hello magic {magic!r}; the peer is not a dhruva storage "
            "server or client"
        )
    return version, flags


def version_mismatch(client: int, server: int) -> ProtocolError:
    """Return the error both sides raise when their versions differ."""
    return ProtocolError(
        f"protocol version mismatch: the client speaks version {client}, the "
        f"server version {server}; install the same dhruva-net release on both"
    )


def pack_uint32(n: int) -> bytes:
    return _uint32.pack(n)


def unpack_uint32(body: bytes, what: str) -> int:
    """Return the uint32 that is all of ``body``.

    :raises ProtocolError: naming ``what`` when ``body`` is not 4 bytes.
    """
    if len(body) != 4:
        raise ProtocolError(f"{what}: expected a 4-byte count, got {len(body)} bytes")
    return int(_uint32.unpack(body)[0])


def split_oid_list(body: bytes, what: str) -> list[bytes]:
    """Split joined 8-byte oids.

    :raises ProtocolError: naming ``what`` when ``body`` is not whole oids.
    """
    if len(body) % 8:
        raise ProtocolError(f"{what}: {len(body)} bytes is not a whole number of oids")
    return [body[i : i + 8] for i in range(0, len(body), 8)]


#: The most bytes one record may have to fit in a frame with its headers.
MAX_RECORD_SIZE = MAX_FRAME_SIZE - 1 - 1 - 12


def check_record_size(oid: bytes, record: bytes) -> None:
    """Refuse a record that cannot travel in one frame.

    :raises StorageError: naming the oid and the limit.
    """
    if len(record) > MAX_RECORD_SIZE:
        raise StorageError(
            f"the record for oid {int.from_bytes(oid, 'big')} is {len(record)} "
            f"bytes, over the network limit of {MAX_RECORD_SIZE}; split the "
            "object's data over several persistent objects"
        )


def pack_records(records: Iterable[tuple[bytes, bytes]]) -> Iterator[bytes]:
    """Yield stage payloads (``T`` + records) that each fit in one frame.

    Each record is sent as a 4-byte length, the 8-byte oid, then the record.

    :raises StorageError: for a record too big for any frame.
    """
    room = MAX_FRAME_SIZE - 1
    parts: list[bytes] = [CMD_STAGE]
    used = 0
    for oid, record in records:
        check_record_size(oid, record)
        size = 12 + len(record)
        if used + size > room:
            yield b"".join(parts)
            parts, used = [CMD_STAGE], 0
        parts += [_uint32.pack(8 + len(record)), oid, record]
        used += size
    if used:
        yield b"".join(parts)


def unpack_records(body: bytes) -> list[tuple[bytes, bytes]]:
    """Return the ``(oid, record)`` pairs of a stage body.

    :raises ProtocolError: when a length runs past the end of the body.
    """
    result = []
    i = 0
    while i < len(body):
        if i + 12 > len(body):
            raise ProtocolError(f"stage frame: truncated record header at byte {i}")
        (size,) = _uint32.unpack_from(body, i)
        end = i + 4 + size
        if size < 8 or end > len(body):
            raise ProtocolError(
                f"stage frame: record at byte {i} claims {size} bytes, "
                f"but the frame has {len(body) - i - 4} left"
            )
        result.append((body[i + 4 : i + 12], body[i + 12 : end]))
        i = end
    return result


def pack_records_reply(records: Iterable[tuple[bytes, bytes]], more: bool) -> bytes:
    """Return a scan reply: status, more flag, then length-prefixed records."""
    parts = [STATUS_OKAY, b"\1" if more else b"\0"]
    for oid, record in records:
        parts += [_uint32.pack(8 + len(record)), oid, record]
    return b"".join(parts)


# --- errors -------------------------------------------------------------------

#: The error classes a server may name in an error reply.
_ERROR_CLASSES: dict[str, type[DhruvaError]] = {
    cls.__name__: cls
    for cls in (
        error.DhruvaError,
        error.StorageError,
        error.ReadOnlyError,
        error.ProtocolError,
        error.InvalidObjectReference,
        AuthenticationError,
        ConnectionLostError,
    )
}


def pack_error(exc: BaseException) -> bytes:
    """Return an error reply for ``exc``: the nearest known class and a message.

    Backend errors travel as the core family they subclass; errors outside the
    dhruva tree travel as StorageError, naming their own class in the message.
    """
    name = "StorageError"
    message = str(exc)
    for cls in type(exc).__mro__:
        if _ERROR_CLASSES.get(cls.__name__) is cls:
            name = cls.__name__
            break
    else:
        message = f"storage server failed: {type(exc).__name__}: {exc}"
    encoded = name.encode()
    return STATUS_ERROR + bytes([len(encoded)]) + encoded + message.encode()


def unpack_error(body: bytes) -> DhruvaError:
    """Return the exception an error reply's body describes."""
    if not body or len(body) < 1 + body[0]:
        return ProtocolError(f"malformed error reply from the server: {body[:40]!r}")
    name = body[1 : 1 + body[0]].decode("ascii", "replace")
    message = body[1 + body[0] :].decode("utf-8", "replace")
    return _ERROR_CLASSES.get(name, StorageError)(message)


# --- addresses ----------------------------------------------------------------


def format_address(address: Address) -> str:
    """Return ``address`` as people write it: ``host:port`` or a socket path."""
    if isinstance(address, str):
        return address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def socket_address(address: Address) -> tuple[int, str | tuple[str, int]]:
    """Return the address family and the address ``socket.connect`` wants."""
    if isinstance(address, str):
        path = "\0" + address[1:] if address.startswith("@") else address
        return socket.AF_UNIX, path
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


def resolve_address(
    host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, address: Address | None = None
) -> Address:
    """Return ``address`` when given, else ``(host, port)``."""
    if address is None:
        return (host, port)
    if isinstance(address, str):
        return address
    host, port = address
    return (str(host), int(port))
