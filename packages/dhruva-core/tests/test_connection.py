import gc

import pytest
from dhruva.connection import (
    ROOT_OID,
    Connection,
    gen_every_instance,
    touch_every_reference,
)
from dhruva.error import (
    InvalidObjectReference,
    ReadConflictError,
    RemovedObjectError,
    StorageError,
    WriteConflictError,
)
from dhruva.persistent import ComputedAttribute, Persistent
from dhruva.persistent_dict import PersistentDict
from dhruva.record import pack_record, unpack_record
from dhruva.serializer import SerializationError
from dhruva.storage import MemoryStorage, get_census


class Item(Persistent):
    def __init__(self, name="", value=None):
        self.name = name
        self.value = value


class FastItem(Item, fast_reads=True):
    """An Item whose reads skip the attribute hook once touched."""


class FastChild(FastItem):
    """Inherits fast_reads."""


#: Both read modes, for the tests of what they share.
BOTH_MODES = pytest.mark.parametrize(
    "item_class", [Item, FastItem], ids=["default", "fast_reads"]
)


def reopen(storage):
    return Connection(storage)


def test_new_storage_gets_a_persistent_dict_root():
    connection = Connection(MemoryStorage())
    root = connection.get_root()
    assert isinstance(root, PersistentDict)
    assert root._p_oid == ROOT_OID
    assert connection.get(0) is root


def test_committed_objects_load_in_a_new_connection():
    storage = MemoryStorage()
    connection = Connection(storage)
    root = connection.get_root()
    root["item"] = Item("a", [1, 2, {"x": (3, 4)}])
    root["item"].child = Item("child")
    connection.commit()

    again = reopen(storage).get_root()
    assert again["item"].name == "a"
    assert again["item"].value == [1, 2, {"x": (3, 4)}]
    assert again["item"].child.name == "child"


def test_abort_reverts_changes_and_forgets_new_objects():
    storage = MemoryStorage()
    connection = Connection(storage)
    root = connection.get_root()
    root["item"] = Item("kept")
    connection.commit()
    root["item"].name = "changed"
    root["extra"] = Item("new")
    connection.abort()
    assert root["item"].name == "kept"
    assert "extra" not in root
    assert not connection.changed


def test_changes_inside_plain_containers_need_note_change():
    storage = MemoryStorage()
    connection = Connection(storage)
    root = connection.get_root()
    root["item"] = item = Item("x", [])
    connection.commit()
    item.value.append(1)
    connection.commit()
    assert reopen(storage).get_root()["item"].value == []
    item.value.append(2)
    item._p_note_change()
    connection.commit()
    assert reopen(storage).get_root()["item"].value == [1, 2]


def test_states_move_through_ghost_saved_unsaved():
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["item"] = Item("x")
    connection.commit()

    fresh = Connection(storage)
    item = fresh.get_root()["item"]
    assert item._p_is_ghost()
    assert item.name == "x"
    assert item._p_is_saved()
    item.name = "y"
    assert item._p_is_unsaved()
    assert item._p_oid in fresh.changed
    del item.name
    fresh.commit()
    assert item._p_is_saved()
    assert not hasattr(reopen(storage).get_root()["item"], "name")


@BOTH_MODES
def test_cache_shrinks_to_its_target_size(item_class):
    storage = MemoryStorage()
    connection = Connection(storage, cache_size=10)
    root = connection.get_root()
    for i in range(100):
        root[i] = item_class(str(i))
    connection.commit()

    reader = Connection(storage, cache_size=10)
    items = [reader.get_root()[i] for i in range(100)]
    for item in items:
        assert item.name
    reader.abort()
    loaded = [item for item in items if not item._p_is_ghost()]
    assert len(loaded) <= 10
    assert [item.name for item in items] == [str(i) for i in range(100)]


def test_unreferenced_objects_leave_the_cache():
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["item"] = Item("x")
    connection.commit()
    reader = Connection(storage, cache_size=1)
    reader.get_root()["item"].name  # noqa: B018
    reader.get_root()._p_set_status_ghost()
    reader.abort()
    gc.collect()
    assert reader.get_cache_count() <= 2


def test_storing_an_object_of_another_connection_is_refused():
    first = Connection(MemoryStorage())
    first.get_root()["item"] = item = Item()
    first.commit()
    second = Connection(MemoryStorage())
    second.get_root()["stolen"] = item
    with pytest.raises(InvalidObjectReference):
        second.commit()


