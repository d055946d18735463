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
        "_getattribute",
        "_setattribute",
        "_delattribute",
    ]
    for name in names:
        assert hasattr(c_module, name), name
    for name in ("GHOST", "SAVED", "UNSAVED"):
        assert getattr(c_module, name) == getattr(dhruva._persistent_py, name)


class Recorder:
    """Collects what persistent objects tell their connection."""

    def __init__(self) -> None:
        self.accessed: list[Any] = []
        self.changed: list[Any] = []
        self.loaded: list[Any] = []


def make_classes(impl: ModuleType) -> tuple[Any, Any]:
    """Return a connection class and an object class built on ``impl``."""

    class FakeConnection(impl.ConnectionBase):  # type: ignore[name-defined]
        def __init__(self) -> None:
            self.log = Recorder()

        def note_access(self, obj: Any) -> None:
            impl._setattribute(obj, "_p_serial", self.transaction_serial)
            self.log.accessed.append(obj)

        def note_change(self, obj: Any) -> None:
            self.log.changed.append(obj)

    class Thing(impl.PersistentBase):  # type: ignore[name-defined]
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
    impl._setattribute(obj, "_p_connection", connection)
    impl._setattribute(obj, "_p_oid", b"\0" * 7 + b"\1")
    impl._setattribute(obj, "_p_status", status)


def test_a_new_object_starts_unsaved_without_connection(impl: ModuleType) -> None:
    _, thing_class = make_classes(impl)
    thing = thing_class(1, two=2)
    assert thing._p_status == impl.UNSAVED
    assert thing._p_serial == 0
    assert thing._p_connection is None
    assert thing._p_oid is None
    thing.value = 3
    assert thing.value == 3


def test_first_read_loads_a_ghost_and_stamps_it(impl: ModuleType) -> None:
    connection_class, thing_class = make_classes(impl)
    connection = connection_class()
    thing = thing_class()
    attach(impl, thing, connection, impl.GHOST)

    assert thing.value == "loaded"
    assert connection.log.loaded == [thing]
    assert connection.log.accessed == [thing]
    assert thing._p_serial == connection.transaction_serial

    # Further reads in the same transaction cost nothing more.
    assert thing.value == "loaded"
    assert connection.log.accessed == [thing]

    # A new transaction stamps again on first read.
    connection.transaction_serial += 1
    assert thing.value == "loaded"
    assert connection.log.accessed == [thing, thing]
    assert connection.log.loaded == [thing]


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


def test_setting_and_deleting_note_the_change_once(impl: ModuleType) -> None:
    connection_class, thing_class = make_classes(impl)
    connection = connection_class()
    thing = thing_class()
    attach(impl, thing, connection, impl.SAVED)

    thing.value = 1
    assert thing._p_status == impl.UNSAVED
    assert connection.log.changed == [thing]
    thing.value = 2
    del thing.value
    assert connection.log.changed == [thing]
    assert not hasattr(thing, "value")

    # _p_ names change nothing.
    impl._setattribute(thing, "_p_status", impl.SAVED)
    thing._p_serial = 7
    assert connection.log.changed == [thing]


def test_setting_on_a_ghost_loads_it_first(impl: ModuleType) -> None:
    connection_class, thing_class = make_classes(impl)
    connection = connection_class()
    thing = thing_class()
    attach(impl, thing, connection, impl.GHOST)
    thing.other = 1
    assert connection.log.loaded == [thing]
    assert thing.__dict__ == {"value": "loaded", "other": 1}
    assert thing._p_status == impl.UNSAVED


def test_an_overridden_note_change_is_always_called(impl: ModuleType) -> None:
    _, thing_class = make_classes(impl)
    calls = []

    class Counting(thing_class):  # type: ignore[misc,valid-type]
        def _p_note_change(self) -> None:
            calls.append(self)

    counting = Counting()
    counting.a = 1
    counting.a = 2
    del counting.a
    assert len(calls) == 3


def test_a_connection_that_is_not_a_connection_base_works(impl: ModuleType) -> None:
    _, thing_class = make_classes(impl)

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
    with pytest.raises(AttributeError):
        _ = thing_class().missing


def test_slotted_subclass_weakrefs_and_gc(impl: ModuleType) -> None:
    connection_class, thing_class = make_classes(impl)

    class Slotted(thing_class):  # type: ignore[misc,valid-type]
        __slots__ = ("x",)

    slotted = Slotted()
    slotted.x = 1
    slotted.y = 2  # the base class gives a __dict__ too
    assert (slotted.x, slotted.y) == (1, 2)

    # An object and its connection in a cycle are collected.
    connection = connection_class()
    attach(impl, slotted, connection, impl.SAVED)
    connection.held = slotted
    reference = weakref.ref(slotted)
    del slotted, connection
    gc.collect()
    assert reference() is None


def test_no_reference_leaks_in_the_hooks(impl: ModuleType) -> None:
    connection_class, thing_class = make_classes(impl)
    connection = connection_class()
    oid = b"\0" * 7 + b"\2"
    value = object()
    thing = thing_class()
    attach(impl, thing, connection, impl.SAVED)
    impl._setattribute(thing, "_p_oid", oid)
    connection.log = Recorder()

    before = (sys.getrefcount(connection), sys.getrefcount(oid))
    before_value = sys.getrefcount(value)
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
        sink.clear()
    assert (sys.getrefcount(connection), sys.getrefcount(oid)) == before
    assert sys.getrefcount(value) == before_value

    # Creating and dropping objects frees them.
    references = []
    for _ in range(1000):
        other = thing_class()
        attach(impl, other, connection, impl.SAVED)
        references.append(weakref.ref(connection))
    del other
    assert sys.getrefcount(connection) == before[0]


def test_private_setters_reject_a_wrong_type_or_accept_any(impl: ModuleType) -> None:
    _, thing_class = make_classes(impl)
    thing = thing_class()
    impl._setattribute(thing, "_p_serial", 12)
    assert thing._p_serial == 12
    impl._setattribute(thing, "_p_oid", b"x" * 8)
    assert thing._p_oid == b"x" * 8
    impl._delattribute(thing, "_p_oid")
    with pytest.raises(AttributeError):
        _ = thing._p_oid


class Item(Persistent):
    pass


class Point(PersistentObject):
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
    assert rich.shout == "HEY"
    assert connection.log.loaded == []
    assert rich.doubled == "loadedloaded"
    assert connection.log.loaded == [rich]
    assert rich.nothing == "missing nothing"
    assert connection.log.accessed == [rich]
