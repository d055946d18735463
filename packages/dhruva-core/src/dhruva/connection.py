"""The Connection: where persistent objects meet their storage.

A connection loads objects on demand, keeps them in its cache, notes which ones
change, and stores those on :meth:`Connection.commit`. :meth:`Connection.abort`
drops uncommitted changes. Either one also brings in the changes other clients
committed meanwhile.

Records are written by the connection's serializer (``serializer="pickle"``,
the default, or ``"msgspec"``, ``"dill"``...) and read by whichever serializer
wrote each one (see :mod:`dhruva.serializer`).

Conflicts follow Durus: a commit fails with :class:`WriteConflictError` when
another client changed an object this transaction read or wrote; a load fails
with :class:`ReadConflictError` when it would mix states from before and after
another client's commit. After either, call :meth:`Connection.abort` and run the
transaction again.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from dhruva.broken import BROKEN_TYPES, BrokenState
from dhruva.cache import Cache
from dhruva.error import (
    ConflictError,
    DhruvaKeyError,
    ReadConflictError,
    RemovedObjectError,
    StorageError,
    WriteConflictError,
)
from dhruva.persistent import (
    GHOST,
    UNSAVED,
    ConnectionBase,
    PersistentBase,
    _getattribute,
    _retouch,
    _setattribute,
    _untouch_all,
    _user_class,
)
from dhruva.persistent_dict import PersistentDict
from dhruva.record import ROOT_OID, pack_record, unpack_record
from dhruva.serialize import ObjectReader, _class_name_of_data
from dhruva.serializer import (
    DEFAULT_SERIALIZER,
    LoadPolicy,
    SerializationError,
    Serializer,
    resolve_serializer,
)
from dhruva.storage import Storage

log = logging.getLogger(__name__)

__all__ = [
    "ROOT_OID",
    "Connection",
    "gen_every_instance",
    "touch_every_reference",
]


#: How often a load is retried while other clients keep changing what it reads.
_LOAD_ATTEMPTS = 100

#: Seconds a connection to a shared storage waits for another client to commit
#: the root object it is creating.
_ROOT_WAIT = 10.0

#: The first and the longest pause between two looks for that root, in seconds.
_ROOT_POLL_FIRST = 0.005
_ROOT_POLL_MAX = 0.2


def _as_oid(oid: bytes | int) -> bytes:
    if isinstance(oid, int):
        return oid.to_bytes(8, "big")
    return oid


def _describe(storage: Storage) -> str:
    """Name a storage for an error message: its class and where it lives."""
    name = type(storage).__name__
    for attribute in ("address", "filename", "path"):
        where = getattr(storage, attribute, None)
        if isinstance(where, tuple) and len(where) == 2:
            return f"{name} at {where[0]}:{where[1]}"
        if isinstance(where, str | os.PathLike):
            return f"{name} at {os.fspath(where)}"
    return name


class Connection(ConnectionBase):
    """A connection to a storage, with an object cache.

    :param storage: a :class:`~dhruva.storage.Storage`, or a file path opened
        through the installed plugins (the kind recognized from the file's first
        bytes; a new file gets a FileStorage).
    :param cache_size: the target number of loaded objects to keep.
    :param root_class: the class of a new root object (default PersistentDict);
        when given, an existing root must be of this class.
    :param serializer: the name of the serializer this connection writes
        records with (see ``dhruva plugins``), or a
        :class:`~dhruva.serializer.Serializer`. Records are read by the
        serializer that wrote them, whatever this is.
    :param restricted: load pickle records in restricted mode (see
        :mod:`dhruva.restricted`); dill records are then refused.
    :param allowed_classes: classes (or ``"module.Class"`` names) restricted
        mode loads besides persistent classes and safe builtins.
    :param renames: ``{"old.module.Class": "new.module.Class"}``, applied to
        the class names records hold when they are loaded.
    :raises MissingSerializerError: when the serializer's library is not
        installed (the message says how to install it).
    """

    def __init__(
        self,
        storage: Storage | str | os.PathLike[str],
        cache_size: int = 100000,
        root_class: type | None = None,
        *,
        serializer: str | Serializer = DEFAULT_SERIALIZER,
        restricted: bool = False,
        allowed_classes: Iterable[type | str] = (),
        renames: Mapping[str, str] | None = None,
    ) -> None:
        #: The serializer this connection writes records with.
        self.serializer = resolve_serializer(serializer)
        #: How classes named by records are found (renames, restricted mode).
        self.load_policy = LoadPolicy(restricted, allowed_classes, renames or {})
        if isinstance(storage, str | os.PathLike):
            from dhruva.plugins import open_storage

            storage = open_storage(storage)
        if not isinstance(storage, Storage):
            raise TypeError(
                f"Connection needs a dhruva Storage or a file path, "
                f"not {type(storage).__name__}"
            )
        #: The storage this connection reads and writes.
        self.storage = storage
        self.cache = Cache(cache_size)
        self.reader = ObjectReader(self)
        #: Objects changed in this transaction, by oid.
        self.changed: dict[bytes, Any] = {}
        #: Oids known to be stale; cleared by abort().
        self.invalid_oids: set[bytes] = set()
        #: Objects of fast_reads classes first accessed in this transaction;
        #: their next access, in the next transaction, is noted again (see
        #: dhruva._persistent_py).
        self.touched: list[Any] = []
        # The serializer's writer, kept between commits when it allows it.
        self._writer: Any = None
        self._writer_serializer: Any = None
        self.new_oid = storage.new_oid
        self.root = self._open_root(root_class)

    def _open_root(self, root_class: type | None) -> Any:
        try:
            data = self.get_stored_pickle(ROOT_OID)
        except KeyError:
            if self.storage.readonly:
                raise StorageError(
                    f"the storage {_describe(self.storage)} is empty and "
                    "read-only: it has no root"
                ) from None
            return self._create_or_await_root(root_class)
        return self._root_ghost(data, root_class)

    def _root_ghost(self, data: bytes, root_class: type | None) -> Any:
        """Return the stored root, as a ghost, after checking its class."""
        cls = self.reader.get_class(data)
        if root_class is not None and cls is not root_class:
            raise StorageError(
                f"the root object is a {cls.__module__}.{cls.__qualname__}, "
                f"not the {root_class.__module__}.{root_class.__qualname__} "
                "asked for; leave root_class out to open it"
            )
        # A ghost: the state is loaded at first use, so a connection that
        # has not read the root cannot conflict on it.
        return self.cache.get_instance(ROOT_OID, cls, self)

    def _create_or_await_root(self, root_class: type | None) -> Any:
        """Create the root of an empty storage, or wait for another client's.

        :raises StorageError: when the storage handed out another oid than the
            root's first and no root appears: a local storage at once, a
            shared one after waiting :data:`_ROOT_WAIT` seconds.
        """
        oid = self.storage.new_oid()
        if oid == ROOT_OID:
            cls: Any = root_class or PersistentDict
            root = self.cache.get_instance(ROOT_OID, cls, self)
            _setattribute(root, "_p_status", 0)
            cls.__init__(root)
            root._p_note_change()
            self.commit()
            return root

        # Oid 0 went to someone else. On a storage shared by several clients,
        # one of them is creating the root right now: wait for its commit. The
        # oid this connection was given stays unused (oids never repeat, so
        # it is a gap, nothing worse).
        first = int.from_bytes(oid, "big")
        if self.storage.invalidating:
            log.debug(
                "no root yet and oid %d handed out first: waiting for another "
                "client to commit the root",
                first,
            )
            data = self._await_root()
            if data is not None:
                return self._root_ghost(data, root_class)
            raise StorageError(
                f"the storage {_describe(self.storage)} has no root object and "
                f"handed out oid {first} first, and no other client committed a "
                f"root within {_ROOT_WAIT:g} seconds. Check that the client that "
                "took oid 0 (the first to connect to the new database) is still "
                "running and can commit, and that the server's storage is a "
                "valid database"
            )
        raise StorageError(
            f"the storage {_describe(self.storage)} has no root object but handed "
            f"out oid {first} first; it is not a valid database. Check that it "
            "is the database meant, or run `dhruva verify` on it"
        )

    def _await_root(self) -> bytes | None:
        """Poll a shared storage for its root record, with a growing pause.

        :return: the root's record data, or None if none came in time.
        """
        deadline = time.monotonic() + _ROOT_WAIT
        pause = _ROOT_POLL_FIRST
        while True:
            # Take in others' commits, so the load sees the newest root.
            self._storage_sync()
            try:
                return self.get_stored_pickle(ROOT_OID)
            except KeyError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(pause, left))
            pause = min(pause * 2, _ROOT_POLL_MAX)

    # --- access --------------------------------------------------------------

    def get_storage(self) -> Storage:
        return self.storage

    def get_root(self) -> Any:
        """Return the root object."""
        return self.root

    def get_cache(self) -> Cache:
        return self.cache

    def get_cache_count(self) -> int:
        """Return the number of objects in the cache, ghosts included."""
        return self.cache.get_count()

    def get_cache_size(self) -> int:
        """Return the target number of loaded objects."""
        return self.cache.get_size()

    def set_cache_size(self, size: int) -> None:
        self.cache.set_size(size)

    def get_transaction_serial(self) -> int:
        """Return the number of commits and aborts so far, plus one."""
        return int(self.transaction_serial)

    def get_load_count(self) -> int:
        """Return how many object states were loaded from the storage."""
        return self.reader.get_load_count()

    def get_stored_pickle(self, oid: bytes) -> bytes:
        """Return the record data stored for ``oid``.

        :raises ReadConflictError: when the stored state is newer than what
            this transaction has already read.
        """
        if oid in self.invalid_oids:
            raise ReadConflictError([oid])
        for _attempt in range(_LOAD_ATTEMPTS):
            try:
                record = self.storage.load(oid)
                break
            except ReadConflictError:
                # Others committed meanwhile: take in their invalidations (this
                # raises if the transaction used a changed object) and retry.
                self._handle_invalidations(self._storage_sync(), read_oid=oid)
        else:
            raise ReadConflictError([oid])
        record_oid, data, _refs = unpack_record(record)
        if record_oid != oid:
            raise StorageError(
                f"the storage returned the record of oid "
                f"{int.from_bytes(record_oid, 'big')} for oid "
                f"{int.from_bytes(oid, 'big')}: the database is damaged"
            )
        return data

    def get(self, oid: bytes | int) -> Any:
        """Return the object with ``oid`` (an 8-byte oid or an int), or None."""
        oid = _as_oid(oid)
        obj = self.cache.get(oid)
        if obj is not None:
            return obj
        try:
            data = self.get_stored_pickle(oid)
        except KeyError:
            return None
        obj = self.cache.get_instance(oid, self.reader.get_class(data), self)
        self._set_state(obj, data)
        return obj

    __getitem__ = get

    def _set_state(self, obj: Any, data: bytes) -> None:
        try:
            state = self.reader.get_state(data)
        except SerializationError as error:
            oid = int.from_bytes(_getattribute(obj, "_p_oid"), "big")
            raise type(error)(f"loading oid {oid}: {error}") from error
        except (pickle.UnpicklingError, EOFError, ValueError, zlib.error) as error:
            oid = int.from_bytes(_getattribute(obj, "_p_oid"), "big")
            raise SerializationError(
                f"the record of oid {oid} ({type(obj).__name__}) cannot be read, "
                f"it is damaged: {error}. `dhruva verify` lists damaged records"
            ) from error
        if isinstance(state, BrokenState) and _user_class(obj) not in BROKEN_TYPES:
            # The reference found the class, but the record names a missing one.
            oid = int.from_bytes(_getattribute(obj, "_p_oid"), "big")
            cls = _user_class(obj)
            raise SerializationError(
                f"the record of oid {oid} names the class "
                f"{_class_name_of_data(data)}, which cannot be found, while the "
                f"objects referring to it name {cls.__module__}.{cls.__qualname__}."
                " Make the record's class importable, or give a rename table "
                "mapping it to the class it became (`dhruva migrate --rename "
                "OLD=NEW` stores it again under the new name)"
            )
        obj.__setstate__(state)
        _setattribute(obj, "_p_status", 0)

    def load_state(self, obj: Any) -> None:
        """Load the stored state of the ghost ``obj``."""
        if self.storage is None:
            raise StorageError("the connection is closed")
        oid = _getattribute(obj, "_p_oid")
        try:
            data = self.get_stored_pickle(oid)
        except DhruvaKeyError:
            # The record is gone, removed by a pack after this ghost was made.
            raise RemovedObjectError([oid], [type(obj).__name__]) from None
        self._set_state(obj, data)

    def get_crawler(
        self, start_oid: bytes = ROOT_OID, batch_size: int = 100
    ) -> Iterator[Any]:
        """Yield loaded objects reachable from ``start_oid``, nearest first.

        Loads in batches, so it also warms the cache quickly.
        """
        for oid, record in self.storage.gen_oid_record(
            start_oid=start_oid, batch_size=batch_size
        ):
            obj = self.cache.get(oid)
            if obj is None or _getattribute(obj, "_p_status") == GHOST:
                data = unpack_record(record)[1]
                if obj is None:
                    obj = self.cache.get_instance(
                        oid, self.reader.get_class(data), self
                    )
                self._set_state(obj, data)
            yield obj

    # --- change tracking (called by persistent objects) -----------------------

    def note_access(self, obj: Any) -> None:
        """Note the first access to ``obj`` in this transaction."""
        _setattribute(obj, "_p_serial", self.transaction_serial)
        self.cache.note_access(obj)
        if getattr(type(obj), "_p_fast_reads", False):
            self.touched.append(obj)

    def note_change(self, obj: Any) -> None:
        self.changed[_getattribute(obj, "_p_oid")] = obj

    # --- transactions ---------------------------------------------------------

    def _end_transaction(self) -> None:
        # The objects read in this transaction get their ghost class back, so
        # that the next transaction notes its reads of them again.
        _untouch_all(self.touched)
        self.touched.clear()
        self.transaction_serial += 1
        self.shrink_cache()

    def shrink_cache(self) -> None:
        """Ghost least recently used objects beyond the cache size target."""
        self.cache.shrink(self.transaction_serial)

    def _storage_sync(self) -> list[bytes]:
        oids = self.storage.sync()
        if getattr(oids, "everything", False):
            # The storage lost track of other clients' commits (a ClientStorage
            # that reconnected): any object in the cache may be out of date.
            return [_getattribute(obj, "_p_oid") for obj in self.cache]
        return oids

    def _sync(self) -> None:
        # Ghost every object another client changed, so it loads anew.
        self.invalid_oids.update(self._storage_sync())
        for oid in self.invalid_oids:
            obj = self.cache.get(oid)
            if obj is not None and _getattribute(obj, "_p_status") != GHOST:
                obj._p_set_status_ghost()
        self.invalid_oids.clear()

    def abort(self) -> None:
        """Drop uncommitted changes and bring in other clients' commits."""
        for obj in self.changed.values():
            if _getattribute(obj, "_p_oid") is not None:
                obj._p_set_status_ghost()
        self.changed.clear()
        self._sync()
        self._end_transaction()

    def commit(self) -> None:
        """Store every changed object, and the new objects they reach.

        :raises WriteConflictError: when another client changed an object this
            transaction read or wrote; nothing is stored, and the changes stay
            until :meth:`abort`.
        """
        if self.changed:
            if self.invalid_oids:
                raise WriteConflictError(sorted(self.invalid_oids))
            self._commit_changes()
        else:
            self._sync()
        self._end_transaction()

    def _commit_changes(self) -> None:
        writer = self._writer
        if writer is None or self._writer_serializer is not self.serializer:
            writer = self.serializer.new_writer(self)
            if getattr(writer, "reusable", False):
                self._writer = writer
                self._writer_serializer = self.serializer
        records: list[tuple[bytes, bytes]] = []
        stored: list[Any] = []
        pending: list[Any] = []
        try:
            # Serialize changed objects, then the new ones they reach.
            pending = list(self.changed.values())
            while pending:
                obj = pending[-1]
                oid = _getattribute(obj, "_p_oid")
                data, refs = writer.get_state(obj)
                records.append((oid, pack_record(oid, data, refs)))
                stored.append(pending.pop())
                pending.extend(writer.new_objects)
                writer.new_objects.clear()
        except BaseException:
            # New objects given oids so far, stored or not, become new again.
            self._forget_new_objects(stored + pending + writer.new_objects)
            raise
        finally:
            writer.close()

        try:
            self.storage.begin()
            for oid, record in records:
                self.storage.store(oid, record)
            self.storage.end(self._handle_invalidations)
        except BaseException:
            self._forget_new_objects(stored)
            raise

        for obj in stored:
            oid = _getattribute(obj, "_p_oid")
            if self.cache.get(oid) is not obj:
                self.cache[oid] = obj
            _setattribute(obj, "_p_status", 0)
            if _getattribute(obj, "_p_serial") != self.transaction_serial:
                # Stored objects count as used by this transaction (for the
                # cache), and get their ghost class at its end.
                self.note_access(obj)
        self.changed.clear()
        log.debug("committed %d objects", len(records))

    def _forget_new_objects(self, stored: Iterable[Any]) -> None:
        # New objects given oids during a failed commit become new again.
        for obj in stored:
            oid = _getattribute(obj, "_p_oid")
            if oid not in self.changed and self.cache.get(oid) is not obj:
                _setattribute(obj, "_p_oid", None)
                _setattribute(obj, "_p_connection", None)

    def _handle_invalidations(
        self, oids: Iterable[bytes], read_oid: bytes | None = None
    ) -> None:
        """Ghost what other clients changed; raise if this transaction used it."""
        conflicts = []
        for oid in oids:
            obj = self.cache.get(oid)
            if obj is None:
                continue
            if (
                _getattribute(obj, "_p_serial") == self.transaction_serial
                or oid in self.changed
            ):
                conflicts.append(obj)
                self.invalid_oids.add(oid)
            elif _getattribute(obj, "_p_status") != GHOST:
                obj._p_set_status_ghost()
        if conflicts:
            names = [type(obj).__name__ for obj in conflicts]
            oids_in_conflict = [_getattribute(obj, "_p_oid") for obj in conflicts]
            error: ConflictError
            if read_oid is None:
                error = WriteConflictError(oids_in_conflict, names)
            else:
                error = ReadConflictError(oids_in_conflict, names)
            log.debug("conflict: %s", error)
            raise error

    def pack(self) -> None:
        """Drop uncommitted changes, then remove unreachable records.

        Loaded objects whose records the pack removed are detached: they become
        new objects again, so storing one in the database later stores it anew
        instead of leaving a reference to a record that is gone.
        """
        self.abort()
        self.storage.pack()
        self._detach_removed()

    def _detach_removed(self) -> None:
        for obj in self.cache:
            if obj is None or _getattribute(obj, "_p_status") == GHOST:
                continue
            oid = _getattribute(obj, "_p_oid")
            try:
                self.storage.load(oid)
            except KeyError:
                del self.cache[oid]
                _setattribute(obj, "_p_oid", None)
                _setattribute(obj, "_p_connection", None)
                _setattribute(obj, "_p_status", UNSAVED)
                _retouch(obj)
            except ReadConflictError:
                pass  # changed by another client: it exists

    def close(self) -> None:
        """Drop uncommitted changes and close the storage."""
        if self.storage is not None:
            self.abort()
            self.storage.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def touch_every_reference(connection: Connection, *words: str | bytes) -> None:
    """Mark changed every object whose stored class or state mentions a word.

    Use it after moving or renaming a class, so the next commit rewrites every
    record that names the old one.
    """
    needles = [w.encode() if isinstance(w, str) else w for w in words]
    reader = ObjectReader(connection)
    for oid, record in connection.storage.gen_oid_record():
        data = unpack_record(record)[1]
        state = reader.get_state_pickle(data)
        if any(word in data or word in state for word in needles):
            connection.get(oid)._p_note_change()


def gen_every_instance(connection: Connection, *classes: type) -> Iterator[Any]:
    """Yield every stored object that is an instance of one of ``classes``."""
    for oid, record in connection.storage.gen_oid_record():
        cls = connection.reader.get_class(unpack_record(record)[1])
        if issubclass(cls, classes):
            yield connection.get(oid)


def is_persistent(obj: object) -> bool:
    return isinstance(obj, PersistentBase)