def test_root_class_is_checked():
    storage = MemoryStorage()
    Connection(storage)
    with pytest.raises(StorageError, match="PersistentDict"):
        Connection(storage, root_class=Item)


def test_custom_root_class():
    storage = MemoryStorage()
    root = Connection(storage, root_class=Item).get_root()
    assert isinstance(root, Item)
    assert Connection(storage).get_root().name == ""


def test_census_and_every_instance():
    storage = MemoryStorage()
    connection = Connection(storage)
    for i in range(3):
        connection.get_root()[i] = Item(str(i))
    connection.commit()
    census = get_census(storage)
    assert census[f"{Item.__module__}.Item"] == 3
    assert census["dhruva.persistent_dict.PersistentDict"] == 1
    names = sorted(item.name for item in gen_every_instance(connection, Item))
    assert names == ["0", "1", "2"]


def test_crawler_loads_everything_reachable():
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["a"] = Item("a", Item("b"))
    connection.commit()
    fresh = Connection(storage)
    crawled = list(fresh.get_crawler())
    assert len(crawled) == 3
    assert all(not obj._p_is_ghost() for obj in crawled)


def test_pack_removes_garbage_and_keeps_reachable():
    storage = MemoryStorage()
    connection = Connection(storage)
    root = connection.get_root()
    root["keep"] = Item("keep")
    root["drop"] = Item("drop")
    connection.commit()
    del root["drop"]
    connection.commit()
    assert storage.get_size() == 3
    connection.pack()
    assert storage.get_size() == 2
    assert reopen(storage).get_root()["keep"].name == "keep"


def test_computed_attribute_caches_until_invalidated():
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["total"] = total = ComputedAttribute()
    connection.commit()
    calls = []

    def compute(value):
        calls.append(1)
        return value

    assert total.get(lambda: compute(42)) == 42
    assert total.get(lambda: compute(43)) == 42
    assert total._p_is_saved()
    total.invalidate()
    connection.commit()
    assert total.get(lambda: 7) == 7
    assert len(calls) == 1


class SharedStorage(MemoryStorage):
    """Two clients over one MemoryStorage, with per-client invalidations."""


class _Hub:
    def __init__(self):
        self.storage = MemoryStorage()
        self.clients = []


class HubClient(MemoryStorage):
    invalidating = True

    def __init__(self, hub):
        self.hub = hub
        hub.clients.append(self)
        self.invalid = set()
        self._transaction = None

    def new_oid(self):
        return self.hub.storage.new_oid()

    def load(self, oid):
        if oid in self.invalid:
            raise ReadConflictError([oid])
        return self.hub.storage.load(oid)

    def begin(self):
        self._transaction = {}

    def end(self, handle_invalidations=None):
        if self.invalid and handle_invalidations:
            invalid, self.invalid = list(self.invalid), set()
            handle_invalidations(invalid)
        transaction, self._transaction = self._transaction, None
        self.hub.storage.records.update(transaction)
        for client in self.hub.clients:
            if client is not self:
                client.invalid.update(transaction)

    def sync(self):
        invalid, self.invalid = list(self.invalid), set()
        return invalid


def two_clients(item_class=Item):
    hub = _Hub()
    first = Connection(HubClient(hub))
    first.get_root()["item"] = item_class("start")
    first.commit()
    second = Connection(HubClient(hub))
    return first, second


def test_other_clients_commits_are_seen_after_abort_or_commit():
    first, second = two_clients()
    assert second.get_root()["item"].name == "start"
    first.get_root()["item"].name = "changed"
    first.commit()
    second.abort()
    assert second.get_root()["item"].name == "changed"


def test_write_conflict_then_abort_and_retry():
    first, second = two_clients()
    second.get_root()["item"].name  # noqa: B018 - read in this transaction
    first.get_root()["item"].name = "first"
    first.commit()
    second.get_root()["item"].name = "second"
    with pytest.raises(WriteConflictError) as info:
        second.commit()
    assert info.value.retryable
    assert "Item" in str(info.value)
    second.abort()
    assert second.get_root()["item"].name == "first"
    second.get_root()["item"].name = "second"
    second.commit()
    first.abort()
    assert first.get_root()["item"].name == "second"


