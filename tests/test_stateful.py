"""A Connection and its storage against a plain model, through random steps.

Hypothesis drives a :class:`~dhruva.connection.Connection` through random
sequences of changes (new objects, values set directly or through a
reference held by another object, links, objects dropped from the root),
commits, aborts, reopens and packs. A plain in-memory model says what the
application must see after each step; after every step the objects reached
from the root are compared with it. Objects reachable only through links
must survive packs; aborted changes must be gone; committed ones must
survive a reopen. After each pack, :func:`dhruva.verify.verify_storage`
must find the storage sound.

``DHRUVA_LONG_TESTS=1`` runs many more examples.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dhruva.connection import Connection
from dhruva.file_storage import FileStorage
from dhruva.persistent_dict import PersistentDict
from dhruva.storage import MemoryStorage, Storage
from dhruva.verify import verify_storage
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

LONG = os.environ.get("DHRUVA_LONG_TESTS") == "1"

KEYS = st.sampled_from("abc")
VALUES = st.integers(-1000, 1000)


@dataclass
class Model:
    """What the application should see: named objects, values, links."""

    #: Name in the root's ``items`` -> object id.
    names: dict[str, int] = field(default_factory=dict)
    #: Object id -> value (objects no longer named stay, if linked).
    values: dict[int, int] = field(default_factory=dict)
    #: Object id -> the id of the object its ``link`` holds.
    links: dict[int, int] = field(default_factory=dict)


class ConnectionMachine(RuleBasedStateMachine):
    """Steps on one database; subclasses choose the storage."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.TemporaryDirectory(prefix="dhruva-stateful-")
        self.path = Path(self.directory.name) / "db"
        self.memory = MemoryStorage()
        self.committed = Model()
        self.working = Model()
        self.next_id = 0
        self.connection = Connection(self.open_storage())
        self.root["items"] = PersistentDict()
        self.connection.commit()

    def open_storage(self) -> Storage:
        raise NotImplementedError

    def open_reader(self) -> Storage:
        """Open the committed database a second time, to read it."""
        raise NotImplementedError

    @property
    def root(self) -> Any:
        return self.connection.get_root()

    def item(self, name: str) -> Any:
        return self.root["items"][name]

    def teardown(self) -> None:
        self.connection.close()
        self.directory.cleanup()

    # --- changes ------------------------------------------------------------------

    @rule(name=KEYS, value=VALUES)
    def new_object(self, name: str, value: int) -> None:
        self.next_id += 1
        self.root["items"][name] = PersistentDict(
            id=self.next_id, value=value, link=None
        )
        self.working.names[name] = self.next_id
        self.working.values[self.next_id] = value

    def pick(self, data: st.DataObject, *, linked: bool = False) -> str:
        names = sorted(
            name
            for name, ident in self.working.names.items()
            if not linked or ident in self.working.links
        )
        return data.draw(st.sampled_from(names))

    @precondition(lambda self: bool(self.working.names))
    @rule(data=st.data(), value=VALUES)
    def set_value(self, data: st.DataObject, value: int) -> None:
        name = self.pick(data)
        self.item(name)["value"] = value
        self.working.values[self.working.names[name]] = value

    @precondition(
        lambda self: not set(self.working.names.values()).isdisjoint(self.working.links)
    )
    @rule(data=st.data(), value=VALUES)
    def set_value_through_a_link(self, data: st.DataObject, value: int) -> None:
        name = self.pick(data, linked=True)
        self.item(name)["link"]["value"] = value
        self.working.values[self.working.links[self.working.names[name]]] = value

    @precondition(lambda self: bool(self.working.names))
    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        holder, held = self.pick(data), self.pick(data)
        self.item(holder)["link"] = self.item(held)
        self.working.links[self.working.names[holder]] = self.working.names[held]

    @precondition(lambda self: bool(self.working.names))
    @rule(data=st.data())
    def drop_name(self, data: st.DataObject) -> None:
        name = self.pick(data)
        del self.root["items"][name]
        del self.working.names[name]

    # --- transactions ----------------------------------------------------------------

    @rule()
    def commit(self) -> None:
        self.connection.commit()
        self.committed = copy.deepcopy(self.working)

    @rule()
    def abort(self) -> None:
        self.connection.abort()
        self.working = copy.deepcopy(self.committed)

    @rule()
    def reopen(self) -> None:
        self.connection.close()
        self.connection = Connection(self.open_storage())
        self.working = copy.deepcopy(self.committed)

    @precondition(lambda self: self.working == self.committed)
    @rule()
    def pack(self) -> None:
        self.connection.pack()
        report = verify_storage(self.connection.get_storage())
        assert report.sound, report.as_dict()

        # A new connection, with nothing cached, reads every object.
        reader = Connection(self.open_reader())
        try:
            self.check(reader.get_root(), self.committed)
        finally:
            reader.close()

    # --- the check -------------------------------------------------------------------

    @invariant()
    def objects_match_the_model(self) -> None:
        self.check(self.root, self.working)

    @staticmethod
    def check(root: Any, model: Model) -> None:
        items = root["items"]
        assert sorted(items.keys()) == sorted(model.names)
        for name, ident in model.names.items():
            obj = items[name]
            assert obj["id"] == ident
            assert obj["value"] == model.values[ident], name
            if ident in model.links:
                linked = obj["link"]
                assert linked["id"] == model.links[ident]
                assert linked["value"] == model.values[model.links[ident]]
            else:
                assert obj["link"] is None


_settings = settings(
    max_examples=300 if LONG else 10,
    stateful_step_count=60 if LONG else 35,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class MemoryMachine(ConnectionMachine):
    def open_storage(self) -> Storage:
        return self.memory  # a reopen is a new connection on the same records

    def open_reader(self) -> Storage:
        return self.memory


class FileMachine(ConnectionMachine):
    def open_storage(self) -> Storage:
        return FileStorage(self.path)

    def open_reader(self) -> Storage:
        return FileStorage(self.path, readonly=True)


class CheckedFileMachine(ConnectionMachine):
    def open_storage(self) -> Storage:
        return FileStorage(self.path, format="dhruva")

    def open_reader(self) -> Storage:
        return FileStorage(self.path, readonly=True)


TestMemoryStorage = _settings(MemoryMachine).TestCase
TestFileStorage = _settings(FileMachine).TestCase
TestCheckedFileStorage = _settings(CheckedFileMachine).TestCase
