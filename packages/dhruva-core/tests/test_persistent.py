from typing import Any

import pytest
from dhruva.connection import Connection
from dhruva.persistent import (
    GHOST_CLASS_MARK,
    SAVED,
    UNSAVED,
    Persistent,
    PersistentObject,
)
from dhruva.storage import MemoryStorage


class Item(Persistent):
    pass


class Slotted(PersistentObject):
    __slots__ = ("x", "y")


def test_new_object_is_unsaved_and_keeps_attributes():
    item = Item()
    item.name = "a"
    assert item._p_is_unsaved()
    assert item._p_status == UNSAVED
    assert item.__getstate__() == {"name": "a"}


def test_slotted_state_holds_only_filled_slots():
    point = Slotted()
    point.x = 3
    assert point.__getstate__() == {"x": 3}
    point.__setstate__({"y": 4})
    assert point.__getstate__() == {"y": 4}
    point._p_set_status_saved()
    assert point._p_status == SAVED


# A user's subclass registry, as applications keep them.
registry: list[type] = []


class Registered(Persistent):
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        registry.append(cls)


class Plugin(Registered):
    pass


class FastPlugin(Registered, fast_reads=True):
    pass


def test_a_default_class_sees_only_its_user_subclasses() -> None:
    assert registry == [Plugin, FastPlugin]  # the keyword reaches no user hook
    storage = MemoryStorage()
    writer = Connection(storage)
    writer.get_root()["plugins"] = [Plugin(), Plugin()]
    writer.commit()

    for _ in range(2):
        reader = Connection(storage)
        plugins = reader.get_root()["plugins"]
        assert [type(p) for p in plugins] == [Plugin, Plugin]
        plugins[0].name = "x"
        reader.commit()
        reader.abort()
        assert [type(p) for p in plugins] == [Plugin, Plugin]
    # __init_subclass__ ran once for each class the user wrote, and no more.
    assert registry == [Plugin, FastPlugin]
    assert Registered.__subclasses__() == [Plugin, FastPlugin]
    assert Plugin.__subclasses__() == []


def test_a_fast_reads_class_makes_one_ghost_class_when_it_is_loaded() -> None:
    storage = MemoryStorage()
    writer = Connection(storage)
    writer.get_root()["plugin"] = FastPlugin()
    writer.commit()
    before = list(registry)
    for _ in range(2):
        plugin = Connection(storage).get_root()["plugin"]
        assert plugin.__class__ is FastPlugin and type(plugin) is not FastPlugin
    # As documented: the ghost class is made once, through __init_subclass__.
    made = [cls for cls in registry if cls not in before]
    assert len(made) <= 1 and all(GHOST_CLASS_MARK in cls.__dict__ for cls in made)
    ghosts = [c for c in FastPlugin.__subclasses__() if GHOST_CLASS_MARK in c.__dict__]
    assert len(ghosts) == 1 and ghosts[0]._p_fast_reads is True


def test_fast_reads_is_inherited_and_can_be_turned_off() -> None:
    class Child(FastPlugin):
        pass

    class Slow(FastPlugin, fast_reads=False):
        pass

    assert (Child._p_fast_reads, Slow._p_fast_reads) == (True, False)
    assert Child.__getattribute__ is object.__getattribute__
    assert Slow.__getattribute__ is Persistent.__getattribute__
    with pytest.raises(TypeError):

        class Wrong(Persistent, shout=True):
            pass
