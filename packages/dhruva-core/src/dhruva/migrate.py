"""Rewriting stored records: renamed classes, or another serializer.

:func:`migrate` finds the records that name a renamed class (as the object's
own class, as the class of an object referred to, or as a plain value in a
state) and stores them again through a connection that has the rename
table, so that they name the new class. Each record is written again by the
serializer that wrote it, unless a conversion is asked for: then every record
is rewritten with the connection's serializer. ``dhruva migrate`` is the
command line for it.

Before anything is rewritten, every new class of the rename table is imported
(:func:`resolve_new_classes`): a misspelt or missing new class is refused with
nothing changed, and the classes are then defined in the process, as msgspec
records (which never import) need.
"""

from __future__ import annotations

import importlib
import logging
import pickletools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dhruva.broken import is_broken
from dhruva.connection import Connection
from dhruva.error import DhruvaError
from dhruva.persistent import PersistentBase
from dhruva.record import unpack_record
from dhruva.serialize import extract_class_name, rename_module
from dhruva.serializer import (
    DEFAULT_SERIALIZER,
    resolve_serializer,
    split_name,
    split_tagged,
    tagged_serializer_name,
)

log = logging.getLogger(__name__)

#: Objects stored per commit while migrating (bounds the memory used).
BATCH_SIZE = 1000


class MigrationError(DhruvaError):
    """A migration was refused before anything was rewritten."""


def resolve_new_classes(renames: Mapping[str, str]) -> dict[str, type]:
    """Import every new class of ``renames``; return them by new name.

    :raises MigrationError: naming each new class that cannot be found (its
        module does not import, or does not define it); nothing is rewritten.
    """
    found: dict[str, type] = {}
    missing: list[str] = []
    for new in sorted(set(renames.values())):
        module, name = split_name(new)
        try:
            value: Any = importlib.import_module(module)
            for part in name.split("."):
                value = getattr(value, part)
        except ImportError as error:
            missing.append(f"{new} (module {module}: {error})")
            continue
        except AttributeError:
            missing.append(f"{new} (module {module} has no {name})")
            continue
        if not isinstance(value, type):
            missing.append(f"{new} (a {type(value).__name__}, not a class)")
            continue
        found[new] = value
    if missing:
        raise MigrationError(
            f"cannot find the new class{'es' if len(missing) > 1 else ''} "
            f"{'; '.join(missing)}. Check the spelling of --rename OLD=NEW and "
            "that the new module is importable (run from the application's "
            "directory, or set PYTHONPATH); nothing was rewritten"
        )
    return found


def pickle_class_names(body: bytes) -> set[str]:
    """Return ``module.name`` of every global a pickle names, without loading it.

    Reads protocol 0-2 ``GLOBAL`` and protocol 4 ``STACK_GLOBAL`` opcodes (the
    latter take their two strings from the stack, or from the memo).
    """
    names: set[str] = set()
    strings: list[Any] = []
    memo: dict[int, Any] = {}
    try:
        for opcode, arg, _pos in pickletools.genops(body):
            if opcode.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                names.add(f"{module}.{name}")
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.add(f"{strings[-2]}.{strings[-1]}")
            elif opcode.name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif opcode.name in ("BINGET", "LONG_BINGET", "GET"):
                strings.append(memo.get(int(arg or 0)))
            elif isinstance(arg, str):
                strings.append(arg)
            elif opcode.name in ("STOP",):
                break
            else:
                strings.append(None)
    except Exception:  # a damaged pickle: report what was read before
        log.debug("cannot read every opcode of a pickle", exc_info=True)
    return names


def _needles(renames: Mapping[str, str]) -> list[bytes]:
    # How a class name appears in record data: "module\nname" in a pickle,
    # "module:name" in a tagged record.
    needles = []
    for old in renames:
        module, name = split_name(old)
        needles.append(f"{module}\n{name}\n".encode())
        needles.append(f"{module}:{name}".encode())
    return needles


def find_records_to_migrate(
    connection: Connection, renames: Mapping[str, str]
) -> list[bytes]:
    """Return the oids of the records that name an old class of ``renames``."""
    needles = _needles(renames)
    old_names = {".".join(split_name(old)) for old in renames}
    found = []
    for oid, record in connection.storage.gen_oid_record():
        data = unpack_record(record)[1]
        serializer = tagged_serializer_name(data)
        if serializer is None:
            header, payload = data, connection.reader.get_state_pickle(data)
        else:
            header, payload = data, split_tagged(data)[2]
        if any(needle in header or needle in payload for needle in needles):
            found.append(oid)
        elif serializer == "dill":
            # Protocol 4 names a class with two strings and STACK_GLOBAL.
            body = payload.partition(b"\n")[2]
            if pickle_class_names(body) & old_names:
                found.append(oid)
    return found


