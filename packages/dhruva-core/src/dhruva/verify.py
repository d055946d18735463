"""Checking a database: every record readable, every reference resolvable.

:func:`verify_storage` reads every record a storage holds (which checks the
checksums of a storage that keeps them: a damaged record raises a
StorageError naming it), follows every reference from the root, and reports:

- damaged records: the storage refused to return them, or they do not parse
  as object records of the oid they were stored under;
- dangling references: an oid some record refers to, with no record; each
  comes with the objects holding it and, for pickled records, the attribute
  (or item) of their state that holds it, found without importing any class;
- unreachable records: what a pack would remove (not a fault).

``dhruva verify`` prints the report; its exit status says whether the
database is sound.

Limitations:

- A storage that can list its records (``iterable``) is read in one pass,
  keeping every record's references in memory (8 bytes per reference). When
  that pass hits a damaged record the storage can not go on past it, so the
  records reachable from the root are then read one by one instead, and the
  number of unreachable records is unknown.
- Through a server, clients committing while verify runs may make a pass
  see a reference to an object created after it started:
  :func:`verify_settled` reads again until a pass with no commit during it
  (up to :data:`MAX_PASSES`); on a server that never pauses its report says
  it did not settle.
- Attribute names are found for records written by the pickle serializer;
  for other serializers only the holding object is named.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import pickle
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dhruva.error import DhruvaError, DhruvaKeyError, StorageError
from dhruva.record import ROOT_OID, split_oids, unpack_record
from dhruva.serialize import check_pickle_data, extract_class_name
from dhruva.serializer import TAG_START, split_tagged
from dhruva.storage import Storage

log = logging.getLogger(__name__)

#: Records loaded per request when the reachable records are read one by one.
_BATCH = 100

# A damaged file can make a storage fail with its backend's own errors
# (sqlite3.DatabaseError: "database disk image is malformed") rather than a
# DhruvaError: while reading records, verify takes any Exception as damage.

#: Holders listed per dangling reference.
MAX_HOLDERS = 20


def oid_number(oid: bytes) -> int:
    """Return an oid as the number users see."""
    return int.from_bytes(oid, "big")


@dataclass
class DamagedRecord:
    """A record the storage could not return, or that does not parse."""

    #: The oid it is stored under; None for damage outside any record.
    oid: int | None
    #: What is wrong, as the storage (or the record parser) said it.
    message: str
    #: The byte offset of the damage in the file, where the storage says.
    offset: int | None = None

    @classmethod
    def from_error(cls, oid: bytes | None, error: BaseException) -> DamagedRecord:
        """Describe ``error``, raised reading the record of ``oid``."""
        found = getattr(error, "oid", oid)
        offset = getattr(error, "offset", None)
        return cls(
            oid_number(found) if isinstance(found, bytes) else None,
            str(error),
            offset if isinstance(offset, int) else None,
        )


@dataclass
class Holder:
    """An object holding a dangling reference."""

    #: The holder's oid.
    oid: int
    #: Its class, as the record names it.
    class_name: str
    #: Where in its state the reference sits (``.friends[2]``), where known.
    attributes: list[str]


@dataclass
class DanglingReference:
    """An oid that records refer to but no record exists for."""

    #: The missing oid.
    oid: int
    #: The objects that refer to it (at most :data:`MAX_HOLDERS`).
    holders: list[Holder]


@dataclass
class VerifyReport:
    """What :func:`verify_storage` found."""

    #: Records read (every record when ``complete``, else the reachable ones).
    records: int = 0
    #: Records reachable from the root.
    reachable: int = 0
    #: Records not reachable from the root; None when it can not be told.
    unreachable: int | None = None
    #: Whether every record the storage holds was read.
    complete: bool = False
    #: Why the full pass stopped early, if it did.
    scan_error: str | None = None
    #: Records the storage refused or that do not parse.
    damaged: list[DamagedRecord] = field(default_factory=list)
    #: References to records that do not exist.
    dangling: list[DanglingReference] = field(default_factory=list)
    #: False when there is no root object (an empty database, if no records).
    has_root: bool = True
    #: Passes made over a storage other clients commit to (see
    #: :func:`verify_settled`); 1 otherwise.
    passes: int = 1
    #: False when other clients committed during every pass: what is found
    #: may then be passing effects of those commits, not damage.
    settled: bool = True

    @property
    def sound(self) -> bool:
        """True when nothing is damaged or dangling and every record was read."""
        return (
            not self.damaged
            and not self.dangling
            and self.scan_error is None
            and (self.has_root or self.records == 0)
        )

    def as_dict(self) -> dict[str, Any]:
        """Return the report as plain data (for ``--json``)."""
        return {
            "sound": self.sound,
            "records": self.records,
            "reachable": self.reachable,
            "unreachable": self.unreachable,
            "complete": self.complete,
            "has_root": self.has_root,
            "passes": self.passes,
            "settled": self.settled,
            "scan_error": self.scan_error,
            "damaged": [
                {"oid": d.oid, "offset": d.offset, "message": d.message}
                for d in self.damaged
            ],
            "dangling": [
                {
                    "oid": d.oid,
                    "holders": [
                        {
                            "oid": h.oid,
                            "class": h.class_name,
                            "attributes": h.attributes,
                        }
                        for h in d.holders
                    ],
                }
                for d in self.dangling
            ],
        }


# --- what a read-only open stopped at --------------------------------------------


def damage_in_the_middle(storage: Storage) -> StorageError | None:
    """Return the damage a read-only file storage stopped reading at, when
    later commits follow it; None otherwise.

    A read-only open of a file damaged in the middle reads the database as it
    was just before the damage and keeps the error as ``storage.damage``
    (dhruva-file's storages); an incomplete last transaction, which a crash
    or a commit in progress leaves, is not damage in the middle.
    """
    damage = getattr(storage, "damage", None)
    if not isinstance(damage, StorageError):
        return None
    try:
        shelf = importlib.import_module("dhruva.shelf")
    except ImportError:
        return damage
    return None if isinstance(damage, shelf.TornTailError) else damage


def describe_damage_in_the_middle(
    path: str, damage: StorageError, consequence: str
) -> str:
    """Say where a file is damaged in the middle, what that means for the
    command, and what to do.

    :param damage: what :func:`damage_in_the_middle` returned.
    :param consequence: what the damage does to the command, e.g. ``"a backup
        would hold only the commits before it, so none is taken"``.
    """
    offset = getattr(damage, "offset", None)
    size = getattr(damage, "size", None)
    reason = getattr(damage, "reason", None) or str(damage)
    if not isinstance(offset, int):
        return (
            f"{path} is damaged: {damage}; {consequence}. Restore it from a "
            f"backup (`dhruva verify {path}` lists what is damaged)"
        )
    later = (
        f"{size - offset} bytes of later commits follow it"
        if isinstance(size, int)
        else "later commits follow it"
    )
    return (
        f"{path} is damaged at byte offset {offset} ({reason}), and {later}: "
        f"{consequence}. Restore {path} from a backup (check the backup with "
        f"`dhruva verify`), or keep the commits before the damage with "
        f"`dhruva restore {path} --at {offset} --output NEW`"
    )


def refuse_damage_in_the_middle(storage: Storage, path: str, consequence: str) -> None:
    """Raise when ``storage`` (opened read-only) stopped at damage in the middle.

    :param consequence: as for :func:`describe_damage_in_the_middle`.
    :raises StorageError: saying where the damage is and what to do.
    """
    damage = damage_in_the_middle(storage)
    if damage is not None:
        raise StorageError(describe_damage_in_the_middle(path, damage, consequence))


# --- reading the records -------------------------------------------------------


def _parse(oid: bytes, record: bytes) -> list[bytes]:
    """Return the references of ``record``, checking it is a record of ``oid``.

    :raises DhruvaError: when it is not.
    """
    stored_oid, data, refs = unpack_record(record)
    if stored_oid != oid:
        raise DhruvaError(
            f"the record stored for oid {oid_number(oid)} names oid "
            f"{oid_number(stored_oid)}"
        )
    if data[:1] != TAG_START:
        try:
            check_pickle_data(data)
        except ValueError as error:
            raise DhruvaError(str(error)) from None
    return split_oids(refs)


def _scan_all(
    storage: Storage, report: VerifyReport, progress: Callable[[int], None]
) -> dict[bytes, list[bytes]] | None:
    """Read every record; return each one's references, or None on a failure."""
    refs_of: dict[bytes, list[bytes]] = {}
    try:
        for oid, record in storage.gen_oid_record():
            progress(1)
            try:
                refs_of[oid] = _parse(oid, record)
            except DhruvaError as error:
                report.damaged.append(DamagedRecord.from_error(oid, error))
                refs_of[oid] = []
    except Exception as error:  # a backend's own errors too (see _FAILURES)
        # The storage can not go on past a record it refuses.
        log.warning("reading every record stopped: %s", error)
        report.scan_error = str(error)
        report.damaged.clear()
        return None
    return refs_of


def _load_each(storage: Storage, oids: list[bytes]) -> Iterator[tuple[bytes, Any]]:
    """Yield ``(oid, record or exception)``, trying a batch first, then one by one."""
    try:
        records = list(storage.bulk_load(oids))
    except Exception:  # noqa: S110 - read them one by one to tell which
        pass
    else:
        yield from zip(oids, records, strict=True)
        return
    for oid in oids:
        try:
            yield oid, storage.load(oid)
        except Exception as error:  # a backend's own errors too
            yield oid, error


def _walk(
    storage: Storage, report: VerifyReport, progress: Callable[[int], None]
) -> tuple[set[bytes], dict[bytes, list[bytes]], set[bytes]]:
    """Read the records reachable from the root one batch at a time.

    :return: the oids read, the references of each, the oids with no record.
    """
    seen = {ROOT_OID}
    todo = [ROOT_OID]
    refs_of: dict[bytes, list[bytes]] = {}
    missing: set[bytes] = set()
    while todo:
        batch, todo = todo[:_BATCH], todo[_BATCH:]
        for oid, result in _load_each(storage, batch):
            progress(1)
            if isinstance(result, DhruvaKeyError):
                missing.add(oid)
                continue
            if isinstance(result, BaseException):
                report.damaged.append(DamagedRecord.from_error(oid, result))
                continue
            try:
                refs = _parse(oid, result)
            except DhruvaError as error:
                report.damaged.append(DamagedRecord.from_error(oid, error))
                continue
            refs_of[oid] = refs
            for ref in refs:
                if ref not in seen:
                    seen.add(ref)
                    todo.append(ref)
    return set(refs_of), refs_of, missing


def reachable_oids(refs_of: dict[bytes, list[bytes]]) -> set[bytes]:
    """Return the oids of the records reachable from the root.

    :param refs_of: each record's oid and the oids it refers to.
    """
    if ROOT_OID not in refs_of:
        return set()
    seen = {ROOT_OID}
    todo = [ROOT_OID]
    while todo:
        for ref in refs_of[todo.pop()]:
            if ref not in seen and ref in refs_of:
                seen.add(ref)
                todo.append(ref)
    return seen


def verify_storage(
    storage: Storage, progress: Callable[[int], None] | None = None
) -> VerifyReport:
    """Check every record of ``storage`` and every reference between them.

    :param progress: called with a number of records read, as the check goes.
    :return: the report; :attr:`VerifyReport.sound` says whether all is well.
    """
    step = progress if progress is not None else (lambda _n: None)
    report = VerifyReport()

    refs_of = _scan_all(storage, report, step) if storage.iterable else None
    if refs_of is not None:
        # Every record was read: reachability is worked out in memory.
        report.complete = True
        report.records = len(refs_of)
        report.has_root = ROOT_OID in refs_of
        report.reachable = len(reachable_oids(refs_of))
        report.unreachable = report.records - report.reachable
        missing = {
            ref for refs in refs_of.values() for ref in refs if ref not in refs_of
        }
    else:
        # Only what can be reached from the root, record by record.
        read, refs_of, missing = _walk(storage, report, step)
        report.records = report.reachable = len(read) + len(report.damaged)
        damaged = {d.oid for d in report.damaged}
        report.has_root = ROOT_OID in read or oid_number(ROOT_OID) in damaged
        missing.discard(ROOT_OID)

    if missing:
        report.dangling = _describe_dangling(storage, missing, refs_of)
    _check_checksums(storage, report)
    report.damaged.sort(key=lambda d: (d.oid is None, d.oid or 0))
    log.info(
        "verified %r: %d records, %d damaged, %d dangling references",
        storage,
        report.records,
        len(report.damaged),
        len(report.dangling),
    )
    return report


#: Passes :func:`verify_settled` makes before it reports what it found anyway.
MAX_PASSES = 10


def verify_settled(
    storage: Storage,
    progress: Callable[[int], None] | None = None,
    *,
    passes: int = MAX_PASSES,
) -> VerifyReport:
    """:func:`verify_storage`, made reliable on a storage others commit to.

    Through a server, a record read after another client's commit can refer
    to an object the pass read before that commit, or missed: a false
    alarm. So when a pass finds a fault and the storage reports commits made
    during it (``invalidating`` storages, by ``sync()``), the pass is made
    again, until one ends with no commit in between or finds nothing. A
    storage no other process commits to gets one pass.

    :param passes: the most passes made; the report's ``settled`` is False
        when every one of them saw commits.
    """
    if not storage.invalidating:
        return verify_storage(storage, progress)
    storage.sync()  # from here on, commits are reported
    report = VerifyReport()
    for done in range(1, passes + 1):
        report = verify_storage(storage, progress)
        report.passes = done
        changed = storage.sync()
        if report.sound or not (changed or getattr(changed, "everything", False)):
            return report
        _read_faults_again(storage, report)
        if report.sound:
            return report
        log.info(
            "verify pass %d of %r found faults while other clients committed; "
            "reading it again",
            done,
            storage,
        )
    report.settled = False
    return report


def _read_faults_again(storage: Storage, report: VerifyReport) -> None:
    """Drop from ``report`` the faults that a read now shows were passing:
    a dangling oid whose record is there now, a record read now whole."""
    dangling = []
    for reference in report.dangling:
        try:
            storage.load(reference.oid.to_bytes(8, "big"))
        except Exception:  # still missing, or can not tell: keep it
            dangling.append(reference)
    report.dangling = dangling
    damaged = []
    for record in report.damaged:
        if record.oid is None:
            damaged.append(record)
            continue
        oid = record.oid.to_bytes(8, "big")
        try:
            _parse(oid, storage.load(oid))
        except Exception:  # still damaged, or can not tell: keep it
            damaged.append(record)
    report.damaged = damaged


def _check_checksums(storage: Storage, report: VerifyReport) -> None:
    """Add what a storage's own ``check()`` finds (every checksum it keeps).

    Storages with checksums (dhruva's checked file format) check every byte
    of the file that way, records no longer reachable included.
    """
    check = getattr(storage, "check", None)
    if not callable(check):
        return
    known = {(d.oid, d.offset) for d in report.damaged}
    known_oids = {d.oid for d in report.damaged if d.oid is not None}
    try:
        problems = check()
    except Exception as error:
        report.damaged.append(DamagedRecord.from_error(None, error))
        return
    for problem in problems:
        damaged = DamagedRecord.from_error(None, problem)
        if (damaged.oid, damaged.offset) in known or damaged.oid in known_oids:
            continue
        report.damaged.append(damaged)
        known.add((damaged.oid, damaged.offset))


# --- who holds a dangling reference ---------------------------------------------


def _describe_dangling(
    storage: Storage,
    missing: set[bytes],
    refs_of: dict[bytes, list[bytes]],
) -> list[DanglingReference]:
    holders: dict[bytes, list[bytes]] = {oid: [] for oid in missing}
    for oid, refs in refs_of.items():
        for ref in refs:
            found = holders.get(ref)
            if found is not None and oid not in found and len(found) < MAX_HOLDERS:
                found.append(oid)
    result = []
    for oid in sorted(missing):
        described = []
        for holder in holders[oid]:
            try:
                record = storage.load(holder)
            except DhruvaError as error:
                log.debug("could not reload %r: %s", holder, error)
                described.append(Holder(oid_number(holder), "?", []))
                continue
            described.append(
                Holder(
                    oid_number(holder),
                    extract_class_name(record),
                    find_reference_paths(record, oid),
                )
            )
        result.append(DanglingReference(oid_number(oid), described))
    return result


class _Ref:
    """A persistent reference met while reading a state."""

    def __init__(self, oid: bytes) -> None:
        self.oid = oid


class _Stub:
    """Stands for any object of a state; keeps what it was built from."""

    _name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.items: list[tuple[Any, Any]] = []
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append((len(self.items), value))

    def extend(self, values: Iterable[Any]) -> None:
        for value in values:
            self.append(value)

    def add(self, value: Any) -> None:
        self.append(value)


def _stub_class(module: str, name: str) -> type[_Stub]:
    return type(name, (_Stub,), {"_name": f"{module}.{name}"})


class _InertUnpickler(pickle.Unpickler):
    """Reads a state without importing or running anything it names."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _encode  # how protocol 2 writes bytes: harmless, and needed
        return _stub_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        oid = pid[0] if isinstance(pid, tuple) else pid
        return _Ref(oid if isinstance(oid, bytes) else b"")


def _encode(text: str, encoding: str = "utf-8") -> bytes | None:
    try:
        return text.encode(encoding)
    except (LookupError, UnicodeError, AttributeError):
        return None


def _read_state(data: bytes) -> Any:
    """Return the state pickled in record data, with stubs for every class."""
    # One pickler wrote both pickles: the second may use the first's memo.
    stream = io.BytesIO(data)
    unpickler = _InertUnpickler(stream)
    unpickler.load()  # the class
    position = stream.tell()
    if data[position : position + 1] == b"\x78":
        with contextlib.suppress(zlib.error):  # else a 0x78 opcode
            state = zlib.decompress(data[position:])
            stream.seek(position)
            stream.truncate()
            stream.write(state)
            stream.seek(position)
    return unpickler.load()


def _paths(value: Any, target: bytes, path: str, depth: int = 0) -> Iterator[str]:
    """Yield the paths inside ``value`` at which a reference to ``target`` sits."""
    if depth > 50:
        return
    if isinstance(value, _Ref):
        if value.oid == target:
            yield path or "(the state itself)"
        return
    if isinstance(value, dict):
        for key, item in value.items():
            label = f".{key}" if isinstance(key, str) and not path else f"[{key!r}]"
            yield from _paths(item, target, path + label, depth + 1)
    elif isinstance(value, list | tuple | set | frozenset):
        for i, item in enumerate(value):
            yield from _paths(item, target, f"{path}[{i}]", depth + 1)
    elif isinstance(value, _Stub):
        for i, arg in enumerate(value.args):
            yield from _paths(arg, target, f"{path}<{value._name} arg {i}>", depth + 1)
        for key, item in value.items:
            yield from _paths(item, target, f"{path}[{key!r}]", depth + 1)
        yield from _paths(value.state, target, path, depth + 1)


def find_reference_paths(record: bytes, target: bytes) -> list[str]:
    """Return where in a record's state references to ``target`` sit.

    Attributes of the object read ``.name``; items of a mapping or sequence
    ``['key']`` or ``[3]``. Nothing the record names is imported.

    :return: the paths; empty when the record was not written by the pickle
        serializer, or its state can not be read.
    """
    try:
        _oid, data, _refs = unpack_record(record)
        if data[:1] == TAG_START:
            serializer = split_tagged(data)[0]
            log.debug("state of a %s record not searched", serializer)
            return []
        state = _read_state(data)
    except Exception as error:  # a damaged state can fail in any way
        log.debug("could not read a state: %s", error)
        return []
    return sorted(set(_paths(state, target, "")))
