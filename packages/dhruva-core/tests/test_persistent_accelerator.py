"""The C accelerator and its pure-Python fallback behave the same.

Each behaviour test runs against both :mod:`dhruva._persistent` (when it is
built) and :mod:`dhruva._persistent_py`, with small classes built on each
module's ``PersistentBase`` and a connection that records what it is told.
The whole test suite also runs with ``DHRUVA_PURE_PYTHON=1`` (see
``tests/test_pure_python.py`` at the repository root).
"""

from __future__ import annotations

import copy
import gc
import importlib
import os
import pickle
import shutil
import sys
import sysconfig
import weakref
from types import ModuleType
from typing import Any

import dhruva._persistent_py
import dhruva.persistent
import pytest
from dhruva.connection import Connection
from dhruva.persistent import Persistent, PersistentObject
from dhruva.storage import MemoryStorage


def _c_module() -> ModuleType | None:
    try:
        return importlib.import_module("dhruva._persistent")
    except ImportError:
        return None


def _compiler_exists() -> bool:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(compiler) is not None


IMPLEMENTATIONS = [
    pytest.param(dhruva._persistent_py, id="python"),
    pytest.param(
        _c_module(),
        id="c",
        marks=pytest.mark.skipif(
            _c_module() is None, reason="the C accelerator is not built here"
        ),
    ),
]


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    module: ModuleType = request.param
    return module


@pytest.fixture(params=[False, True], ids=["default", "fast_reads"])
def fast_reads(request: pytest.FixtureRequest) -> bool:
    """Both read modes, for the tests whose behaviour they share."""
    value: bool = request.param
    return value


def test_the_c_accelerator_is_used_where_a_compiler_exists() -> None:
    if os.environ.get("DHRUVA_PURE_PYTHON"):
        assert dhruva.persistent.PersistentBase.__module__ == "dhruva._persistent_py"
    elif _compiler_exists():
        assert dhruva.persistent.PersistentBase.__module__ == "dhruva._persistent", (
            "a C compiler is present but dhruva._persistent is not built: "
            "run `uv sync --reinstall-package dhruva-core`"
        )
    else:
        pytest.skip("no C compiler: the pure-Python fallback is expected")


def test_both_modules_offer_the_same_names() -> None:
    c_module = _c_module()
    if c_module is None:
        pytest.skip("the C accelerator is not built here")
    names = [
        "GHOST",
        "SAVED",
        "UNSAVED",
        "ConnectionBase",
        "PersistentBase",
        "GhostBase",
        "_getattribute",
        "_setattribute",
        "_delattribute",
        "_ghost_class",
        "_user_class",
        "_untouch",
        "_untouch_all",
        "_retouch",
    ]
    for name in names:
        assert hasattr(c_module, name), name
        assert hasattr(dhruva._persistent_py, name), name
    for name in ("GHOST", "SAVED", "UNSAVED"):
        assert getattr(c_module, name) == getattr(dhruva._persistent_py, name)


class Recorder:
    """Collects what persistent objects tell their connection."""

    def __init__(self) -> None:
        self.accessed: list[Any] = []
        self.changed: list[Any] = []
        self.loaded: list[Any] = []


def make_classes(impl: ModuleType, fast_reads: bool = True) -> tuple[Any, Any]:
    """Return a connection class and an object class built on ``impl``.

    The object class is a ``fast_reads`` one unless told otherwise.
    """

    class FakeConnection(impl.ConnectionBase):  # type: ignore[name-defined]
        def __init__(self) -> None:
            self.log = Recorder()

        def note_access(self, obj: Any) -> None:
            impl._setattribute(obj, "_p_serial", self.transaction_serial)
            self.log.accessed.append(obj)

        def note_change(self, obj: Any) -> None:
            self.log.changed.append(obj)

        def end_transaction(self) -> None:
            impl._untouch_all(self.log.accessed)
            self.transaction_serial += 1

    class Thing(impl.PersistentBase, fast_reads=fast_reads):  # type: ignore[name-defined,call-arg,unused-ignore]
        def _p_load_state(self) -> None:
            connection = impl._getattribute(self, "_p_connection")
            connection.log.loaded.append(self)
            impl._getattribute(self, "__dict__")["value"] = "loaded"
            impl._setattribute(self, "_p_status", impl.SAVED)

        def _p_set_status_unsaved(self) -> None:
            if impl._getattribute(self, "_p_status") == impl.GHOST:
                self._p_load_state()
            impl._setattribute(self, "_p_status", impl.UNSAVED)

        def __repr__(self) -> str:
            return "<Thing>"

        def __setstate__(self, state: Any) -> None:
            impl._getattribute(self, "__dict__").update(state)

    return FakeConnection, Thing