def test_read_conflict_when_loading_stale_state():
    first, second = two_clients()
    root = second.get_root()
    item = root["item"]
    item._p_set_status_ghost()
    root["other"] = 1  # the root is read (and written) in this transaction
    first.get_root()["x"] = 2
    first.get_root()["item"].name = "new"
    first.commit()
    with pytest.raises(ReadConflictError):
        item.name  # noqa: B018


def test_new_connection_has_no_conflict_on_an_unread_root():
    first, second = two_clients()
    first.get_root()["x"] = 1
    first.commit()
    second.get_root()["y"] = 2
    second.commit()
    first.abort()
    assert first.get_root()["x"] == 1 and first.get_root()["y"] == 2


def test_touch_every_reference_marks_records_naming_a_word():
    storage = MemoryStorage()
    connection = Connection(storage)
    root = connection.get_root()
    root["a"] = Item("needle-here")
    root["b"] = Item("plain")
    connection.commit()
    fresh = Connection(storage)
    touch_every_reference(fresh, "needle")
    assert [obj.name for obj in fresh.changed.values()] == ["needle-here"]


def test_load_count_counts_state_loads():
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["a"] = Item("a")
    connection.commit()
    fresh = Connection(storage)
    before = fresh.get_load_count()
    fresh.get_root()["a"].name  # noqa: B018
    assert fresh.get_load_count() == before + 2


def test_an_object_removed_by_pack_is_stored_anew_when_reattached():
    storage = MemoryStorage()
    connection = Connection(storage)
    root = connection.get_root()
    root["x"] = victim = Item("victim")
    connection.commit()
    old_oid = victim._p_oid
    del root["x"]
    connection.commit()
    connection.pack()
    assert victim._p_oid is None and victim.name == "victim"
    root["x"] = victim
    connection.commit()
    assert victim._p_oid != old_oid
    assert reopen(storage).get_root()["x"].name == "victim"
    connection.pack()
    assert reopen(storage).get_root()["x"].name == "victim"


def test_a_ghost_whose_record_a_pack_removed_says_so():
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["x"] = Item("gone")
    connection.commit()
    other = Connection(storage)
    ghost = other.get_root()["x"]
    del connection.get_root()["x"]
    connection.commit()
    connection.pack()
    with pytest.raises(RemovedObjectError, match="pack removed it"):
        ghost.name  # noqa: B018


def test_an_unpicklable_value_is_refused_by_name_and_nothing_is_written():
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["item"] = Item("kept")
    connection.commit()
    records = dict(storage.records)
    connection.get_root()["item"].value = lambda: 1
    connection.get_root()["new"] = Item("new")
    with pytest.raises(SerializationError) as info:
        connection.commit()
    message = str(info.value)
    assert "Item" in message and "oid 1" in message and "dill" in message
    assert storage.records == records


def test_a_damaged_record_names_its_oid():
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["item"] = item = Item("x")
    connection.commit()
    oid = item._p_oid
    oid_, data, refs = unpack_record(storage.records[oid])
    storage.records[oid] = pack_record(oid, data[:-5] + b"\xff" * 5, refs)
    with pytest.raises(SerializationError, match=f"oid {int.from_bytes(oid, 'big')}"):
        Connection(storage).get_root()["item"].name  # noqa: B018


@BOTH_MODES
def test_a_read_in_a_later_transaction_still_conflicts(item_class) -> None:
    # The item was loaded in an earlier transaction; reading it again in this
    # one counts as a read, and not reading it does not.
    first, second = two_clients(item_class)
    item = second.get_root()["item"]
    assert item.name == "start"
    second.get_root()["other"] = Item("o")
    second.commit()

    assert item.name == "start"  # read in the new transaction
    first.abort()
    first.get_root()["item"].name = "changed"
    first.commit()
    second.get_root()["other"].name = "o2"
    with pytest.raises(WriteConflictError):
        second.commit()
    second.abort()
    assert item.name == "changed"

    second.commit()  # a new transaction that does not read the item
    first.abort()
    first.get_root()["item"].name = "again"
    first.commit()
    second.get_root()["other"].name = "o3"
    second.commit()
    assert item.name == "again"


