"""The pure parts of the wire protocol: frames, hellos, records, errors."""

from __future__ import annotations

import pickle

import pytest
from dhruva import net_protocol
from dhruva.error import DhruvaError, ProtocolError, ReadOnlyError, StorageError
from dhruva.net_protocol import (
    MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    format_address,
    frame,
    hello,
    pack_error,
    pack_records,
    parse_header,
    parse_hello,
    resolve_address,
    unpack_error,
    unpack_records,
)


def test_frame_header_is_the_payload_length():
    assert frame(b"Labc") == b"\0\0\0\4Labc"
    assert parse_header(b"\0\0\0\4") == 4


@pytest.mark.parametrize("size", [0, MAX_FRAME_SIZE + 1, 2**32 - 1])
def test_frame_sizes_outside_the_limit_are_protocol_errors(size):
    with pytest.raises(ProtocolError, match=f"announces {size} bytes"):
        parse_header(size.to_bytes(4, "big"))


def test_hello_round_trip_and_foreign_bytes():
    assert parse_hello(hello(flags=5)) == (PROTOCOL_VERSION, 5)
    assert parse_hello(hello(version=9)) == (9, 0)
    with pytest.raises(ProtocolError, match="not a dhruva"):
        parse_hello(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(ProtocolError, match="magic"):
        parse_hello(b"H" + b"X" * 16)


def test_records_split_over_frames_and_come_back_whole(monkeypatch):
    monkeypatch.setattr(net_protocol, "MAX_FRAME_SIZE", 100)
    records = [(i.to_bytes(8, "big"), bytes([i]) * (10 + i)) for i in range(20)]
    payloads = list(pack_records(records))
    assert len(payloads) > 1
    assert all(len(p) <= 100 for p in payloads)
    back = [pair for p in payloads for pair in unpack_records(p[1:])]
    assert back == records


def test_truncated_records_are_protocol_errors():
    (body,) = [p[1:] for p in pack_records([(b"\0" * 8, b"record")])]
    with pytest.raises(ProtocolError, match="record at byte 0"):
        unpack_records(body[:-1])
    with pytest.raises(ProtocolError, match="truncated"):
        unpack_records(body + b"\0\0")


class DamagedFileError(StorageError):
    """A backend's own error class."""


@pytest.mark.parametrize(
    ("raised", "received"),
    [
        (ReadOnlyError("the storage is read-only"), ReadOnlyError),
        (DamagedFileError("bad byte at offset 12"), StorageError),
        (DhruvaError("something"), DhruvaError),
        (ValueError("boom"), StorageError),
    ],
)
def test_server_errors_arrive_as_their_core_class(raised, received):
    error = unpack_error(pack_error(raised)[1:])
    assert type(error) is received
    assert str(raised) in str(error)
    assert pickle.loads(pickle.dumps(error)).args == error.args


def test_malformed_error_reply_is_a_protocol_error():
    assert isinstance(unpack_error(b"\x50abc"), ProtocolError)


def test_addresses():
    assert resolve_address("h", 1) == ("h", 1)
    assert resolve_address(address="/tmp/s") == "/tmp/s"
    assert format_address(("::1", 2972)) == "[::1]:2972"
    assert format_address(("127.0.0.1", 2972)) == "127.0.0.1:2972"