def attach(impl: ModuleType, obj: Any, connection: Any, status: int) -> None:
    """Make ``obj`` a stored object of ``connection``, not touched yet."""
    impl._setattribute(obj, "_p_connection", connection)
    impl._setattribute(obj, "_p_oid", b"\0" * 7 + b"\1")
    impl._setattribute(obj, "_p_status", status)
    impl._untouch(obj)


def test_a_new_object_starts_unsaved_without_connection(
    impl: ModuleType, fast_reads: bool
) -> None:
    _, thing_class = make_classes(impl, fast_reads)
    thing = thing_class(1, two=2)
    assert type(thing) is thing_class
    assert thing._p_status == impl.UNSAVED
    assert thing._p_serial == 0
    assert thing._p_connection is None
    assert thing._p_oid is None
    thing.value = 3
    assert thing.value == 3


def test_a_default_class_loads_and_notes_reads_through_its_own_hook(
    impl: ModuleType,
) -> None:
    connection_class, thing_class = make_classes(impl, fast_reads=False)
    assert thing_class._p_fast_reads is False
    assert thing_class.__getattribute__ is impl.PersistentBase.__getattribute__
    connection = connection_class()
    thing = thing_class()
    attach(impl, thing, connection, impl.GHOST)
    assert type(thing) is thing_class
    assert impl._ghost_class(thing_class) is thing_class

    assert thing.__class__ is thing_class and connection.log.loaded == []
    assert thing.value == "loaded"
    assert type(thing) is thing_class
    assert connection.log.loaded == [thing]
    assert connection.log.accessed == [thing]
    assert thing.value == "loaded"
    assert connection.log.accessed == [thing]

    # A new transaction notes the first read again; untouching changes nothing.
    connection.end_transaction()
    assert type(thing) is thing_class
    assert thing.value == "loaded"
    assert connection.log.accessed == [thing, thing]
    assert connection.log.loaded == [thing]
    assert type(thing) is thing_class and thing_class.__subclasses__() == []


def test_first_read_loads_a_ghost_and_stamps_it(impl: ModuleType) -> None:
    connection_class, thing_class = make_classes(impl)
    connection = connection_class()
    thing = thing_class()
    attach(impl, thing, connection, impl.GHOST)
    assert type(thing) is not thing_class

    assert thing.value == "loaded"
    assert type(thing) is thing_class
    assert connection.log.loaded == [thing]
    assert connection.log.accessed == [thing]
    assert thing._p_serial == connection.transaction_serial

    # Further reads in the same transaction cost nothing more.
    assert thing.value == "loaded"
    assert connection.log.accessed == [thing]

    # A new transaction notes the first read again, and loads nothing.
    connection.end_transaction()
    assert type(thing) is not thing_class
    assert thing.value == "loaded"
    assert connection.log.accessed == [thing, thing]
    assert connection.log.loaded == [thing]
    assert type(thing) is thing_class


