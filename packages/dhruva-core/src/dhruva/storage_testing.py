"""The storage contract: one test suite every storage runs.

Import the classes for the capabilities your storage has into a test module,
subclass them as ``Test...`` and provide the fixtures they use::

    from dhruva.storage_testing import BasicStorageContract, DurableStorageContract

    class TestMyStorage(BasicStorageContract, DurableStorageContract):
        @pytest.fixture
        def storage(self, tmp_path):
            s = MyStorage(tmp_path / "db")
            yield s
            s.close()

        @pytest.fixture
        def reopen(self, tmp_path):
            return lambda s: (s.close(), MyStorage(tmp_path / "db"))[1]

Fixtures by class:

- ``storage``: a new, empty, writable storage (every class).
- ``reopen``: a function that closes the storage it is given and returns a new
  one on the same data (:class:`DurableStorageContract`,
  :class:`ReadOnlyStorageContract` as ``open_readonly``).
- ``open_readonly``: a function that closes the storage it is given and opens
  the same data read-only (:class:`ReadOnlyStorageContract`).
- ``second_client``: another client of the same data as ``storage``
  (:class:`InvalidatingStorageContract`).
- ``open_reader``: a function that opens another, read-only view of the data
  of the storage it is given, leaving that storage open
  (:class:`DeferredDurabilityStorageContract`).

:class:`IncrementalPackStorageContract` is for storages whose ``get_packer()``
returns a generator (a server advances it between client requests); it
commits between the packer's steps and checks that nothing reachable is lost.

:class:`DeferredDurabilityStorageContract` is for storages with
``deferred_durability = True``; it counts the syncs a storage makes through
its ``sync_calls`` fixture, which counts ``os.fsync`` and ``os.fdatasync``
calls unless a storage that syncs otherwise overrides it. That a deferred
commit is lost in a crash, never half of it, is each storage's own test.

This module needs pytest, which dhruva itself does not depend on.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest
from dhruva.error import DhruvaKeyError, ReadOnlyError, StorageError
from dhruva.record import ROOT_OID, pack_record, unpack_record
from dhruva.storage import Storage, gen_reachable_records

Reopen = Callable[[Storage], Storage]


def make_record(oid: bytes, data: bytes = b"data", refs: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    """Return a record with opaque ``data`` that refers to ``refs``."""
    return pack_record(oid, data, b"".join(refs))


def commit(storage: Storage, *records: bytes) -> None:
    """Store ``records`` in one transaction."""
    storage.begin()
    for record in records:
        storage.store(record[:8], record)
    storage.end()


def new_oids(storage: Storage, n: int) -> list[bytes]:
    oids = [storage.new_oid() for _ in range(n)]
    if ROOT_OID in oids:
        oids.remove(ROOT_OID)
        oids.append(storage.new_oid())
    return oids


class BasicStorageContract:
    """Every storage: oids, transactions, loads, iteration."""

    def test_new_oids_are_8_bytes_and_never_repeat(self, storage: Storage) -> None:
        oids = [storage.new_oid() for _ in range(50)]
        assert all(isinstance(oid, bytes) and len(oid) == 8 for oid in oids)
        assert len(set(oids)) == 50

    def test_committed_records_load(self, storage: Storage) -> None:
        a, b = new_oids(storage, 2)
        commit(storage, make_record(a, b"alpha", [b]), make_record(b, b"beta"))
        assert unpack_record(storage.load(a)) == (a, b"alpha", b)
        assert unpack_record(storage.load(b)) == (b, b"beta", b"")

    def test_a_later_commit_replaces_a_record(self, storage: Storage) -> None:
        (a,) = new_oids(storage, 1)
        commit(storage, make_record(a, b"one"))
        commit(storage, make_record(a, b"two" * 1000))
        assert unpack_record(storage.load(a))[1] == b"two" * 1000

    def test_missing_oid_raises_a_key_error(self, storage: Storage) -> None:
        missing = (12345678).to_bytes(8, "big")
        with pytest.raises(DhruvaKeyError):
            storage.load(missing)
        with pytest.raises(KeyError):
            storage.load(missing)

    def test_bulk_load_keeps_order(self, storage: Storage) -> None:
        oids = new_oids(storage, 5)
        commit(storage, *(make_record(oid, oid * 2) for oid in oids))
        wanted = list(reversed(oids))
        loaded = [unpack_record(r)[0] for r in storage.bulk_load(wanted)]
        assert loaded == wanted

    def test_walk_from_root_yields_reachable_records(self, storage: Storage) -> None:
        a, b, c = new_oids(storage, 3)
        commit(
            storage,
            make_record(ROOT_OID, b"root", [a]),
            make_record(a, b"a", [b]),
            make_record(b, b"b"),
            make_record(c, b"unreachable"),
        )
        walked = [oid for oid, _r in storage.gen_oid_record(start_oid=ROOT_OID)]
        assert walked == [ROOT_OID, a, b]

    def test_empty_transaction_changes_nothing(self, storage: Storage) -> None:
        (a,) = new_oids(storage, 1)
        commit(storage, make_record(a, b"kept"))
        commit(storage)
        assert unpack_record(storage.load(a))[1] == b"kept"


class IterableStorageContract:
    """Storages that can list every record they hold (census tools)."""

    def test_every_record_is_listed(self, storage: Storage) -> None:
        a, b = new_oids(storage, 2)
        commit(storage, make_record(ROOT_OID, b"r"), make_record(a), make_record(b))
        commit(storage, make_record(a, b"newer"))
        records = dict(storage.gen_oid_record())
        assert set(records) == {ROOT_OID, a, b}
        assert unpack_record(records[a])[1] == b"newer"

    def test_listing_in_batches_of_one_is_complete(self, storage: Storage) -> None:
        oids = new_oids(storage, 7)
        commit(storage, make_record(ROOT_OID, b"r"), *(make_record(o, o) for o in oids))
        listed = [oid for oid, _record in storage.gen_oid_record(batch_size=1)]
        assert sorted(listed) == sorted([ROOT_OID, *oids])

    def test_size_counts_the_listed_records(self, storage: Storage) -> None:
        oids = new_oids(storage, 4)
        commit(storage, make_record(ROOT_OID, b"r", oids[:1]))
        commit(storage, *(make_record(o) for o in oids))
        commit(storage, make_record(oids[0], b"again"))
        size = storage.get_size()
        assert size is None or size == len(dict(storage.gen_oid_record())) == 5


class DurableStorageContract:
    """Storages whose records survive closing and opening again."""

    def test_records_survive_reopen(self, storage: Storage, reopen: Reopen) -> None:
        a, b = new_oids(storage, 2)
        commit(storage, make_record(ROOT_OID, b"root", [a]), make_record(a, b"a"))
        commit(storage, make_record(b, b"b"))
        storage = reopen(storage)
        try:
            assert unpack_record(storage.load(a)) == (a, b"a", b"")
            assert unpack_record(storage.load(b))[1] == b"b"
            assert unpack_record(storage.load(ROOT_OID))[2] == a
        finally:
            storage.close()

    def test_new_oids_after_reopen_are_new(
        self, storage: Storage, reopen: Reopen
    ) -> None:
        used = new_oids(storage, 3)
        commit(storage, *(make_record(oid) for oid in used))
        storage = reopen(storage)
        try:
            fresh = {storage.new_oid() for _ in range(10)}
            assert not fresh & set(used)
            assert ROOT_OID not in fresh
        finally:
            storage.close()

    def test_pack_survives_reopen_and_its_oids_stay_retired(
        self, storage: Storage, reopen: Reopen
    ) -> None:
        a, garbage = new_oids(storage, 2)
        commit(
            storage,
            make_record(ROOT_OID, b"root", [a]),
            make_record(a, b"a"),
            make_record(garbage, b"the highest oid, unreachable"),
        )
        storage.pack()
        storage = reopen(storage)
        try:
            assert unpack_record(storage.load(a))[1] == b"a"
            assert unpack_record(storage.load(ROOT_OID))[2] == a
            if storage.packable:
                with pytest.raises(KeyError):
                    storage.load(garbage)
            fresh = {storage.new_oid() for _ in range(10)}
            assert not fresh & {ROOT_OID, a, garbage}
        finally:
            storage.close()


class PackableStorageContract:
    """Storages that remove unreachable records in ``pack()``."""

    def test_pack_keeps_reachable_and_drops_garbage(self, storage: Storage) -> None:
        a, b, garbage = new_oids(storage, 3)
        commit(
            storage,
            make_record(ROOT_OID, b"root", [a]),
            make_record(a, b"a", [b]),
            make_record(b, b"b"),
            make_record(garbage, b"garbage"),
        )
        storage.pack()
        assert unpack_record(storage.load(b))[1] == b"b"
        with pytest.raises(KeyError):
            storage.load(garbage)

    def test_oids_are_not_reused_after_pack(self, storage: Storage) -> None:
        a, garbage = new_oids(storage, 2)
        commit(storage, make_record(ROOT_OID, b"root", [a]), make_record(a))
        commit(storage, make_record(garbage))
        storage.pack()
        fresh = {storage.new_oid() for _ in range(10)}
        assert not fresh & {ROOT_OID, a, garbage}

    def test_pack_keeps_a_deep_chain_at_its_latest_versions(
        self, storage: Storage
    ) -> None:
        chain = new_oids(storage, 300)
        links = [make_record(ROOT_OID, b"root", chain[:1])]
        for oid, following in zip(chain, chain[1:] + [b""], strict=True):
            links.append(make_record(oid, b"old", [following] if following else []))
        commit(storage, *links)
        commit(storage, *(make_record(oid, b"new " + oid) for oid in chain[150:]))
        storage.pack()
        walked = dict(storage.gen_oid_record(start_oid=ROOT_OID))
        assert set(walked) == {ROOT_OID, *chain[:151]}
        assert unpack_record(storage.load(chain[150]))[1] == b"new " + chain[150]
        for oid in chain[151:]:
            with pytest.raises(KeyError):
                storage.load(oid)

    def test_after_pack_every_listed_record_is_reachable(
        self, storage: Storage
    ) -> None:
        a, b, c, d = new_oids(storage, 4)
        commit(
            storage,
            make_record(ROOT_OID, b"root", [a, b]),
            make_record(a, b"a", [c]),
            make_record(b, b"b"),
            make_record(c, b"c"),
            make_record(d, b"d", [a]),
        )
        commit(storage, make_record(ROOT_OID, b"root", [a]))
        storage.pack()
        assert set(dict(storage.gen_oid_record())) == {ROOT_OID, a, c}
        size = storage.get_size()
        assert size is None or size == 3

    def test_commits_and_packs_go_on_after_a_pack(self, storage: Storage) -> None:
        a, b = new_oids(storage, 2)
        commit(storage, make_record(ROOT_OID, b"root", [a]), make_record(a, b"a"))
        storage.pack()
        storage.pack()
        commit(storage, make_record(ROOT_OID, b"root", [a, b]), make_record(b, b"b"))
        storage.pack()
        assert unpack_record(storage.load(b))[1] == b"b"
        assert unpack_record(storage.load(a))[1] == b"a"

    def test_pack_without_a_root_removes_nothing(self, storage: Storage) -> None:
        a, b = new_oids(storage, 2)
        commit(storage, make_record(a, b"a", [b]), make_record(b, b"b"))
        storage.pack()
        assert unpack_record(storage.load(a))[1] == b"a"
        assert unpack_record(storage.load(b))[1] == b"b"


class ReadOnlyStorageContract:
    """Storages that can be opened read-only."""

    def test_readonly_storage_loads_and_refuses_writes(
        self, storage: Storage, open_readonly: Reopen
    ) -> None:
        (a,) = new_oids(storage, 1)
        commit(storage, make_record(ROOT_OID, b"root"), make_record(a, b"a"))
        readonly = open_readonly(storage)
        try:
            assert unpack_record(readonly.load(a))[1] == b"a"
            with pytest.raises(ReadOnlyError):
                readonly.begin()
                readonly.store(a, make_record(a, b"changed"))
                readonly.end()
        finally:
            readonly.close()

    def test_readonly_storage_refuses_new_oids_and_pack(
        self, storage: Storage, open_readonly: Reopen
    ) -> None:
        commit(storage, make_record(ROOT_OID, b"root"))
        readonly = open_readonly(storage)
        try:
            assert readonly.readonly
            with pytest.raises(ReadOnlyError):
                readonly.new_oid()
            with pytest.raises(ReadOnlyError):
                readonly.pack()
            assert unpack_record(readonly.load(ROOT_OID))[1] == b"root"
        finally:
            readonly.close()

    def test_readonly_storage_sees_a_packed_database(
        self, storage: Storage, open_readonly: Reopen
    ) -> None:
        a, b = new_oids(storage, 2)
        commit(storage, make_record(ROOT_OID, b"root", [a]), make_record(a, b"a"))
        commit(storage, make_record(a, b"a2", [b]), make_record(b, b"b"))
        storage.pack()
        readonly = open_readonly(storage)
        try:
            walked = dict(readonly.gen_oid_record(start_oid=ROOT_OID))
            assert [unpack_record(walked[o])[1] for o in (a, b)] == [b"a2", b"b"]
            if readonly.iterable:
                assert set(dict(readonly.gen_oid_record())) == {ROOT_OID, a, b}
        finally:
            readonly.close()


class _Graph:
    """The records a test expects a storage to hold, by oid.

    The root refers to buckets, buckets refer to leaves, and a leaf may refer
    to other leaves. Every change is committed to the storage as it is made.
    """

    def __init__(self, storage: Storage, seed: int) -> None:
        self.storage = storage
        self.rng = random.Random(seed)
        self.refs: dict[bytes, list[bytes]] = {}
        self.data: dict[bytes, bytes] = {}
        self.buckets: list[bytes] = []
        #: Leaves cut loose before the pack started.
        self.detached: list[bytes] = []
        #: Oids whose records changed, or that were re-attached, while packing.
        self.touched: set[bytes] = set()
        self.version = 0

    def record(self, oid: bytes) -> bytes:
        return make_record(oid, self.data[oid], self.refs[oid])

    def put(self, *oids: bytes) -> None:
        self.version += 1
        for oid in oids:
            self.data[oid] = b"%s v%d" % (oid.hex().encode(), self.version)
        commit(self.storage, *(self.record(oid) for oid in oids))

    def build(self, buckets: int, leaves: int) -> None:
        self.buckets = new_oids(self.storage, buckets)
        self.refs[ROOT_OID] = list(self.buckets)
        for bucket in self.buckets:
            self.refs[bucket] = new_oids(self.storage, leaves)
            for leaf in self.refs[bucket]:
                self.refs[leaf] = []
        self.put(*self.refs)

    def pick_leaf(self) -> tuple[bytes, bytes] | None:
        bucket = self.rng.choice(self.buckets)
        if not self.refs[bucket]:
            return None
        return bucket, self.rng.choice(self.refs[bucket])

    def detach_some(self, count: int) -> None:
        """Cut ``count`` leaves loose, making them garbage."""
        for _ in range(count):
            picked = self.pick_leaf()
            if picked is not None and picked[1] not in self.detached:
                bucket, leaf = picked
                self.refs[bucket].remove(leaf)
                self.detached.append(leaf)
                self.put(bucket)

    def change(self) -> None:
        """One commit of the kind an application makes while a pack runs."""
        op = self.rng.randrange(6)
        picked = self.pick_leaf()
        if picked is None:
            return
        bucket, leaf = picked
        other = self.rng.choice(self.buckets)
        if op == 0:  # move a leaf to another bucket
            self.refs[bucket].remove(leaf)
            self.refs[other].append(leaf)
            self.touched.add(leaf)
            self.put(bucket, other)
        elif op == 1:  # a new leaf
            (new,) = new_oids(self.storage, 1)
            self.refs[new] = []
            self.refs[other].append(new)
            self.put(new, other)
        elif op == 2:  # cut a leaf loose
            self.refs[bucket].remove(leaf)
            self.touched.add(leaf)
            self.put(bucket)
        elif op == 3 and self.detached:  # re-attach garbage, record unchanged
            lost = self.detached.pop(self.rng.randrange(len(self.detached)))
            self.refs[other].append(lost)
            self.touched.add(lost)
            self.put(other)
        elif op == 4:  # hang a leaf below another leaf
            host = self.pick_leaf()
            if host is not None and host[1] != leaf:
                self.refs[bucket].remove(leaf)
                self.refs[host[1]].append(leaf)
                self.touched.add(leaf)
                self.put(bucket, host[1])
        else:  # change a leaf
            self.touched.add(leaf)
            self.put(leaf)

    def reachable(self) -> set[bytes]:
        seen = {ROOT_OID}
        todo = [ROOT_OID]
        while todo:
            for ref in self.refs[todo.pop()]:
                if ref not in seen:
                    seen.add(ref)
                    todo.append(ref)
        return seen

    def check(self) -> None:
        """Every reachable record loads as last committed; nothing else is
        reachable."""
        reachable = self.reachable()
        walked = dict(gen_reachable_records(self.storage))
        assert set(walked) == reachable
        for oid in reachable:
            assert walked[oid] == self.record(oid), f"oid {oid.hex()}"


def drive(
    packer: Iterator[None], between: Callable[[], None], max_steps: int = 100_000
) -> int:
    """Run ``packer`` to its end, calling ``between`` before each step.

    :param max_steps: fail when the packer yields more often than this: a
        packer must end even while clients keep committing.
    :return: the number of steps the packer yielded.
    """
    steps = 0
    between()
    for _step in packer:
        steps += 1
        if steps > max_steps:
            pytest.fail(
                f"the packer did not end within {max_steps} steps while "
                "commits were made between them"
            )
        between()
    return steps


class IncrementalPackStorageContract:
    """Storages whose ``get_packer()`` returns a generator, for a server to
    advance between client requests while clients go on committing."""

    #: The test graph: buckets under the root, leaves under each bucket.
    #: Make it big enough that the packer yields several times.
    pack_buckets = 30
    pack_leaves = 100

    def graph(self, storage: Storage, seed: int) -> _Graph:
        graph = _Graph(storage, seed)
        graph.build(self.pack_buckets, self.pack_leaves)
        graph.detach_some(self.pack_buckets * self.pack_leaves // 10)
        return graph

    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_commits_between_steps_lose_nothing_reachable(
        self, storage: Storage, seed: int
    ) -> None:
        graph = self.graph(storage, seed)
        garbage = set(graph.detached)
        packer = storage.get_packer()
        assert packer is not None

        def between() -> None:
            for _ in range(5):
                graph.change()

        records = len(graph.refs)
        assert drive(packer, between, max_steps=records) >= 1
        graph.check()

        # Garbage that no commit touched while packing is gone.
        gone = garbage - graph.touched - graph.reachable()
        assert gone
        for oid in gone:
            with pytest.raises(KeyError):
                storage.load(oid)

        # A second pack, and commits after it, find everything in place;
        # what the first pack removed is not re-attached (it is gone).
        graph.detached.clear()
        storage.pack()
        graph.check()
        graph.change()
        graph.check()

    def test_oids_handed_out_while_packing_stay_unique(self, storage: Storage) -> None:
        graph = self.graph(storage, 4)
        before = set(graph.refs)
        packer = storage.get_packer()
        assert packer is not None
        during: list[bytes] = []
        drive(packer, lambda: during.extend(new_oids(storage, 3)))
        after = new_oids(storage, 20)
        assert len(set(during)) == len(during)
        assert not (set(during) | set(after)) & before
        assert not set(after) & set(during)

    def test_a_second_packer_is_refused_while_one_runs(self, storage: Storage) -> None:
        graph = self.graph(storage, 6)
        first = storage.get_packer()
        second = storage.get_packer()  # made before the first one started
        assert first is not None
        next(first)
        graph.change()
        if second is not None:
            with pytest.raises(StorageError, match="already"):
                next(second)
        drive(first, graph.change)
        graph.check()

    def test_an_abandoned_packer_changes_nothing(self, storage: Storage) -> None:
        graph = self.graph(storage, 5)
        packer = storage.get_packer()
        assert isinstance(packer, Generator)
        next(packer, None)
        graph.change()
        packer.close()
        graph.check()
        for oid in graph.detached:
            assert unpack_record(storage.load(oid))[0] == oid
        graph.change()
        storage.pack()
        graph.check()


class InvalidatingStorageContract:
    """Storages shared by several clients, each told of the others' commits."""

    def test_sync_reports_other_clients_commits(
        self, storage: Storage, second_client: Storage
    ) -> None:
        (a,) = new_oids(storage, 1)
        commit(storage, make_record(a, b"first"))
        second_client.sync()
        assert unpack_record(second_client.load(a))[1] == b"first"
        commit(storage, make_record(a, b"second"))
        assert a in second_client.sync()
        assert unpack_record(second_client.load(a))[1] == b"second"
        assert storage.sync() == [] or a not in storage.sync()

    def test_new_oids_differ_between_clients(
        self, storage: Storage, second_client: Storage
    ) -> None:
        mine = {storage.new_oid() for _ in range(20)}
        theirs = {second_client.new_oid() for _ in range(20)}
        assert not mine & theirs


