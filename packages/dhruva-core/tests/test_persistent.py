from dhruva.persistent import SAVED, UNSAVED, Persistent, PersistentObject


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
