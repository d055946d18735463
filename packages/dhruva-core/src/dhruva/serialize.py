"""Turning persistent objects into object records and back, with pickle.

The record data is two pickles written by one pickler: the object's class,
then its state (zlib-compressed when that is smaller). A reference to another
persistent object is a pickle persistent id ``(oid, class)``. This is the
layout Durus writes, so Durus databases load unchanged.

Classes stored under a ``durus.*`` module name load as the dhruva class of the
same name (``durus.persistent_dict.PersistentDict`` loads as
:class:`dhruva.persistent_dict.PersistentDict`).

dhruva's own classes are written under their Durus names, so Durus can still
load what dhruva stores in a Durus database: an object's own class as a plain
global, and a class inside a state (the class of a referenced object) as
``getattr(importlib.import_module("durus.module"), "Name")``, which both
Durus and dhruva resolve without needing the other installed.

Record data that starts with a zero byte was written by another serializer
(see :mod:`dhruva.serializer`); :class:`ObjectReader` hands it to that
serializer's reader, so every connection reads every record.

A class that cannot be found loads as a placeholder (see :mod:`dhruva.broken`).
A connection's :class:`~dhruva.serializer.LoadPolicy` adds a rename table and
an opt-in restricted mode (see :mod:`dhruva.restricted`).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import pickle
import pickletools
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dhruva.broken import (
    BROKEN_TYPES,
    BrokenState,
    broken_class,
    broken_record,
)
from dhruva.broken import find_class as broken_find_class
from dhruva.error import InvalidObjectReference, StorageError
from dhruva.persistent import (
    GHOST,
    PersistentBase,
    _ghost_class,
    _persistent_id_filter,
    _setattribute,
    _user_class,
)
from dhruva.record import pack_record, unpack_record
from dhruva.registry import PluginError
from dhruva.serializer import (
    DEFAULT_POLICY,
    TAG_START,
    LoadPolicy,
    MissingSerializerError,
    RecordReader,
    SerializationError,
    Serializer,
    resolve_serializer,
    split_tagged,
)

if TYPE_CHECKING:
    from dhruva.connection import Connection

log = logging.getLogger(__name__)

#: Pickle protocol of the records written; 2 is what Durus reads and writes.
PICKLE_PROTOCOL = 2

#: States shorter than this are stored uncompressed.
COMPRESS_THRESHOLD = 64

_ZLIB_START = 0x78

#: Module renames applied when loading classes, oldest name first.
MODULE_RENAMES = {"durus": "dhruva"}


def extract_class_name(record: bytes) -> str:
    """Return ``module.Class`` of the object in a record, without unpickling.

    Durus's own classes are named as their dhruva equivalents.
    """
    _oid, data, _refs = unpack_record(record)
    return _class_name_of_data(data)


def _class_name_of_data(data: bytes) -> str:
    if data[:1] == TAG_START:
        return split_tagged(data)[1].replace(":", ".", 1)
    # Protocol 2 writes a class as: PROTO 2, GLOBAL "module\nname\n", ...
    if data[:3] == b"\x80\x02c":
        parts = data[3:].split(b"\n", 2)
        if len(parts) == 3:
            module = rename_module(parts[0].decode("latin-1"))
            return f"{module}.{parts[1].decode('latin-1')}"
    try:
        cls = _RenamingUnpickler(io.BytesIO(data)).load()
        return f"{cls.__module__}.{cls.__qualname__}"
    except Exception:
        return "?"


def check_pickle_data(data: bytes) -> None:
    """Check that untagged record data parses: a class pickle, then a state.

    Only the structure is read (no class is looked up, nothing runs), so data
    whose bytes were overwritten (zeros, say) is found even in files that
    keep no checksums.

    :raises ValueError: saying what does not parse.
    """
    try:
        ops = pickletools.genops(data)
        end = next(pos or 0 for op, _arg, pos in ops if op.name == "STOP") + 1
        state = data[end:]
        if state[:1] == bytes([_ZLIB_START]):
            with contextlib.suppress(zlib.error):  # else a 0x78 opcode
                state = zlib.decompress(state)
        last = None
        for op, _arg, _pos in pickletools.genops(state):
            last = op.name
        if last != "STOP":
            raise ValueError("the state pickle does not end")
    except (ValueError, StopIteration, EOFError) as error:
        raise ValueError(
            f"the record data does not parse as pickles: {error}"
        ) from None


def rename_module(module: str) -> str:
    """Return the module name a stored class name should be looked up under."""
    head, _, rest = module.partition(".")
    new_head = MODULE_RENAMES.get(head)
    if new_head is None:
        return module
    return f"{new_head}.{rest}" if rest else new_head


def _import_renamed(module: str) -> Any:
    return importlib.import_module(rename_module(module))


class _RenamingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "importlib" and name == "import_module":
            return _import_renamed
        if module == "dhruva.broken" and name == "find_class":
            return self.find_class
        try:
            return super().find_class(rename_module(module), name)
        except (ImportError, AttributeError):
            return broken_class(module, name)


#: The Durus modules that have dhruva equivalents, with their class names.
_DURUS_CLASSES = {
    "persistent": ("Persistent", "PersistentObject", "ComputedAttribute"),
    "persistent_dict": ("PersistentDict",),
    "persistent_list": ("PersistentList",),
    "persistent_set": ("PersistentSet",),
    "btree": ("BTree", "BNode") + tuple(f"BNode{2**i}" for i in range(2, 10)),
}

_durus_names: dict[type, tuple[str, str]] | None = None


def durus_names() -> dict[type, tuple[str, str]]:
    """Map each dhruva class Durus also has to its Durus ``(module, name)``."""
    global _durus_names
    if _durus_names is None:
        names = {}
        for module_name, class_names in _DURUS_CLASSES.items():
            module = importlib.import_module(f"dhruva.{module_name}")
            for class_name in class_names:
                names[getattr(module, class_name)] = (
                    f"durus.{module_name}",
                    class_name,
                )
        _durus_names = names
    return _durus_names


class _ModuleRef:
    """Stands for a module inside a pickle: ``importlib.import_module(name)``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _DurusNamingPickler(pickle.Pickler):
    """Writes dhruva's classes under their Durus names (see the module doc)."""

    # ObjectWriter sets ``persistent_id`` to its own bound method: the pickler
    # calls it for every object it meets, so no extra call in between.

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type):
            durus_name = durus_names().get(obj)
            if durus_name is not None:
                module, name = durus_name
                return getattr, (_ModuleRef(module), name)
            if obj in BROKEN_TYPES:
                names = (obj.broken_module, obj.broken_qualname)  # type: ignore[attr-defined]
                return broken_find_class, names
        elif isinstance(obj, _ModuleRef):
            return importlib.import_module, (obj.name,)
        return NotImplemented