def test_a_ghost_answers_its_class_and_compares_as_it(impl: ModuleType) -> None:
    connection_class, thing_class = make_classes(impl)
    thing = thing_class()
    attach(impl, thing, connection_class(), impl.GHOST)

    ghost_class = type(thing)
    assert ghost_class is impl._ghost_class(thing_class)
    assert impl._ghost_class(ghost_class) is ghost_class
    assert impl._user_class(thing) is thing_class
    assert thing.__class__ is thing_class
    assert isinstance(thing, thing_class)
    assert ghost_class == thing_class and thing_class == ghost_class  # noqa: E721
    assert not (ghost_class != thing_class)  # noqa: SIM202 - __ne__ too
    assert hash(ghost_class) == hash(thing_class)
    assert ghost_class in {thing_class} and {ghost_class: 1}[thing_class] == 1
    assert ghost_class.__name__ == thing_class.__name__
    assert ghost_class.__qualname__ == thing_class.__qualname__
    assert ghost_class.__module__ == thing_class.__module__
    assert thing._p_status == impl.GHOST  # none of this loaded it

    # type(obj)(...) makes an instance of the class itself, __init__ and all.
    made = ghost_class(1, two=2)
    assert type(made) is thing_class and made._p_status == impl.UNSAVED


def test_ghost_safe_names_and_p_names_do_not_load(impl: ModuleType) -> None:
    connection_class, thing_class = make_classes(impl)
    connection = connection_class()
    thing = thing_class()
    attach(impl, thing, connection, impl.GHOST)

    assert thing.__class__ is thing_class
    assert repr(thing) == "<Thing>"
    assert thing.__repr__() == "<Thing>"
    assert thing._p_status == impl.GHOST
    thing.__setstate__({"other": 1})
    assert connection.log.loaded == []
    assert connection.log.accessed == []


def test_setting_and_deleting_note_the_change_once(
    impl: ModuleType, fast_reads: bool
) -> None:
    connection_class, thing_class = make_classes(impl, fast_reads)
    connection = connection_class()
    thing = thing_class()
    attach(impl, thing, connection, impl.SAVED)

    thing.value = 1
    assert thing._p_status == impl.UNSAVED
    assert type(thing) is thing_class
    assert connection.log.changed == [thing]
    thing.value = 2
    del thing.value
    assert connection.log.changed == [thing]
    assert not hasattr(thing, "value")

    # _p_ names change nothing.
    impl._setattribute(thing, "_p_status", impl.SAVED)
    thing._p_serial = 7
    assert connection.log.changed == [thing]


def test_setting_on_a_ghost_loads_it_first(impl: ModuleType, fast_reads: bool) -> None:
    connection_class, thing_class = make_classes(impl, fast_reads)
    connection = connection_class()
    thing = thing_class()
    attach(impl, thing, connection, impl.GHOST)
    thing.other = 1
    assert connection.log.loaded == [thing]
    assert thing.__dict__ == {"value": "loaded", "other": 1}
    assert thing._p_status == impl.UNSAVED
    assert type(thing) is thing_class
    assert connection.log.changed == [thing]


def test_an_explicit_note_change_touches_a_ghost(
    impl: ModuleType, fast_reads: bool
) -> None:
    connection_class, thing_class = make_classes(impl, fast_reads)
    connection = connection_class()
    thing = thing_class()
    attach(impl, thing, connection, impl.GHOST)
    thing._p_note_change()
    assert connection.log.loaded == [thing]
    assert connection.log.changed == [thing]
    assert type(thing) is thing_class and thing._p_status == impl.UNSAVED


def test_an_overridden_note_change_is_always_called(
    impl: ModuleType, fast_reads: bool
) -> None:
    _, thing_class = make_classes(impl, fast_reads)
    calls = []

    class Counting(thing_class):  # type: ignore[misc,valid-type]
        def _p_note_change(self) -> None:
            calls.append(self)

    counting = Counting()
    counting.a = 1
    counting.a = 2
    del counting.a
    assert len(calls) == 3


def test_a_connection_that_is_not_a_connection_base_works(
    impl: ModuleType, fast_reads: bool
) -> None:
    _, thing_class = make_classes(impl, fast_reads)

    class Duck:
        transaction_serial = 5

        def __init__(self) -> None:
            self.log = Recorder()

        def note_access(self, obj: Any) -> None:
            impl._setattribute(obj, "_p_serial", self.transaction_serial)
            self.log.accessed.append(obj)

    duck = Duck()
    thing = thing_class()
    attach(impl, thing, duck, impl.GHOST)
    assert thing.value == "loaded"
    assert thing.value == "loaded"
    assert duck.log.accessed == [thing]
    assert thing._p_serial == 5


