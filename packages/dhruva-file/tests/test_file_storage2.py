"""Tests of what only FileStorage2 does: the DFS20 layout, its index record,
its torn tails, and the DFS20 file Durus 4.3 wrote. What every file layout
does alike (the storage contract, locking, read-only opens, packs, cuts at
every byte of the last commit) is in ``test_file_formats.py``."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pickle
import shutil
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from dhruva.connection import Connection
from dhruva.error import StorageError
from dhruva.file_storage import FileStorage
from dhruva.file_storage2 import MAGIC, FileStorage2, encode_index
from dhruva.plugins import open_storage
from dhruva.record import ROOT_OID, pack_record, unpack_record
from dhruva.shelf import TornTailError
from dhruva.storage_testing import (
    commit,
    make_record,
)

FIXTURES = (
    Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures" / "durus-4"
)
LEGACY = "legacy-filestorage2.dfs20"


def oid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def index_of(path: Path) -> dict[bytes, int]:
    """Read the index record the way Durus does: header offset, then loads."""
    data = path.read_bytes()
    at = int.from_bytes(data[6:14], "big")
    length = int.from_bytes(data[at : at + 8], "big")
    index: dict[bytes, int] = pickle.loads(
        zlib.decompress(data[at + 8 : at + 8 + length])
    )
    return index


def test_a_new_file_has_the_durus_layout(tmp_path):
    path = tmp_path / "db"
    FileStorage2(path).close()
    data = path.read_bytes()
    # Magic, the index at byte 14, and there an index record of an empty dict.
    assert data[:14] == MAGIC + (14).to_bytes(8, "big")
    assert int.from_bytes(data[14:22], "big") == len(data) - 22
    assert pickle.loads(zlib.decompress(data[22:])) == {}


def test_commits_append_durus_transactions(tmp_path):
    path = tmp_path / "db"
    with FileStorage2(path) as s:
        a = s.new_oid()
        b = s.new_oid()
        before = path.stat().st_size
        ra, rb = make_record(a, b"alpha", [b]), make_record(b, b"beta")
        commit(s, ra, rb)
    # Each record is its int4 length and itself; an int4 zero ends the commit.
    tail = path.read_bytes()[before:]
    assert tail == (
        len(ra).to_bytes(4, "big") + ra + len(rb).to_bytes(4, "big") + rb + bytes(4)
    )


def test_a_shelf_file_is_refused_with_its_path(tmp_path):
    path = tmp_path / "other.durus"
    FileStorage(path).close()
    content = path.read_bytes()
    before = open_fds()
    with pytest.raises(StorageError, match=r"other\.durus.*DFS20"):
        FileStorage2(path)
    assert open_fds() == before
    assert path.read_bytes() == content


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d[:10], "header"),
        (lambda d: d[:6] + (10**6).to_bytes(8, "big") + d[14:], "outside"),
        (lambda d: d[:30] + b"\xff" * 8 + d[38:], "unreadable"),
        (
            lambda d: (
                d[:14] + encode_index({oid(1): 10**6}) + d[14 + len(encode_index({})) :]
            ),
            "byte offset 1000000",
        ),
    ],
)
def test_a_damaged_header_or_index_is_refused(tmp_path, damage, message):
    path = tmp_path / "db.dfs20"
    FileStorage2(path).close()
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(StorageError, match=message) as info:
        FileStorage2(path)
    assert str(path) in str(info.value) and "backup" in str(info.value)


def test_an_index_pickle_naming_a_callable_is_refused(tmp_path):
    # An index record is a pickle: one naming a callable is refused, not run.
    path = tmp_path / "db.dfs20"
    evil = zlib.compress(pickle.dumps({oid(0): 14, "x": os.getpid}))
    path.write_bytes(MAGIC + (14).to_bytes(8, "big") + len(evil).to_bytes(8, "big"))
    with open(path, "ab") as f:
        f.write(evil)
    with pytest.raises(StorageError, match="posix.getpid"):
        FileStorage2(path)


# --- oids and records ----------------------------------------------------------


def test_a_packed_file_has_a_plain_index_and_keeps_the_oid_counter(tmp_path):
    # Durus reads the index as a plain dict; dhruva's oid counter follows the
    # pickle, where Durus's reader ignores it.
    path = tmp_path / "db"
    with FileStorage2(path) as s:
        root, a, garbage, unused = (s.new_oid() for _ in range(4))
        commit(s, make_record(root, b"r", [a]), make_record(a), make_record(garbage))
        s.pack()
    assert set(index_of(path)) == {root, a}
    with FileStorage2(path) as s:
        assert int.from_bytes(s.new_oid(), "big") > int.from_bytes(unused, "big")


def test_a_record_of_4_gib_is_refused_before_writing(tmp_path):
    class Huge(bytes):
        def __len__(self) -> int:
            return 1 << 32

    with FileStorage2(tmp_path / "db") as s:
        size = os.path.getsize(s.path)
        a = s.new_oid()
        s.begin()
        s.store(a, Huge(make_record(a)))
        with pytest.raises(StorageError, match="oid 0 .*4 GiB"):
            s.end()
        assert os.path.getsize(s.path) == size


# --- torn tails ----------------------------------------------------------------


@pytest.fixture
def three_commits(tmp_path, three_commits_in):
    """A file with three commits; returns (path, oids, start and end of the last)."""
    return three_commits_in(FileStorage2, tmp_path / "db.dfs20")


@pytest.mark.parametrize("damage", ["zeroed last record", "zero-filled last record"])
def test_zeros_in_dfs20_records_are_found(three_commits, damage):
    path, (_root, a, b), start, end = three_commits
    data = bytearray(path.read_bytes())
    if damage == "zeroed last record":
        # From inside the first record on, so the second one's length word
        # reads as an end marker.
        data[end - 30 :] = bytes(30)
    else:
        # A length word written, the rest of the commit zeros (a crash on a
        # file system that extends files with zeros).
        data[start + 4 :] = bytes(end - start - 4)
        data[start : start + 4] = (44).to_bytes(4, "big")
    path.write_bytes(bytes(data))

    with pytest.raises(TornTailError) as info:
        FileStorage2(path)
    assert info.value.offset == start
    with FileStorage2(path, repair=True) as s:
        assert path.stat().st_size == start
        assert unpack_record(s.load(a))[1] == b"a2"
        assert b not in {o for o, _r in s.gen_oid_record()}


def test_one_empty_transaction_at_the_end_is_not_damage(three_commits):
    # Durus writes a lone end marker for a commit with no records.
    path, (_root, a, _b), _start, end = three_commits
    with open(path, "ab") as f:
        f.write(bytes(4))
    with FileStorage2(path) as s:
        assert unpack_record(s.load(a))[1] == b"a3" * 50
    assert path.stat().st_size == end + 4


# --- choosing the storage --------------------------------------------------------


def test_open_storage_recognizes_dfs20_files(tmp_path):
    path = tmp_path / "db.dfs20"
    with open_storage(path, "file2") as s:
        assert type(s) is FileStorage2
        commit(s, make_record(ROOT_OID, b"root"))
    with open_storage(path) as s:
        assert type(s) is FileStorage2
        assert unpack_record(s.load(ROOT_OID))[1] == b"root"


# --- the DFS20 file Durus 4.3 wrote ----------------------------------------------

needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / LEGACY).exists(),
    reason=f"the Durus fixtures are not there ({FIXTURES}); they come with "
    "the shared folder next to the checkout",
)


@functools.cache
def manifest_checks() -> ModuleType:
    """The manifest checks written for the SHELF-1 fixture, shared here."""
    path = Path(__file__).with_name("test_durus_connection.py")
    spec = importlib.util.spec_from_file_location("_durus_manifest_checks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Iterator[Path]:
    """A writable copy of the Durus DFS20 file, with its model importable."""
    monkeypatch.syspath_prepend(str(FIXTURES))
    path = tmp_path / LEGACY
    shutil.copyfile(FIXTURES / LEGACY, path)
    path.chmod(0o644)
    yield path
    sys.modules.pop("legacy_model", None)


@pytest.fixture
def manifest() -> dict[str, Any]:
    return dict(json.loads((FIXTURES / "manifest.json").read_text())[LEGACY])


def check_manifest(connection: Connection, manifest: dict[str, Any]) -> None:
    manifest_checks().check(connection.get_root(), manifest)


@needs_fixtures
def test_durus_file_opens_and_every_record_loads(legacy):
    with FileStorage2(legacy, readonly=True) as s:
        records = dict(s.gen_oid_record())
        assert 4000 < len(records) == s.get_size() < 10000
        for key, record in records.items():
            assert unpack_record(record)[0] == key
            assert s.load(key) == record
        reachable = dict(s.gen_oid_record(start_oid=ROOT_OID))
        assert set(reachable) < set(records)  # the deleted people are garbage
    assert legacy.read_bytes() == (FIXTURES / LEGACY).read_bytes()


@needs_fixtures
def test_durus_file_through_a_connection_commit_reopen_pack(legacy, manifest):
    connection = Connection(FileStorage2(legacy))
    try:
        check_manifest(connection, manifest)
        connection.get_root()["counter"].bump()
        connection.get_root()["log"].append("dhruva")
        connection.commit()
    finally:
        connection.get_storage().close()

    # The commit was appended; what Durus wrote is untouched.
    original = (FIXTURES / LEGACY).read_bytes()
    appended = legacy.read_bytes()
    assert appended.startswith(original) and len(appended) > len(original)
    assert appended.endswith(bytes(4))

    connection = Connection(FileStorage2(legacy))
    try:
        root = connection.get_root()
        assert root["counter"].value == manifest["counter"] + 1
        assert list(root["log"]) == [*manifest["log"], "dhruva"]
        root["counter"].value -= 1
        root["log"].pop()
        connection.commit()
        check_manifest(connection, manifest)
        connection.pack()
        check_manifest(connection, manifest)
    finally:
        connection.get_storage().close()

    connection = Connection(FileStorage2(legacy, readonly=True))
    try:
        check_manifest(connection, manifest)
    finally:
        connection.get_storage().close()


@needs_fixtures
def test_a_connection_on_a_path_picks_file_storage2_by_the_header(legacy, manifest):
    connection = Connection(str(legacy))
    try:
        assert type(connection.get_storage()) is FileStorage2
        assert connection.get_root()["counter"].value == manifest["counter"]
    finally:
        connection.get_storage().close()


@needs_fixtures
def test_appending_to_the_durus_file_keeps_durus_layout(legacy):
    with FileStorage2(legacy) as s:
        before = dict(s.gen_oid_record())
        new = s.new_oid()
        assert new not in before
        _oid, data, refs = unpack_record(before[ROOT_OID])
        commit(s, before[ROOT_OID], pack_record(new, data, refs))
    with FileStorage2(legacy) as s:
        after = dict(s.gen_oid_record())
        assert set(after) == set(before) | {new}
        assert all(after[key] == record for key, record in before.items())
        assert s.new_oid() > new
