"""Tests of a zero-filled last transaction in the Durus layouts (SHELF-1, DFS20).

A crash on a file system that extends a file before its data reaches the disk
leaves zeros where the end of the last commit belongs, with every length word
in place. The layouts have no checksums, so the storage reads the records the
zeros reach: pickle data (and tagged data of dhruva's serializers) does not
parse as zeros.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage
from dhruva.file_storage2 import FileStorage2
from dhruva.persistent_dict import PersistentDict
from dhruva.record import ROOT_OID, pack_record, unpack_record
from dhruva.shelf import TornTailError
from dhruva.storage_testing import commit, make_record

Opener = Callable[..., FileStorage]

FORMATS: dict[str, Opener] = {
    "shelf": lambda path, **kw: FileStorage(path, format="durus", **kw),
    "dfs20": FileStorage2,
}


@pytest.fixture(params=sorted(FORMATS))
def opener(request: pytest.FixtureRequest) -> Opener:
    return FORMATS[request.param]


def three_commits(path: Path, opener: Opener) -> tuple[int, int]:
    """Commit three times through a Connection (pickle records); return where
    the last transaction starts and ends."""
    with opener(path) as storage:
        connection = Connection(storage)
        root = connection.get_root()
        root["a"] = PersistentDict(x=1)
        root["back"] = PersistentDict(to=root)
        connection.commit()
        root["a"]["x"] = 2
        connection.commit()
        start = path.stat().st_size
        root["a"]["x"] = "y" * 300  # compressed state
        root["b"] = PersistentDict(z=3)
        connection.commit()
        end = path.stat().st_size
        connection.abort()
    return start, end


def zero_fill(path: Path, start: int, end: int) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(end - start))


def values(path: Path, opener: Opener, **options: object) -> dict[str, object]:
    with opener(path, **options) as storage:
        root = Connection(storage).get_root()
        return {"x": root["a"]["x"], "b": "b" in root}


#: Where the zeros start, as a fraction of the last transaction's bytes.
CUTS = [0.0, 0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.97]


@pytest.mark.parametrize("cut", CUTS)
def test_a_zero_filled_last_commit_is_refused_then_repaired(
    tmp_path: Path, opener: Opener, cut: float, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "db"
    start, end = three_commits(path, opener)
    zeros_at = start + int((end - start) * cut)
    zero_fill(path, zeros_at, end)
    content = path.read_bytes()

    with pytest.raises(TornTailError) as info:
        opener(path)
    assert info.value.offset == start
    message = str(info.value)
    assert str(path) in message and f"byte offset {start}" in message
    assert "repair" in message
    assert path.read_bytes() == content  # refusing changed nothing

    # A reader reads up to it; repair cuts it off and saves it aside.
    assert values(path, opener, readonly=True) == {"x": 2, "b": False}
    with caplog.at_level(logging.WARNING):
        assert values(path, opener, repair=True) == {"x": 2, "b": False}
    assert f"byte offset {start}" in caplog.text
    assert path.stat().st_size == start
    assert Path(f"{path}.torn-{start}").read_bytes() == content[start:]

    # The repaired file takes new commits.
    with opener(path) as storage:
        connection = Connection(storage)
        connection.get_root()["a"]["x"] = 4
        connection.commit()
    assert values(path, opener) == {"x": 4, "b": False}


def test_the_zeros_of_a_reference_to_the_root_are_not_damage(
    tmp_path: Path, opener: Opener
) -> None:
    # The last record ends in a reference to the root: eight zero bytes.
    path = tmp_path / "db"
    with opener(path) as storage:
        connection = Connection(storage)
        root = connection.get_root()
        root["child"] = PersistentDict()
        connection.commit()
        root["child"]["parent"] = root
        connection.commit()
    assert path.read_bytes().endswith(bytes(8))
    with opener(path) as storage:
        assert Connection(storage).get_root()["child"]["parent"] is not None


def test_zeroed_references_of_pickle_data_are_found(
    tmp_path: Path, opener: Opener
) -> None:
    # A record's references are its data's persistent ids: zeros in place of
    # a reference to oid 1 are not a reference to the root.
    path = tmp_path / "db"
    with opener(path) as storage:
        connection = Connection(storage)
        connection.get_root()["a"] = PersistentDict()
        connection.commit()
        record = storage.load(ROOT_OID)
        assert unpack_record(record)[2] == (1).to_bytes(8, "big")
        start = path.stat().st_size
        commit(storage, record)  # the same record again, last in the file
        end = path.stat().st_size
    refs_end = end - 4 if opener is FileStorage2 else end
    zero_fill(path, refs_end - 1, refs_end)
    with pytest.raises(TornTailError) as info:
        opener(path)
    assert info.value.offset == start
    assert "refers to oid 0, which its data does not name" in str(info.value)


def test_opaque_record_data_is_not_taken_for_damage(
    tmp_path: Path, opener: Opener
) -> None:
    # Records a program stores itself through the Storage interface: any
    # bytes, here with a reference to the root (zeros) at the end.
    path = tmp_path / "db"
    with opener(path) as storage:
        root, a = storage.new_oid(), storage.new_oid()
        commit(storage, make_record(root, b"root", [a]))
        commit(storage, make_record(a, b"any bytes", [root]))
    with opener(path) as storage:
        assert unpack_record(storage.load(a))[2] == root


def test_tagged_record_data_is_checked_by_its_tag(
    tmp_path: Path, opener: Opener
) -> None:
    # dhruva's other serializers tag their data: \0NAME\0module:Class\0...
    path = tmp_path / "db"
    tagged = b"\0msgspec\0app.models:Thing\0" + b"\x81\xa1x\x01"
    with opener(path) as storage:
        root = storage.new_oid()
        commit(storage, pack_record(root, b"\0msgspec\0app:Root\0\x80", b""))
        start = path.stat().st_size
        commit(storage, pack_record(root, tagged, b""))
        end = path.stat().st_size
    with opener(path) as storage:
        assert unpack_record(storage.load(root))[1] == tagged

    # Zeros from inside the tag on.
    body_end = end - 4 if opener is FileStorage2 else end
    zero_fill(path, body_end - len(tagged) + 3, body_end)
    with pytest.raises(TornTailError) as info:
        opener(path)
    assert info.value.offset == start


def test_zeros_from_a_length_word_on_read_as_a_commit_and_zeros_after_it(
    tmp_path: Path,
) -> None:
    """DFS20's ambiguous case, kept on purpose.

    A DFS20 transaction ends with a zero length word, so zeros from a
    record's length word on read as a shorter commit followed by a
    zero-filled one. The bytes are exactly those of a complete commit (which
    was made durable) followed by a later commit that never reached the
    disk, so both get the answer that loses no durable commit: the zeros are
    the torn tail; the commit before them is kept.
    """
    torn, whole = tmp_path / "torn.dfs20", tmp_path / "whole.dfs20"
    for path in (torn, whole):
        with FileStorage2(path) as s:
            root, a, b = (s.new_oid() for _ in range(3))
            commit(s, make_record(root, b"root", [a]), make_record(a, b"a1"))
            if path is torn:
                commit(s, make_record(a, b"a2"), make_record(b, b"b" * 20))
            else:
                commit(s, make_record(a, b"a2"))
                commit(s, make_record(b, b"b" * 16))
    size = whole.stat().st_size
    assert torn.stat().st_size == size
    b_length_word = size - 4 - (4 + 12 + 20)
    zero_fill(torn, b_length_word, size)
    zero_fill(whole, b_length_word + 4, size)
    assert torn.read_bytes() == whole.read_bytes()

    with pytest.raises(TornTailError) as info:
        FileStorage2(torn)
    assert info.value.offset == b_length_word + 4
    with FileStorage2(torn, repair=True) as s:
        assert unpack_record(s.load(a))[1] == b"a2"


def test_zeros_after_a_commit_whose_reference_has_no_record_cut_the_commit(
    tmp_path: Path,
) -> None:
    # A commit that refers to a new object must hold its record: when zeros
    # follow instead, they were that record, and the commit is torn.
    path = tmp_path / "db.dfs20"
    with FileStorage2(path) as s:
        root, a, b = (s.new_oid() for _ in range(3))
        commit(s, make_record(root, b"root", [a]), make_record(a, b"a1"))
        start = path.stat().st_size
        commit(s, make_record(root, b"root", [a, b]), make_record(b, b"new"))
    size = path.stat().st_size
    zero_fill(path, size - 4 - (4 + 12 + 3), size)  # from b's length word on
    with pytest.raises(TornTailError) as info:
        FileStorage2(path)
    assert info.value.offset == start
    assert "refers to oid 2, which has no record" in str(info.value)
    with FileStorage2(path, repair=True) as s:
        assert split_refs(s.load(root)) == [a]


def split_refs(record: bytes) -> list[bytes]:
    refs = unpack_record(record)[2]
    return [refs[i : i + 8] for i in range(0, len(refs), 8)]


def test_a_point_in_time_view_is_not_checked_for_zeros(
    tmp_path: Path, opener: Opener
) -> None:
    # Transactions before a view's end were followed by more: no crash tore
    # them. A view opens at the end of every complete transaction.
    path = tmp_path / "db"
    three_commits(path, opener)
    with opener(path, readonly=True) as storage:
        positions = [span.end for span in storage.transactions()]
    for position in positions[1:]:
        with opener(path, readonly=True, at=position) as view:
            assert view.get_size()
    assert os.path.getsize(path) == positions[-1]