def _class_header(cls: type) -> bytes | None:
    # The class pickle Durus writes for its own classes: PROTO, GLOBAL, STOP.
    durus_name = durus_names().get(cls)
    if durus_name is None:
        return None
    module, name = durus_name
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."


class BaseWriter:
    """What every serializer's writer shares: references and new objects.

    New persistent objects reached from the states written are given oids and
    collected, so that the connection stores them in the same commit.
    """

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.new_objects: list[PersistentBase] = []
        self._refs: set[bytes] = set()

    def _reference(self, obj: PersistentBase) -> bytes:
        # The oid of a referenced object, given one (and collected) when new.
        oid = obj._p_oid
        if oid is None:
            if _user_class(obj) in BROKEN_TYPES:
                broken_record(obj)  # raises: a placeholder inside a state
            oid = self.connection.new_oid()
            _setattribute(obj, "_p_oid", oid)
            _setattribute(obj, "_p_connection", self.connection)
            self.new_objects.append(obj)
        elif obj._p_connection is not self.connection:
            raise InvalidObjectReference(
                f"{obj!r} belongs to another connection; it cannot be stored "
                "in this one. Copy its state into a new object instead"
            )
        self._refs.add(oid)
        return oid

    def close(self) -> None:
        """Drop what the writer holds."""
        self.new_objects = []


