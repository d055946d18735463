"""Tests of the SHELF-1 layout helpers."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from dhruva.shelf import (
    OffsetMap,
    encode_empty_shelf,
    encode_map,
    encode_transaction,
    scan_transactions,
    width_for,
)

FIXTURE = (
    Path(__file__).resolve().parents[3]
    / ".."
    / "shared"
    / "fixtures"
    / "durus-4"
    / "legacy-shelf.durus"
)


def free_slots_as_durus_walks_them(map_bytes: bytes, start: int) -> list[int]:
    """Follow the chain of free slots from the last one, as Durus allocates."""
    file = io.BytesIO(b"\0" * start + map_bytes)
    m = OffsetMap.read(file, "map", start, start + len(map_bytes))
    last = m.count - 1
    found = []
    j = last
    while True:
        m.file.seek(start + 24 + j * m.width)
        j = int.from_bytes(m.file.read(m.width), "big") - start
        found.append(j)
        if j == last:
            return found


def test_width_holds_the_largest_value_and_keeps_blank_free():
    assert width_for(16) == 1
    assert width_for(254) == 1
    assert width_for(255) == 2  # 0xff.. would be blank
    assert width_for(70000) == 3


def test_empty_shelf_is_what_durus_writes():
    if not FIXTURE.exists():
        pytest.skip(f"the Durus fixtures are not there ({FIXTURE})")
    # The fixture began as an empty Durus file and only had transactions
    # appended after its (empty) offset map.
    empty = encode_empty_shelf()
    assert FIXTURE.read_bytes()[: len(empty)] == empty


def test_free_slots_are_chained_for_durus():
    start = 300
    offsets = {0: 16, 2: 40, 5: 90}
    data = encode_map(start, 7, offsets)
    m = OffsetMap.read(
        io.BytesIO(b"\0" * start + data), "map", start, start + len(data)
    )
    assert (m.width, m.count) == (width_for(start + 7), 7)
    assert dict(m.items()) == offsets
    assert m.get(1) is None and m.get(6) is None and m.get(99) is None
    # Durus hands out the free slots highest first, the last slot at the end.
    assert free_slots_as_durus_walks_them(data, start) == [4, 3, 1, 6]


def test_scan_indexes_whole_transactions_and_stops_at_a_cut():
    record = b"\0" * 7 + b"\x01" + (3).to_bytes(4, "big") + b"abc"
    one, count = encode_transaction(iter([(b"\0" * 7 + b"\x01", record)]))
    assert count == 1
    data = one + one
    whole = scan_transactions(io.BytesIO(data), 0, len(data))
    assert (whole.transactions, whole.end, whole.torn_at) == (2, len(data), None)
    assert whole.index == {b"\0" * 7 + b"\x01": len(one) + 8}

    cut = data[:-1]
    torn = scan_transactions(io.BytesIO(cut), 0, len(cut))
    assert (torn.transactions, torn.end, torn.torn_at) == (1, len(one), len(one))