def test_errors_in_hooks_propagate(impl: ModuleType) -> None:
    connection_class, thing_class = make_classes(impl)

    class Failing(thing_class):  # type: ignore[misc,valid-type]
        def _p_load_state(self) -> None:
            raise OSError("disk gone")

    thing = Failing()
    attach(impl, thing, connection_class(), impl.GHOST)
    with pytest.raises(OSError, match="disk gone"):
        _ = thing.value
    assert type(thing) is not Failing  # still a ghost: the next access retries
    with pytest.raises(OSError, match="disk gone"):
        _ = thing.value
    with pytest.raises(AttributeError):
        _ = thing_class().missing


def test_untouching_keeps_attributes_of_every_layout(impl: ModuleType) -> None:
    connection_class, thing_class = make_classes(impl)

    class Slotted(thing_class):  # type: ignore[misc,valid-type]
        __slots__ = ("x",)

    connection = connection_class()
    for cls in (thing_class, Slotted):
        for count in (1, 3, 40):  # inline values, and more than fit inline
            obj = cls()
            expected = {f"a{i}": i for i in range(count)}
            for name, value in expected.items():
                setattr(obj, name, value)
            if cls is Slotted:
                obj.x = "slot"
            attach(impl, obj, connection, impl.SAVED)
            for _ in range(3):
                assert type(obj) is not cls
                assert {name: getattr(obj, name) for name in expected} == expected
                assert type(obj) is cls
                if cls is Slotted:
                    assert obj.x == "slot"
                obj.extra = 1
                del obj.extra
                impl._untouch(obj)
            impl._retouch(obj)
            assert type(obj) is cls and vars(obj) == expected


def test_slotted_subclass_weakrefs_and_gc(impl: ModuleType, fast_reads: bool) -> None:
    connection_class, thing_class = make_classes(impl, fast_reads)

    class Slotted(thing_class):  # type: ignore[misc,valid-type]
        __slots__ = ("x",)

    slotted = Slotted()
    slotted.x = 1
    slotted.y = 2  # the base class gives a __dict__ too
    assert (slotted.x, slotted.y) == (1, 2)

    # An object and its connection in a cycle are collected, ghost or not.
    for status in (impl.SAVED, impl.GHOST):
        obj = Slotted()
        connection = connection_class()
        attach(impl, obj, connection, status)
        connection.held = obj
        reference = weakref.ref(obj)
        del obj, connection
        gc.collect()
        assert reference() is None


def test_no_reference_leaks_in_the_hooks(impl: ModuleType, fast_reads: bool) -> None:
    connection_class, thing_class = make_classes(impl, fast_reads)
    connection = connection_class()
    oid = b"\0" * 7 + b"\2"
    value = object()
    thing = thing_class()
    attach(impl, thing, connection, impl.SAVED)
    impl._setattribute(thing, "_p_oid", oid)
    connection.log = Recorder()
    ghost_class = type(thing)

    before = (sys.getrefcount(connection), sys.getrefcount(oid))
    before_value = sys.getrefcount(value)
    before_classes = (sys.getrefcount(thing_class), sys.getrefcount(ghost_class))
    sink = []
    for serial in range(2, 2000):
        connection.transaction_serial = serial
        thing.attr = value
        sink.append(thing.attr)
        sink.append(thing._p_oid)
        sink.append(thing._p_connection)
        del thing.attr
        impl._setattribute(thing, "_p_status", impl.SAVED)
        connection.log = Recorder()
        impl._untouch_all([thing])
        sink.clear()
    assert (sys.getrefcount(connection), sys.getrefcount(oid)) == before
    assert sys.getrefcount(value) == before_value
    assert (sys.getrefcount(thing_class), sys.getrefcount(ghost_class)) == (
        before_classes
    )

    # Creating and dropping objects frees them.
    references = []
    for _ in range(1000):
        other = thing_class()
        attach(impl, other, connection, impl.SAVED)
        references.append(weakref.ref(connection))
    del other
    assert sys.getrefcount(connection) == before[0]