def oids_to_migrate(
    connection: Connection,
    renames: Mapping[str, str] | None = None,
    every_record: bool = False,
) -> list[bytes]:
    """Return the oids :func:`migrate` rewrites (every oid with ``every_record``)."""
    if every_record:
        return [oid for oid, _record in connection.storage.gen_oid_record()]
    if renames is None:
        renames = connection.load_policy.renames
    resolve_new_classes(renames)
    return find_records_to_migrate(connection, renames)


def _import_msgspec_classes(connection: Connection, oids: list[bytes]) -> None:
    # msgspec records never import: import the modules of the classes the
    # records to rewrite name (where they can be), so that they load as
    # themselves rather than as placeholders written back unchanged.
    modules: set[str] = set()
    for oid in oids:
        data = unpack_record(connection.storage.load(oid))[1]
        if tagged_serializer_name(data) != "msgspec":
            continue
        _serializer, own, payload = split_tagged(data)
        names = payload.partition(b"\0")[0].decode("utf-8", "replace").split("\n")
        for name in [own, *names]:
            if name:
                module = connection.load_policy.rename(*split_name(name))[0]
                modules.add(rename_module(module))
    for module in sorted(modules):
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 (reported, then left broken)
            log.debug("cannot import %s: %s", module, error)


def _refuse_plain_classes_for_objects(
    connection: Connection,
    oids: list[bytes],
    renames: Mapping[str, str],
    new_classes: Mapping[str, type],
) -> None:
    """Refuse renaming the class of stored objects to a non-persistent class."""
    plain = {
        old: new
        for old, new in renames.items()
        if new in new_classes and not issubclass(new_classes[new], PersistentBase)
    }
    if not plain:
        return
    for oid in oids:
        data = unpack_record(connection.storage.load(oid))[1]
        if tagged_serializer_name(data) is None:
            own = extract_class_name(oid + len(data).to_bytes(4, "big") + data)
        else:
            own = split_tagged(data)[1].replace(":", ".")
        if own in plain:
            raise MigrationError(
                f"{own} is the class of stored objects (oid "
                f"{int.from_bytes(oid, 'big')}), but {plain[own]} is not a "
                "persistent class: rename it to a subclass of "
                "dhruva.persistent.Persistent; nothing was rewritten"
            )


def migrate(
    connection: Connection,
    oids: Iterable[bytes] | None = None,
    *,
    progress: Callable[[int], Any] | None = None,
    convert: bool | None = None,
) -> int:
    """Store again the records that name renamed classes; return how many.

    :param connection: a connection opened with ``renames=`` (and the
        serializer to convert to, if any).
    :param oids: the records to rewrite; by default those
        :func:`oids_to_migrate` finds for the connection's rename table.
    :param progress: called with 1 after each object (``bar.update``).
    :param convert: True: rewrite every record with the connection's
        serializer. False: write each record with the serializer that wrote it.
        None (the default): convert when the connection writes with a
        serializer other than pickle.
    :raises MigrationError: when a new class of the rename table cannot be
        found; nothing is rewritten then.
    """
    renames = connection.load_policy.renames
    new_classes = resolve_new_classes(renames)
    if oids is None:
        oids = oids_to_migrate(connection)
    oids = list(oids)
    _refuse_plain_classes_for_objects(connection, oids, renames, new_classes)
    _import_msgspec_classes(connection, oids)
    if convert is None:
        convert = connection.serializer.name != DEFAULT_SERIALIZER

    # Group the records by the serializer to write them with.
    groups: dict[str, list[bytes]] = {}
    for oid in oids:
        if convert:
            name = connection.serializer.name
        else:
            data = unpack_record(connection.storage.load(oid))[1]
            name = tagged_serializer_name(data) or DEFAULT_SERIALIZER
        groups.setdefault(name, []).append(oid)

    writing_with = connection.serializer
    done = 0
    unchanged: set[str] = set()
    try:
        for name, group in groups.items():
            connection.serializer = resolve_serializer(name)
            for oid in group:
                obj = connection.get(oid)
                if is_broken(obj):
                    unchanged.add(obj.broken_name)
                obj._p_note_change()
                done += 1
                if done % BATCH_SIZE == 0:
                    connection.commit()
                if progress is not None:
                    progress(1)
            connection.commit()
    finally:
        connection.serializer = writing_with
    if unchanged:
        log.warning(
            "records of classes that cannot be found (%s) were written back "
            "unchanged and still name the old classes they refer to: make their "
            "modules importable and migrate again",
            ", ".join(sorted(unchanged)),
        )
    log.info("migrated %d records", done)
    return done