__all__: list[Any] = [
    "BasicStorageContract",
    "DurableStorageContract",
    "IncrementalPackStorageContract",
    "InvalidatingStorageContract",
    "IterableStorageContract",
    "PackableStorageContract",
    "ReadOnlyStorageContract",
    "commit",
    "drive",
    "make_record",
    "new_oids",
]


def _commit_deferred(storage: Storage, *records: bytes) -> None:
    """Store ``records`` in one transaction ended with ``durable=False``."""
    storage.begin()
    for record in records:
        storage.store(record[:8], record)
    storage.end(durable=False)  # type: ignore[call-arg]


class DeferredDurabilityStorageContract:
    """Storages with ``deferred_durability``: ``end(durable=False)`` writes a
    commit and makes it visible without syncing it; :meth:`make_durable`,
    a durable commit or ``close()`` syncs every such commit."""

    @pytest.fixture
    def sync_calls(self, monkeypatch: pytest.MonkeyPatch) -> list[int]:
        """The file descriptors synced from now on (os.fsync, os.fdatasync)."""
        calls: list[int] = []
        for name in ("fsync", "fdatasync"):
            real = getattr(os, name, None)
            if real is None:
                continue

            def counting(fd: int, real: Callable[[int], None] = real) -> None:
                calls.append(fd)
                real(fd)

            monkeypatch.setattr(os, name, counting)
        return calls

    def test_it_announces_deferred_durability(self, storage: Storage) -> None:
        assert storage.deferred_durability is True

    def test_a_deferred_commit_is_visible_at_once(
        self, storage: Storage, open_reader: Reopen
    ) -> None:
        root, a = ROOT_OID, new_oids(storage, 1)[0]
        _commit_deferred(storage, make_record(root, b"root", [a]))
        assert storage.load(root) == make_record(root, b"root", [a])

        # A reader opened meanwhile loads it, and sync() reports the next.
        reader = open_reader(storage)
        try:
            assert reader.load(root) == make_record(root, b"root", [a])
            _commit_deferred(storage, make_record(a, b"a"))
            assert a in reader.sync()
            assert reader.load(a) == make_record(a, b"a")
        finally:
            reader.close()

    def test_make_durable_syncs_deferred_commits_once(
        self, storage: Storage, sync_calls: list[int]
    ) -> None:
        oids = new_oids(storage, 5)
        sync_calls.clear()
        for oid in oids:
            _commit_deferred(storage, make_record(oid, b"deferred"))
        assert sync_calls == [], "a deferred commit was synced"

        storage.make_durable()
        assert sync_calls, "make_durable() synced nothing"
        synced = len(sync_calls)
        storage.make_durable()
        assert len(sync_calls) == synced, "nothing was pending, yet it synced"

    def test_make_durable_with_nothing_pending_does_nothing(
        self, storage: Storage, sync_calls: list[int]
    ) -> None:
        commit(storage, make_record(ROOT_OID, b"durable"))
        sync_calls.clear()
        storage.make_durable()
        _commit_deferred(storage)  # an empty commit writes nothing
        storage.make_durable()
        assert sync_calls == []
        assert storage.load(ROOT_OID) == make_record(ROOT_OID, b"durable")

    def test_a_durable_commit_syncs_the_deferred_ones(
        self, storage: Storage, reopen: Reopen, sync_calls: list[int]
    ) -> None:
        a, b = new_oids(storage, 2)
        sync_calls.clear()
        _commit_deferred(storage, make_record(ROOT_OID, b"root", [a, b]))
        _commit_deferred(storage, make_record(a, b"a"))
        commit(storage, make_record(b, b"b"))
        assert sync_calls, "the durable commit synced nothing"
        synced = len(sync_calls)
        storage.make_durable()
        assert len(sync_calls) == synced, "deferred commits were still pending"

        again = reopen(storage)
        try:
            assert again.load(a) == make_record(a, b"a")
            assert again.load(b) == make_record(b, b"b")
        finally:
            again.close()

    def test_close_syncs_deferred_commits(
        self, storage: Storage, reopen: Reopen, sync_calls: list[int]
    ) -> None:
        a = new_oids(storage, 1)[0]
        sync_calls.clear()
        _commit_deferred(storage, make_record(ROOT_OID, b"root", [a]))
        _commit_deferred(storage, make_record(a, b"a"))
        again = reopen(storage)
        try:
            assert sync_calls, "closing left deferred commits unsynced"
            assert again.load(a) == make_record(a, b"a")
        finally:
            again.close()