def test_private_setters_reject_a_wrong_type_or_accept_any(
    impl: ModuleType, fast_reads: bool
) -> None:
    _, thing_class = make_classes(impl, fast_reads)
    thing = thing_class()
    impl._setattribute(thing, "_p_serial", 12)
    assert thing._p_serial == 12
    impl._setattribute(thing, "_p_oid", b"x" * 8)
    assert thing._p_oid == b"x" * 8
    impl._delattribute(thing, "_p_oid")
    with pytest.raises(AttributeError):
        _ = thing._p_oid


def test_only_persistent_classes_have_ghost_classes(impl: ModuleType) -> None:
    with pytest.raises(TypeError):
        impl._ghost_class(int)
    with pytest.raises(TypeError):
        impl._untouch(object())


class Item(Persistent):
    pass


class Point(PersistentObject):
    __slots__ = ("x", "y")


class FastItem(Persistent, fast_reads=True):
    pass


class FastPoint(PersistentObject, fast_reads=True):
    __slots__ = ("x", "y")


def test_persistent_objects_pickle_and_copy_as_unsaved_copies() -> None:
    connection = Connection(MemoryStorage())
    item = Item()
    item.name = "a"
    point = Point()
    point.x = 1
    connection.root["item"] = item
    connection.root["point"] = point
    connection.commit()

    clone = pickle.loads(pickle.dumps(item))
    assert clone.name == "a"
    assert clone._p_oid is None and clone._p_connection is None
    assert clone._p_is_unsaved()
    point_copy = copy.copy(point)
    assert point_copy.x == 1 and point_copy._p_oid is None
    assert weakref.ref(item)() is item

    # Ghosts copy and pickle as their own class, in both read modes.
    connection.root["fast_item"] = FastItem()
    connection.root["fast_item"].name = "b"
    fast_point = connection.root["fast_point"] = FastPoint()
    fast_point.x = 2
    connection.commit()
    fresh = Connection(connection.storage).get_root()
    for name, cls in (
        ("item", Item),
        ("point", Point),
        ("fast_item", FastItem),
        ("fast_point", FastPoint),
    ):
        ghost = fresh[name]
        assert ghost._p_is_ghost()
        assert (type(ghost) is cls) is (not cls._p_fast_reads)
        assert type(copy.copy(ghost)) is cls
        assert type(pickle.loads(pickle.dumps(ghost))) is cls
    assert fresh["item"].name == "a" and fresh["point"].x == 1
    assert fresh["fast_item"].name == "b" and fresh["fast_point"].x == 2


def test_properties_getattr_and_getattribute_in_subclasses(impl: ModuleType) -> None:
    connection_class, thing_class = make_classes(impl)

    class Rich(thing_class):  # type: ignore[misc,valid-type]
        @property
        def doubled(self) -> str:
            return str(self.value) * 2

        def __getattr__(self, name: str) -> str:
            return f"missing {name}"

        def __getattribute__(self, name: str) -> Any:
            if name == "shout":
                return "HEY"
            return super().__getattribute__(name)

    connection = connection_class()
    rich = Rich()
    attach(impl, rich, connection, impl.GHOST)
    # The ghost's hook runs before the class's own __getattribute__.
    assert rich.shout == "HEY"
    assert connection.log.loaded == [rich]
    assert rich.doubled == "loadedloaded"
    assert connection.log.loaded == [rich]
    assert rich.nothing == "missing nothing"
    assert connection.log.accessed == [rich]
    assert type(rich) is Rich

    # A ghost of a class with __getattr__ still loads on first access.
    connection.end_transaction()
    impl._setattribute(rich, "_p_status", impl.GHOST)
    assert rich.nothing == "missing nothing"
    assert connection.log.loaded == [rich, rich]
