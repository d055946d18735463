"""verify_storage on MemoryStorage: references, damage, and where a reference sits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dhruva.connection import Connection
from dhruva.error import StorageError
from dhruva.persistent import Persistent
from dhruva.persistent_dict import PersistentDict
from dhruva.persistent_list import PersistentList
from dhruva.record import ROOT_OID, pack_record, unpack_record
from dhruva.storage import MemoryStorage
from dhruva.verify import find_reference_paths, verify_storage


class Node(Persistent):
    children: dict[str, Any]
    name: str


def build() -> tuple[MemoryStorage, Node]:
    storage = MemoryStorage()
    connection = Connection(storage)
    node = Node()
    node.children = {"left": Node(), "right": (1, [Node()])}
    node.name = "top"
    connection.get_root()["node"] = node
    connection.get_root()["list"] = PersistentList([PersistentDict(), node])
    connection.commit()
    return storage, node


def test_a_sound_database() -> None:
    storage, _node = build()
    report = verify_storage(storage)
    assert report.sound
    assert report.records == report.reachable == len(storage.records)
    assert report.unreachable == 0


def test_unreachable_records_are_counted_and_not_faults() -> None:
    storage, _node = build()
    storage.begin()
    data = unpack_record(storage.load(ROOT_OID))[1]  # any well-formed data
    storage.store(b"\0" * 7 + b"\x63", pack_record(b"\0" * 7 + b"\x63", data, b""))
    storage.end()
    report = verify_storage(storage)
    assert report.sound and report.unreachable == 1


def test_dangling_references_name_every_holder_and_path() -> None:
    storage, node = build()
    deep = node.children["right"][1][0]._p_oid
    assert deep is not None
    del storage.records[deep]

    report = verify_storage(storage)
    assert not report.sound
    [dangling] = report.dangling
    assert dangling.oid == int.from_bytes(deep, "big")
    [holder] = dangling.holders
    assert holder.oid == int.from_bytes(node._p_oid or b"", "big")
    assert holder.class_name.endswith("Node")
    assert holder.attributes == [".children['right'][1][0]"]


def test_a_node_held_twice_lists_both_holders() -> None:
    storage, node = build()
    assert node._p_oid is not None
    del storage.records[node._p_oid]
    [dangling] = verify_storage(storage).dangling
    paths = sorted(path for holder in dangling.holders for path in holder.attributes)
    assert paths == [".data['node']", ".data[1]"]


def test_paths_in_a_record_need_no_class_of_it() -> None:
    storage, node = build()
    record = storage.records[node._p_oid or b""]
    # Even with the application's class gone, the path is found.
    assert b"\nNode\n" in record
    record = record.replace(b"\nNode\n", b"\nGone\n")  # same length
    left = node.children["left"]._p_oid
    assert left is not None
    assert find_reference_paths(record, left) == [".children['left']"]


def test_a_record_under_the_wrong_oid_is_damaged() -> None:
    storage, node = build()
    oid = node._p_oid or b""
    storage.records[oid] = pack_record(b"\0" * 7 + b"\x77", b"data", b"")
    report = verify_storage(storage)
    assert [d.oid for d in report.damaged] == [int.from_bytes(oid, "big")]
    assert "names oid 119" in report.damaged[0].message


class _Refusing(MemoryStorage):
    """Refuses one record, as a storage with checksums does when it is damaged."""

    iterable = True

    def __init__(self, bad: bytes) -> None:
        super().__init__()
        self.bad = bad

    def load(self, oid: bytes) -> bytes:
        if oid == self.bad:
            raise StorageError(f"the record of oid {oid.hex()} is damaged")
        return super().load(oid)

    def gen_oid_record(
        self, start_oid: bytes | None = None, batch_size: int = 100
    ) -> Iterator[tuple[bytes, bytes]]:
        for oid in sorted(self.records):
            yield oid, self.load(oid)


def test_a_refused_record_is_reported_and_the_rest_still_read() -> None:
    source, node = build()
    bad = node.children["left"]._p_oid
    assert bad is not None
    storage = _Refusing(bad)
    storage.records.update(source.records)

    report = verify_storage(storage)
    assert not report.sound
    assert [d.oid for d in report.damaged] == [int.from_bytes(bad, "big")]
    assert report.scan_error is not None and not report.complete
    assert report.unreachable is None
    # Every other reachable record was read, the damaged one not dangling.
    assert report.records == len(source.records)
    assert report.dangling == []


def test_a_non_iterable_storage_is_walked_from_the_root() -> None:
    source, _node = build()
    storage = MemoryStorage()
    storage.records.update(source.records)
    storage.iterable = False
    report = verify_storage(storage)
    assert report.sound and report.records == len(source.records)
    assert report.unreachable is None


def test_an_empty_storage_is_sound_and_one_without_root_is_not() -> None:
    storage = MemoryStorage()
    assert verify_storage(storage).sound
    oid = b"\0" * 7 + b"\x05"
    storage.records[oid] = pack_record(oid, b"x", b"")
    report = verify_storage(storage)
    assert not report.sound and not report.has_root
    assert ROOT_OID not in storage.records


def test_progress_counts_every_record() -> None:
    storage, _node = build()
    seen: list[int] = []
    verify_storage(storage, seen.append)
    assert sum(seen) == len(storage.records)


def test_record_data_overwritten_with_zeros_is_damaged_without_checksums():
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["log"] = PersistentList(["start", "end"] * 20)
    connection.commit()
    log_oid = connection.get_root()["log"]._p_oid
    assert verify_storage(storage).sound
    oid, data, refs = unpack_record(storage.records[log_oid])
    storage.records[log_oid] = pack_record(oid, data[:-6] + b"\0" * 6, refs)
    report = verify_storage(storage)
    assert not report.sound
    assert [d.oid for d in report.damaged] == [int.from_bytes(log_oid, "big")]
