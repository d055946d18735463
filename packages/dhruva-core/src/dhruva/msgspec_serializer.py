"""The msgspec serializer: exact plain values, and loading that runs no code.

``Connection(storage, serializer="msgspec")`` writes records as MessagePack
(through msgspec). A state may hold, nested in any way:

None, bool, int (any size), float, str, bytes, bytearray, tuple, list, dict
(any hashable keys of these types), set, frozenset, datetime (naive, or aware
with a :class:`datetime.timezone` or :class:`zoneinfo.ZoneInfo`), date, time,
timedelta, Decimal, UUID, and persistent objects (stored as references).

Each value loads with the exact type it was stored with. Anything else (a
subclass of one of these types too) is refused at commit with a
:class:`~dhruva.serializer.SerializationError` naming the object, the
attribute and the type; nothing of the transaction is written.

Loading never imports a module and calls nothing but the persistent classes
already defined in the process (found by :func:`dhruva.serializer.find_loaded_class`),
so a database from an untrusted source cannot run code through these records.

Record payload, after the tag and class name (see :mod:`dhruva.serializer`)::

    REF-CLASS-NAMES joined by "\\n"  b"\\0"  msgpack(state)

Types msgpack lacks are msgpack extension values (codes below); a reference
is ``oid + index`` into the record's class names.

Limitations:

- Aliasing inside one state is not kept: a list held twice loads as two equal
  lists (pickle keeps it). A container that holds itself is refused.
- Classes a record names must be defined (their module imported) before it is
  loaded; a class that is not becomes a broken placeholder
  (:mod:`dhruva.broken`).
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
import zoneinfo
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec
from dhruva.broken import BROKEN_TYPES, BrokenState, broken_class, broken_record
from dhruva.persistent import PersistentBase
from dhruva.serialize import BaseWriter
from dhruva.serializer import (
    SerializationError,
    Serializer,
    class_name,
    dotted,
    find_loaded_class,
    make_tag,
    split_name,
    split_tagged,
)

if TYPE_CHECKING:
    from dhruva.connection import Connection

log = logging.getLogger(__name__)

Ext = msgspec.msgpack.Ext

# Extension codes.
REF, TUPLE, SET, FROZENSET, BYTEARRAY, BIGINT, DICT = 1, 2, 3, 4, 5, 6, 7
DATETIME, DATE, TIME, TIMEDELTA, DECIMAL, UUID = 8, 9, 10, 11, 12, 13

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

TAG = make_tag("msgspec")

SUPPORTED = (
    "None, bool, int, float, str, bytes, bytearray, tuple, list, dict, set, "
    "frozenset, datetime, date, time, timedelta, Decimal, UUID and persistent "
    "objects"
)


class _Unsupported(Exception):
    def __init__(self, value: Any, why: str = "") -> None:
        super().__init__(value)
        self.value = value
        self.why = why


def _encode_tz(tz: dt.tzinfo | None) -> Any:
    if tz is None:
        return None
    if type(tz) is dt.timezone:
        offset, *name = tz.__getinitargs__()  # type: ignore[attr-defined]
        return [offset // dt.timedelta(microseconds=1), *name]
    if type(tz) is zoneinfo.ZoneInfo and tz.key is not None:
        return tz.key
    raise _Unsupported(tz, "only datetime.timezone and zoneinfo.ZoneInfo")


def _decode_tz(value: Any) -> dt.tzinfo | None:
    if value is None:
        return None
    if type(value) is str:
        return zoneinfo.ZoneInfo(value)
    return dt.timezone(dt.timedelta(microseconds=value[0]), *value[1:])


class MsgspecWriter(BaseWriter):
    """Writes the records of one commit with msgspec."""

    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self._encode = msgspec.msgpack.Encoder().encode
        self._classes: dict[type, int] = {}
        self._converters: dict[type, Any] = {
            type(None): _same,
            bool: _same,
            float: _same,
            str: _same,
            bytes: _same,
            int: _int,
            list: self._list,
            dict: self._dict,
            tuple: self._tuple,
            set: self._set,
            frozenset: self._frozenset,
            bytearray: _bytearray,
            dt.datetime: self._datetime,
            dt.date: self._date,
            dt.time: self._time,
            dt.timedelta: self._timedelta,
            Decimal: _decimal,
            uuid.UUID: _uuid,
        }

    def convert(self, value: Any) -> Any:
        """Return ``value`` as msgspec encodes it exactly (raises _Unsupported)."""
        converter = self._converters.get(type(value))
        if converter is not None:
            return converter(value)
        if isinstance(value, PersistentBase):
            oid = self._reference(value)
            cls = type(value)
            index = self._classes.setdefault(cls, len(self._classes))
            return Ext(REF, oid + index.to_bytes(4, "big"))
        raise _Unsupported(value)

    def _list(self, value: list[Any]) -> Any:
        convert = self.convert
        return [convert(item) for item in value]

    def _dict(self, value: dict[Any, Any]) -> Any:
        convert = self.convert
        if all(type(key) is str for key in value):
            return {key: convert(item) for key, item in value.items()}
        flat = []
        for key, item in value.items():
            flat.append(convert(key))
            flat.append(convert(item))
        return Ext(DICT, self._encode(flat))

    def _tuple(self, value: tuple[Any, ...]) -> Any:
        return Ext(TUPLE, self._encode(self._list(value)))  # type: ignore[arg-type]

    def _set(self, value: set[Any]) -> Any:
        return Ext(SET, self._encode([self.convert(item) for item in value]))

    def _frozenset(self, value: frozenset[Any]) -> Any:
        return Ext(FROZENSET, self._encode([self.convert(item) for item in value]))

    def _datetime(self, v: dt.datetime) -> Any:
        fields = [v.year, v.month, v.day, v.hour, v.minute, v.second]
        fields += [v.microsecond, v.fold, _encode_tz(v.tzinfo)]
        return Ext(DATETIME, self._encode(fields))

    def _date(self, v: dt.date) -> Any:
        return Ext(DATE, self._encode([v.year, v.month, v.day]))

    def _time(self, v: dt.time) -> Any:
        fields = [v.hour, v.minute, v.second, v.microsecond, v.fold]
        return Ext(TIME, self._encode([*fields, _encode_tz(v.tzinfo)]))

    def _timedelta(self, v: dt.timedelta) -> Any:
        return Ext(TIMEDELTA, self._encode([v.days, v.seconds, v.microseconds]))

    def get_state(self, obj: PersistentBase) -> tuple[bytes, bytes]:
        """Return ``(data, refs)`` for ``obj``'s record.

        :raises SerializationError: naming the object, the attribute and the
            type of a value msgspec records cannot hold exactly.
        """
        if type(obj) in BROKEN_TYPES:
            return broken_record(obj)
        self._refs.clear()
        self._classes = {}
        state = obj.__getstate__()
        try:
            payload = self._encode(self.convert(state))
        except _Unsupported as unsupported:
            raise _refusal(obj, state, unsupported) from None
        except UnicodeEncodeError as error:
            text = _find_unencodable(state)
            why = f"a lone surrogate {error.object[error.start]!r}, not UTF-8"
            raise _refusal(obj, state, _Unsupported(text, why)) from None
        except RecursionError:
            raise SerializationError(
                f"cannot store {_describe(obj)} with the msgspec serializer: its "
                "state nests too deeply or holds itself; msgspec records keep "
                "trees of values only"
            ) from None
        names = "\n".join(class_name(cls) for cls in self._classes).encode()
        header = TAG + class_name(type(obj)).encode() + b"\0" + names + b"\0"
        self._refs.discard(obj._p_oid)
        return header + payload, b"".join(sorted(self._refs))


def _same(value: Any) -> Any:
    return value


def _int(value: int) -> Any:
    if _INT_MIN <= value <= _INT_MAX:
        return value
    size = (value.bit_length() + 8) // 8
    return Ext(BIGINT, value.to_bytes(size, "big", signed=True))


def _bytearray(value: bytearray) -> Any:
    return Ext(BYTEARRAY, bytes(value))


def _decimal(value: Decimal) -> Any:
    return Ext(DECIMAL, str(value).encode("ascii"))


def _uuid(value: uuid.UUID) -> Any:
    return Ext(UUID, value.bytes)


def _describe(obj: PersistentBase) -> str:
    cls = type(obj)
    oid = obj._p_oid
    number = "new" if oid is None else int.from_bytes(oid, "big")
    return f"{cls.__module__}.{cls.__qualname__} oid {number}"


def _find_path(container: Any, target: Any, path: str = "") -> str | None:
    # Where ``target`` sits inside ``container``, as Python would index it.
    if container is target:
        return path
    if type(container) is dict:
        for key, value in container.items():
            if key is target:
                return f"{path} (a key)"
            found = _find_path(value, target, f"{path}[{key!r}]")
            if found is not None:
                return found
    elif type(container) in (list, tuple):
        for i, value in enumerate(container):
            found = _find_path(value, target, f"{path}[{i}]")
            if found is not None:
                return found
    elif type(container) in (set, frozenset):
        for value in container:
            found = _find_path(value, target, f"{path} (an element)")
            if found is not None:
                return found
    return None


def _find_unencodable(value: Any) -> Any:
    # The first str inside ``value`` that UTF-8 cannot encode (lone surrogates).
    if type(value) is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value
        return None
    items: Any = ()
    if type(value) is dict:
        items = [item for pair in value.items() for item in pair]
    elif type(value) in (list, tuple, set, frozenset):
        items = value
    for item in items:
        found = _find_unencodable(item)
        if found is not None:
            return found
    return None


def _refusal(obj: PersistentBase, state: Any, error: _Unsupported) -> Exception:
    value = error.value
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    where = "the state"
    if type(state) is dict:
        for key, item in state.items():
            path = _find_path(item, value, f"[{key!r}]")
            if path is not None:
                where = f"attribute {key!r}"
                if path != f"[{key!r}]":
                    where += f" (at {path})"
                break
    else:
        path = _find_path(state, value)
        if path:
            where = f"the state at {path}"
    why = f" ({error.why})" if error.why else ""
    return SerializationError(
        f"cannot store {_describe(obj)} with the msgspec serializer: {where} "
        f"holds a {kind}{why}, which msgspec records do not keep exactly. They "
        f"keep {SUPPORTED}. Convert the value, or write this object with "
        "serializer='pickle'; nothing of this transaction was written"
    )


class MsgspecReader:
    """Reads msgspec records for one connection; imports and runs nothing."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._get_instance = connection.cache.get_instance
        self._decode = msgspec.msgpack.Decoder(ext_hook=self._ext).decode
        self._ref_classes: list[type] = []
        self._missing: set[str] = set()  # classes already warned about
        policy = connection.load_policy
        self._rename = policy.rename
        self._ext_decoders: dict[int, Any] = {
            REF: self._ref,
            TUPLE: lambda data: tuple(self._decode(data)),
            SET: lambda data: set(self._decode(data)),
            FROZENSET: lambda data: frozenset(self._decode(data)),
            BYTEARRAY: bytearray,
            BIGINT: lambda data: int.from_bytes(data, "big", signed=True),
            DICT: self._dict,
            DATETIME: self._datetime,
            DATE: lambda data: dt.date(*self._decode(data)),
            TIME: self._time,
            TIMEDELTA: lambda data: dt.timedelta(*self._decode(data)),
            DECIMAL: lambda data: Decimal(bytes(data).decode("ascii")),
            UUID: lambda data: uuid.UUID(bytes=bytes(data)),
        }

    def find_class(self, name: str) -> type[Any]:
        """Return the persistent class ``module:qualname``, never importing."""
        module, qualname = self._rename(*split_name(name))
        cls = find_loaded_class(module, qualname)
        if cls is None:
            if name in self._missing:
                return broken_class(module, qualname)
            self._missing.add(name)
            log.warning(
                "class %s of a msgspec record is not defined in this process "
                "(msgspec records never import modules): import its module first",
                dotted(name),
            )
            return broken_class(module, qualname)
        return cls

    def get_class(self, data: bytes) -> type[Any]:
        """Return the class named in a msgspec record's header."""
        return self.find_class(split_tagged(data)[1])

    def get_state(self, data: bytes) -> Any:
        """Return the state in a msgspec record, references as ghosts."""
        _name, cls_name, payload = split_tagged(data)
        names, _, body = payload.partition(b"\0")
        self._ref_classes = [
            self.find_class(name) for name in names.decode().split("\n") if name
        ]
        try:
            state = self._decode(body)
        except (msgspec.DecodeError, ValueError, TypeError, LookupError) as error:
            raise SerializationError(
                f"the msgspec record of a {dotted(cls_name)} is damaged: {error}"
            ) from error
        if self.find_class(cls_name) in BROKEN_TYPES:
            refs = b"".join(sorted(o._p_oid for o in _refs_in(state)))
            return BrokenState(state, data, refs)
        return state

    def _ext(self, code: int, data: memoryview) -> Any:
        decoder = self._ext_decoders.get(code)
        if decoder is None:
            raise SerializationError(f"unknown msgpack extension code {code}")
        return decoder(data)

    def _ref(self, data: memoryview) -> Any:
        oid = bytes(data[:8])
        cls = self._ref_classes[int.from_bytes(data[8:], "big")]
        return self._get_instance(oid, cls, self.connection)

    def _dict(self, data: memoryview) -> Any:
        flat = self._decode(data)
        items = iter(flat)
        return dict(zip(items, items, strict=True))

    def _datetime(self, data: memoryview) -> Any:
        y, mo, d, h, mi, s, us, fold, tz = self._decode(data)
        return dt.datetime(y, mo, d, h, mi, s, us, tzinfo=_decode_tz(tz), fold=fold)

    def _time(self, data: memoryview) -> Any:
        h, mi, s, us, fold, tz = self._decode(data)
        return dt.time(h, mi, s, us, tzinfo=_decode_tz(tz), fold=fold)


def _refs_in(value: Any) -> list[Any]:
    # The persistent objects a loaded state refers to.
    found = []
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, PersistentBase):
            found.append(item)
        elif type(item) is dict:
            pending.extend(item.keys())
            pending.extend(item.values())
        elif type(item) in (list, tuple, set, frozenset):
            pending.extend(item)
    return found


class MsgspecSerializer(Serializer):
    """Registered as ``msgspec`` by dhruva-core's plugin."""

    name = "msgspec"
    description = "msgpack of exact plain types; loading runs no code"

    def new_writer(self, connection: Connection) -> MsgspecWriter:
        return MsgspecWriter(connection)

    def new_reader(self, connection: Connection) -> MsgspecReader:
        return MsgspecReader(connection)