class ObjectWriter(BaseWriter):
    """Writes the objects of one commit as Durus-layout pickle records.

    A connection keeps its writer from one commit to the next (see
    :attr:`reusable`): :meth:`close` only forgets what the commit wrote.
    """

    #: The connection may use this writer again after :meth:`close`.
    reusable = True

    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self._setup_pickler()

    def _setup_pickler(self) -> None:
        self._buffer = io.BytesIO()
        self._pickler = _DurusNamingPickler(self._buffer, PICKLE_PROTOCOL)
        self._pickler.persistent_id = _persistent_id_filter(  # type: ignore[method-assign]
            self._persistent_id
        )
        self._written = 0

    def _persistent_id(self, obj: Any) -> tuple[bytes, type] | None:
        # BaseWriter._reference inlined for the common case: this runs for
        # every object the pickler meets.
        if not isinstance(obj, PersistentBase):
            return None
        oid = obj._p_oid
        if oid is None or obj._p_connection is not self.connection:
            oid = self._reference(obj)
        else:
            self._refs.add(oid)
        return oid, _user_class(obj)

    def get_state(self, obj: PersistentBase) -> tuple[bytes, bytes]:
        """Return ``(data, refs)`` for ``obj``'s record."""
        cls = _user_class(obj)
        if cls in BROKEN_TYPES:
            return broken_record(obj)
        if self._written > 1 << 20:
            self._setup_pickler()  # let a large buffer go
        else:
            self._buffer.seek(0)
            self._buffer.truncate()
            self._pickler.memo = {}  # clear_memo() costs the largest memo size
        self._refs.clear()
        header = _class_header(cls)
        class_end = 0
        try:
            if header is None:
                self._pickler.dump(cls)
                class_end = self._buffer.tell()
            self._pickler.dump(obj.__getstate__())
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            raise _unpicklable(obj, error) from error
        written = self._buffer.getvalue()
        if header is None:
            header = written[:class_end]
        state = written[class_end:]
        if len(state) >= COMPRESS_THRESHOLD:
            compressed = zlib.compress(state, 1)
            if len(compressed) < len(state):
                state = compressed
        data = header + state
        self._written += len(data)
        self._refs.discard(obj._p_oid)
        return data, b"".join(sorted(self._refs))

    def get_record(self, obj: PersistentBase) -> bytes:
        """Return the whole object record for ``obj``."""
        data, refs = self.get_state(obj)
        return pack_record(obj._p_oid, data, refs)

    def close(self) -> None:
        """Forget what was written (the pickler's memo holds the objects)."""
        if self._written > 1 << 20:
            self._setup_pickler()  # let a large buffer and memo go
        else:
            self._pickler.memo = {}  # clear_memo() costs the largest memo size
            self._buffer.seek(0)
            self._buffer.truncate()
        self._refs.clear()
        self.new_objects = []


class PickleSerializer(Serializer):
    """The default serializer: pickle records in the Durus layout."""

    name = "pickle"
    description = "pickle records in the Durus layout (the default)"

    @property
    def tag(self) -> bytes:
        return b""

    def new_writer(self, connection: Connection) -> ObjectWriter:
        return ObjectWriter(connection)

    def new_reader(self, connection: Connection) -> ObjectReader:
        return ObjectReader(connection)


class _ConnectionUnpickler(_RenamingUnpickler):
    """Resolves persistent ids to the connection's cached objects (or ghosts)."""

    def __init__(self, stream: io.BytesIO, connection: Connection) -> None:
        super().__init__(stream)
        self._get_instance = connection.cache.get_instance
        self._connection = connection

    def persistent_load(self, pid: Any) -> Any:
        oid, cls = pid
        return self._get_instance(oid, cls, self._connection)


class _CollectingMixin:
    """Notes the oids an unpickler loads (for the records of placeholders)."""

    oids: set[bytes]

    def persistent_load(self, pid: Any) -> Any:
        self.oids.add(pid[0])
        return super().persistent_load(pid)  # type: ignore[misc]


def _unpicklable(obj: Any, error: Exception) -> SerializationError:
    oid = obj._p_oid
    where = "a new object" if oid is None else f"oid {int.from_bytes(oid, 'big')}"
    return SerializationError(
        f"cannot store {type(obj).__module__}.{type(obj).__qualname__} ({where}) "
        f"with pickle: {error}. Keep only picklable values in persistent objects "
        "(module-level functions and classes, not lambdas or local ones), or "
        "write with the dill serializer: Connection(storage, serializer='dill') "
        "or `--serializer dill`. Nothing of this commit was written"
    )


