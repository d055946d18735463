"""Small byte helpers shared by the storages, under the names Durus used."""

from __future__ import annotations

import struct
from typing import BinaryIO

_int8 = struct.Struct(">Q")
_int4 = struct.Struct(">I")


class ShortRead(EOFError):
    """A file or socket ended before the bytes a reader needed."""


def int8_to_str(n: int) -> bytes:
    """Return ``n`` as 8 big-endian bytes."""
    return _int8.pack(n)


def str_to_int8(s: bytes) -> int:
    """Return the integer held in 8 big-endian bytes."""
    return int(_int8.unpack(s)[0])


def int4_to_str(n: int) -> bytes:
    """Return ``n`` as 4 big-endian bytes."""
    return _int4.pack(n)


def str_to_int4(s: bytes) -> int:
    """Return the integer held in 4 big-endian bytes."""
    return int(_int4.unpack(s)[0])


def read(f: BinaryIO, n: int) -> bytes:
    """Read exactly ``n`` bytes from ``f`` or raise :class:`ShortRead`."""
    data = f.read(n)
    if len(data) != n:
        raise ShortRead(f"wanted {n} bytes, got {len(data)}")
    return data


def read_int8(f: BinaryIO) -> int:
    return str_to_int8(read(f, 8))


def read_int4(f: BinaryIO) -> int:
    return str_to_int4(read(f, 4))


def write(f: BinaryIO, data: bytes) -> None:
    f.write(data)


def write_int8(f: BinaryIO, n: int) -> None:
    f.write(int8_to_str(n))


def write_int4(f: BinaryIO, n: int) -> None:
    f.write(int4_to_str(n))


def read_int4_str(f: BinaryIO) -> bytes:
    """Read a 4-byte length and then that many bytes."""
    return read(f, read_int4(f))


def write_int4_str(f: BinaryIO, data: bytes) -> None:
    write_int4(f, len(data))
    f.write(data)


def as_bytes(s: str | bytes) -> bytes:
    return s.encode("latin-1") if isinstance(s, str) else s


def join_bytes(parts: list[bytes]) -> bytes:
    return b"".join(parts)