def test_a_default_class_is_the_type_of_its_objects_loaded_or_not() -> None:
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["item"] = Item("a")
    connection.commit()

    fresh = Connection(storage)
    item = fresh.get_root()["item"]
    assert type(item) is Item and item._p_is_ghost()
    assert item.name == "a"
    assert type(item) is Item
    fresh.commit()
    assert type(item) is Item and fresh.touched == []
    assert Item._p_fast_reads is False
    assert Item.__subclasses__() == [FastItem]


def test_a_fast_reads_class_shows_its_ghost_class_until_first_access() -> None:
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["item"] = FastItem("a")
    connection.get_root()["child"] = FastChild("c")
    connection.commit()
    assert FastItem._p_fast_reads is True and FastChild._p_fast_reads is True

    fresh = Connection(storage)
    for key, cls in (("item", FastItem), ("child", FastChild)):
        item = fresh.get_root()[key]
        # Before its first access in a transaction the object has its class's
        # ghost class: it compares, hashes and prints as the class itself.
        assert item.__class__ is cls and isinstance(item, cls)
        assert type(item) is not cls
        assert type(item) == cls and hash(type(item)) == hash(cls)  # noqa: E721
        assert type(item).__name__ == cls.__name__ and item._p_is_ghost()
        assert item.name in ("a", "c")
        assert type(item) is cls
    item = fresh.get_root()["item"]
    fresh.commit()
    # The next transaction notes its first read again.
    assert type(item) is not FastItem and item.__class__ is FastItem
    assert not item._p_is_ghost()
    assert item.name == "a" and type(item) is FastItem
    classes = sorted(
        obj.__class__.__name__ for obj in gen_every_instance(fresh, FastItem)
    )
    assert classes == ["FastChild", "FastItem"]


# --- an empty storage whose oid 0 went to someone else -------------------------


def root_record(**items):
    """The record of a PersistentDict root holding ``items``."""
    template = MemoryStorage()
    connection = Connection(template)
    connection.get_root().update(items)
    connection.commit()
    return template.load(ROOT_OID)


def test_a_local_storage_without_root_past_oid_0_fails_at_once(monkeypatch):
    storage = MemoryStorage()
    assert storage.new_oid() == ROOT_OID  # taken, and no root stored

    def no_waiting(seconds):
        raise AssertionError("a local storage must not wait for a root")

    monkeypatch.setattr("dhruva.connection.time.sleep", no_waiting)
    with pytest.raises(StorageError) as raised:
        Connection(storage)
    message = str(raised.value)
    assert "MemoryStorage" in message
    assert "handed out oid 1 first; it is not a valid database" in message


def test_a_shared_storage_waits_for_the_root_another_client_is_creating(
    monkeypatch,
):
    hub = _Hub()
    creator = HubClient(hub)
    assert creator.new_oid() == ROOT_OID  # the creator is about to commit
    record = root_record(made_by="creator")
    sleeps = []

    def creator_commits_meanwhile(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 3:
            creator.begin()
            creator.store(ROOT_OID, record)
            creator.end()

    monkeypatch.setattr("dhruva.connection.time.sleep", creator_commits_meanwhile)
    waiter = Connection(HubClient(hub))
    assert len(sleeps) == 3 and sleeps[0] < sleeps[1] < sleeps[2]
    assert waiter.get_root()["made_by"] == "creator"

    # The waiter commits as any client does; its new objects get fresh oids.
    waiter.get_root()["item"] = item = Item("from the waiter")
    waiter.commit()
    assert item._p_oid not in (ROOT_OID, None)
    assert Connection(HubClient(hub)).get_root()["item"].name == "from the waiter"


def test_a_shared_storage_whose_root_never_comes_fails_after_a_bounded_wait(
    monkeypatch,
):
    hub = _Hub()
    assert HubClient(hub).new_oid() == ROOT_OID  # taken, never committed
    monkeypatch.setattr("dhruva.connection._ROOT_WAIT", 0.2)
    with pytest.raises(StorageError) as raised:
        Connection(HubClient(hub))
    message = str(raised.value)
    assert "HubClient" in message and "handed out oid 1 first" in message
    assert "no other client committed a root within 0.2 seconds" in message
    assert "took oid 0" in message


class ReadOnlyMemory(MemoryStorage):
    readonly = True


def test_a_read_only_empty_storage_has_no_root():
    with pytest.raises(StorageError, match="ReadOnlyMemory is empty and read-only"):
        Connection(ReadOnlyMemory())