class ObjectReader:
    """Loads classes and states from record data for a connection.

    Pickle data is read here; tagged data goes to the reader of the serializer
    that wrote it, resolved once per connection.
    """

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.load_count = 0
        self.policy: LoadPolicy = getattr(connection, "load_policy", DEFAULT_POLICY)
        self._tagged: dict[bytes, RecordReader] = {}
        # Unpicklers that read only a class pickle, by its bytes: their memo
        # starts the reading of a state (see _class_pickle_end).
        self._classes: dict[bytes, pickle.Unpickler] = {}
        self._load_class = _load_class
        if not self.policy.is_default:
            from dhruva.restricted import policy_class_loader, policy_unpickler

            self._load_class = policy_class_loader(self.policy)
            self._unpickler_class = policy_unpickler(self.policy)

    _unpickler_class: type[_ConnectionUnpickler] = _ConnectionUnpickler

    def _unpickler(self, stream: io.BytesIO) -> pickle.Unpickler:
        return self._unpickler_class(stream, self.connection)

    def tagged_reader(self, data: bytes) -> RecordReader:
        """Return the reader for tagged ``data`` (resolving its serializer once)."""
        end = data.find(b"\0", 1)
        tag = data[: end + 1]
        reader = self._tagged.get(tag)
        if reader is None:
            name = tag[1:-1].decode("ascii", "replace")
            if self.policy.restricted and name == "dill":
                from dhruva.serializer import RestrictedLoadError

                raise RestrictedLoadError(
                    f"refused a dill record of class {_class_name_of_data(data)}: "
                    "loading dill records can run code, and this connection is "
                    "restricted"
                )
            try:
                serializer = resolve_serializer(name)
            except PluginError as error:
                raise MissingSerializerError(
                    f"a record of class {_class_name_of_data(data)} was written "
                    f"by serializer {name!r}, which is not installed: {error}"
                ) from error
            reader = serializer.new_reader(self.connection)
            self._tagged[tag] = reader
        return reader

    def get_class(self, data: bytes) -> type[Any]:
        """Return the class an object record's data names."""
        if data[:1] == TAG_START:
            return self.tagged_reader(data).get_class(data)
        return self._load_class(data)

    def get_ghost(self, data: bytes) -> Any:
        """Return a new ghost of the class named by ``data``."""
        cls: Any = _ghost_class(self.get_class(data))
        instance = cls.__new__(cls)
        _setattribute(instance, "_p_status", GHOST)
        return instance

    def _split(
        self, data: bytes, unpickler_class: type[Any] | None = None
    ) -> tuple[io.BytesIO, Any]:
        stream = io.BytesIO(data)
        if unpickler_class is None:
            # The class pickle of most records is one GLOBAL opcode: its class
            # is looked up once per connection.
            end = _class_pickle_end(data)
            known = self._classes.get(data[:end]) if end else None
            unpickler = self._unpickler(stream)
            if known is not None:
                # The state may refer to the class through the pickle memo.
                stream.seek(end)
                unpickler.memo = known.memo
            else:
                cls = unpickler.load()
                if cls in BROKEN_TYPES:
                    raise _Broken
                if end and stream.tell() == end and isinstance(cls, type):
                    # A copy of the memo holding the class alone, to start from
                    # (setting a dict as the memo loses it on Python 3.11).
                    known = self._unpickler(io.BytesIO(data[:end]))
                    known.load()
                    self._classes[data[:end]] = known
        else:
            unpickler = unpickler_class(stream, self.connection)
            unpickler.load()
        position = stream.tell()
        if position < len(data) and data[position] == _ZLIB_START:
            try:
                state = zlib.decompress(data[position:])
            except zlib.error:
                pass  # a pickle opcode that happens to be 0x78: read it as is
            else:
                stream.seek(position)
                stream.truncate()
                stream.write(state)
                stream.seek(position)
        return stream, unpickler

    def get_state(self, data: bytes, load: bool = True) -> Any:
        """Return the state stored in ``data`` (its pickle when not ``load``)."""
        self.load_count += 1
        if data[:1] == TAG_START:
            if not load:
                return split_tagged(data)[2]
            return self.tagged_reader(data).get_state(data)
        try:
            stream, unpickler = self._split(data)
        except _Broken:
            return self._get_broken_state(data, load)
        if not load:
            return stream.read()
        return unpickler.load()

    def _get_broken_state(self, data: bytes, load: bool) -> Any:
        # The state of a placeholder, with the record to write back unchanged.
        collecting = type(
            "_CollectingUnpickler", (_CollectingMixin, self._unpickler_class), {}
        )
        stream, unpickler = self._split(data, collecting)
        unpickler.oids = set()
        if not load:
            return stream.read()
        state = unpickler.load()
        return BrokenState(state, data, b"".join(sorted(unpickler.oids)))

    def get_state_pickle(self, data: bytes) -> bytes:
        """Return the (uncompressed) pickle of the state in ``data``."""
        result: bytes = self.get_state(data, load=False)
        return result

    def get_load_count(self) -> int:
        return self.load_count


def _class_pickle_end(data: bytes) -> int:
    """Return where the class pickle that starts ``data`` ends, or 0.

    Only the usual form is recognized: PROTO 2, GLOBAL ``module\\nname\\n``,
    an optional BINPUT, STOP.
    """
    if data[:3] != b"\x80\x02c":
        return 0
    first = data.find(b"\n", 3)
    second = data.find(b"\n", first + 1) if first > 0 else -1
    if second < 0:
        return 0
    end = second + 1
    if data[end : end + 1] == b"q":
        end += 2
    if data[end : end + 1] != b".":
        return 0
    return end + 1


class _Broken(Exception):
    """Raised by ObjectReader._split for the record of a missing class."""


def _load_class(data: bytes) -> type[Any]:
    cls = _RenamingUnpickler(io.BytesIO(data)).load()
    if not isinstance(cls, type):
        raise StorageError(f"record data starts with {cls!r}, not a class")
    return cls


def gen_class_names(records: Iterator[bytes]) -> Iterator[str]:
    """Yield the class name of each record."""
    for record in records:
        yield extract_class_name(record)
