"""The dill serializer: functions, lambdas and closures in persistent objects.

``Connection(storage, serializer="dill")`` writes states with dill, which
pickles what pickle cannot: lambdas, nested functions and closures, functions
defined in ``__main__`` (by value, with the globals they use). They load in
another process without the code that defined them.

Record payload, after the tag and class name (see :mod:`dhruva.serializer`)::

    b"dill " DILL-VERSION b" python " PYTHON-VERSION b"\\n" pickle(state)

References to persistent objects are persistent ids ``(oid, "module:qualname")``.

Limitations:

- Code objects are tied to the Python version that made them: a record written
  under another Python (or dill) version may fail to load. The error then
  names the versions that wrote it, so it can be loaded with those and
  written again.
- Loading a dill record runs whatever it holds, like any pickle: a restricted
  connection refuses dill records.
"""

from __future__ import annotations

import importlib
import io
import logging
import platform
from typing import TYPE_CHECKING, Any

import dill  # type: ignore[import-untyped]
from dhruva.broken import BROKEN_TYPES, BrokenState, broken_class, broken_record
from dhruva.persistent import PersistentBase
from dhruva.serialize import BaseWriter, rename_module
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

TAG = make_tag("dill")

#: The pickle protocol of dill records.
PROTOCOL = 4


def version_line() -> bytes:
    """Return the payload's first line: the running dill and Python versions."""
    return f"dill {dill.__version__} python {platform.python_version()}\n".encode()


class _Pickler(dill.Pickler):
    writer: DillWriter

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, PersistentBase):
            return self.writer._reference(obj), class_name(type(obj))
        return None


class DillWriter(BaseWriter):
    """Writes the records of one commit with dill."""

    def get_state(self, obj: PersistentBase) -> tuple[bytes, bytes]:
        """Return ``(data, refs)`` for ``obj``'s record."""
        if type(obj) in BROKEN_TYPES:
            return broken_record(obj)
        self._refs.clear()
        buffer = io.BytesIO()
        buffer.write(TAG + class_name(type(obj)).encode() + b"\0" + version_line())
        pickler = _Pickler(buffer, PROTOCOL, recurse=True)
        pickler.writer = self
        try:
            pickler.dump(obj.__getstate__())
        except (TypeError, AttributeError, dill.PicklingError) as error:
            oid = int.from_bytes(obj._p_oid or b"", "big")
            cls = type(obj)
            raise SerializationError(
                f"cannot store {cls.__module__}.{cls.__qualname__} oid {oid} "
                f"with the dill serializer: {error}; nothing of this transaction "
                "was written"
            ) from error
        self._refs.discard(obj._p_oid)
        return buffer.getvalue(), b"".join(sorted(self._refs))


class DillReader:
    """Reads dill records for one connection."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._rename = connection.load_policy.rename
        reader = self

        class _Unpickler(dill.Unpickler):
            def persistent_load(self, pid: Any) -> Any:
                oid, name = pid
                return connection.cache.get_instance(
                    oid, reader.find_class(name), connection
                )

            def find_class(self, module: str, name: str) -> Any:
                module, name = reader._rename(module, name)
                try:
                    return super().find_class(rename_module(module), name)
                except (ImportError, AttributeError):
                    return broken_class(module, name)

        self._unpickler = _Unpickler

    def find_class(self, name: str) -> type[Any]:
        """Return the class ``module:qualname``, importing its module if needed."""
        module, qualname = self._rename(*split_name(name))
        module = rename_module(module)
        cls = find_loaded_class(module, qualname)
        if cls is not None:
            return cls
        try:
            value: Any = importlib.import_module(module)
            for part in qualname.split("."):
                value = getattr(value, part)
        except (ImportError, AttributeError):
            return broken_class(module, qualname)
        found: type[Any] = value
        return found

    def get_class(self, data: bytes) -> type[Any]:
        """Return the class named in a dill record's header."""
        return self.find_class(split_tagged(data)[1])

    def get_state(self, data: bytes) -> Any:
        """Return the state in a dill record.

        :raises SerializationError: when it cannot be loaded here, naming the
            dill and Python versions that wrote it.
        """
        _name, cls_name, payload = split_tagged(data)
        line, _, body = payload.partition(b"\n")
        unpickler = self._unpickler(io.BytesIO(body))
        try:
            state = unpickler.load()
        except Exception as error:
            written = line.decode("ascii", "replace")
            running = version_line().decode().strip()
            if written == running:
                raise SerializationError(
                    f"cannot load the dill record of a {dotted(cls_name)}, "
                    f"written by the running versions ({written}): "
                    f"{type(error).__name__}: {error}. The record is damaged, "
                    "or holds something this process cannot rebuild; "
                    "`dhruva verify` lists damaged records"
                ) from error
            raise SerializationError(
                f"cannot load the dill record of a {dotted(cls_name)}: it was "
                f"written by {written.replace(' python', ' under Python')}, and "
                f"this is {running.replace(' python', ' under Python')} "
                f"({type(error).__name__}: {error}). Load it with the versions "
                "that wrote it and store it again"
            ) from error
        if self.find_class(cls_name) in BROKEN_TYPES:
            return BrokenState(state, data, _refs(body))
        return state


def _refs(body: bytes) -> bytes:
    # The oids of the persistent ids in a dill pickle, without loading it.
    oids: set[bytes] = set()

    class _Collector(dill.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            oids.add(pid[0])
            return None

    try:
        _Collector(io.BytesIO(body)).load()
    except Exception:  # the state has been loaded once already
        log.debug("cannot list the references of a broken dill record")
    return b"".join(sorted(oids))


class DillSerializer(Serializer):
    """Registered as ``dill`` by dhruva-core's plugin."""

    name = "dill"
    description = "dill: also functions, lambdas and closures"

    def new_writer(self, connection: Connection) -> DillWriter:
        return DillWriter(connection)

    def new_reader(self, connection: Connection) -> DillReader:
        return DillReader(connection)
