"""FileStorage on a SHELF-1 file written by Durus 4.3 (record level)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dhruva.file_storage import FileStorage
from dhruva.record import ROOT_OID, pack_record, split_oids, unpack_record

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared"
FIXTURES = SHARED / "fixtures" / "durus-4"

pytestmark = pytest.mark.skipif(
    not (FIXTURES / "legacy-shelf.durus").exists(),
    reason=f"the Durus fixtures are not there ({FIXTURES}); they come with "
    "the shared folder next to the checkout",
)


@pytest.fixture
def legacy(tmp_path) -> Path:
    """A writable copy of the Durus-written SHELF-1 file."""
    path = tmp_path / "legacy-shelf.durus"
    shutil.copyfile(FIXTURES / "legacy-shelf.durus", path)
    return path


def test_durus_file_opens_and_every_record_loads(legacy):
    with FileStorage(legacy, readonly=True) as s:
        records = dict(s.gen_oid_record())
        # 1990 people, each with a friends list, plus 5000 numbers in BTree
        # nodes, the collections and the garbage of ten deleted people.
        assert 4000 < len(records) == s.get_size() < 10000
        for oid, record in records.items():
            assert unpack_record(record)[0] == oid
            assert s.load(oid) == record

        reachable = dict(s.gen_oid_record(start_oid=ROOT_OID))
        assert ROOT_OID in reachable
        assert set(reachable) < set(records)  # the deleted people are garbage
        for record in reachable.values():
            assert set(split_oids(unpack_record(record)[2])) <= set(reachable)


def test_appending_to_a_durus_file_keeps_it_whole(legacy):
    with FileStorage(legacy) as s:
        before = dict(s.gen_oid_record())
        new = s.new_oid()
        assert new not in before
        _oid, data, refs = unpack_record(before[ROOT_OID])
        s.begin()
        s.store(ROOT_OID, before[ROOT_OID])
        s.store(new, pack_record(new, data, refs))
        s.end()

    # The appended transaction follows Durus's layout exactly.
    original = (FIXTURES / "legacy-shelf.durus").read_bytes()
    appended = legacy.read_bytes()
    assert appended.startswith(original)
    tail = appended[len(original) :]
    assert int.from_bytes(tail[:8], "big") == len(tail) - 8

    with FileStorage(legacy) as s:
        after = dict(s.gen_oid_record())
        assert set(after) == set(before) | {new}
        assert all(after[oid] == record for oid, record in before.items())
        assert unpack_record(after[new])[1:] == (data, refs)
        assert s.new_oid() > new


def test_packing_a_durus_file_drops_the_garbage(legacy):
    with FileStorage(legacy) as s:
        reachable = dict(s.gen_oid_record(start_oid=ROOT_OID))
        everything = {oid for oid, _record in s.gen_oid_record()}
        handed_out = max(everything)
        s.pack()
        assert dict(s.gen_oid_record()) == reachable
        assert set(s.sync()) == everything - set(reachable)
    with FileStorage(legacy) as s:
        assert dict(s.gen_oid_record()) == reachable
        assert s.new_oid() > handed_out
