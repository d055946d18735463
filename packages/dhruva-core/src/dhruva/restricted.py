"""Loading pickle records under a :class:`~dhruva.serializer.LoadPolicy`.

Two things a policy adds to plain (Durus) loading:

- a rename table, ``{"old.module.Class": "new.module.Class"}``, applied to
  every class a pickle names (the object's own class, the classes of the
  objects it refers to, and the classes of plain values in its state);
- restricted mode, which loads only: persistent classes already defined in
  the process, dhruva's collections (PersistentDict, PersistentList,
  PersistentSet, BTree and its nodes, ...), the safe builtins and standard
  values in :data:`SAFE_GLOBALS`, and the classes the application names in
  ``allowed_classes``. Anything else is refused with
  :class:`~dhruva.serializer.RestrictedLoadError` naming the class, before any
  of it is called: a database from an untrusted source cannot run code
  through a pickle (``os.system``, ``subprocess.Popen``, ``eval``...).

A class that cannot be found loads as a broken placeholder (see
:mod:`dhruva.broken`), as without restricted mode, so that a missing class
does not make its container unloadable: a class of an imported module that
does not define it, or of a module that is not imported (restricted mode
imports none; the standard library's modules excepted, whose classes are
refused). A class that exists but is not allowed is refused.

Limitations:

- Restricted mode imports no module for a persistent class: import the
  modules that define your persistent classes before loading, or name those
  classes in ``allowed_classes``; until then their objects load as broken
  placeholders (with a warning in the log).
- It trusts the persistent classes and allowed classes themselves: their
  ``__setstate__`` runs on data from the file.
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import importlib
import logging
import sys
from types import SimpleNamespace
from typing import Any

from dhruva.broken import broken_class
from dhruva.serialize import (
    _DURUS_CLASSES,
    _ConnectionUnpickler,
    _import_renamed,
    rename_module,
)
from dhruva.serializer import LoadPolicy, RestrictedLoadError, find_loaded_class

log = logging.getLogger(__name__)

#: Values restricted mode loads besides persistent and allowed classes.
SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [("builtins", name) for name in (
        "object", "bool", "int", "float", "complex", "str", "bytes",
        "bytearray", "tuple", "list", "dict", "set", "frozenset", "slice",
        "range",
    )]
    + [("datetime", name) for name in (
        "datetime", "date", "time", "timedelta", "timezone",
    )]
    + [
        ("zoneinfo", "ZoneInfo"),
        ("decimal", "Decimal"),
        ("uuid", "UUID"),
        ("fractions", "Fraction"),
        ("collections", "OrderedDict"),
        ("collections", "deque"),
        ("copyreg", "_reconstructor"),
    ]
)  # fmt: skip

#: Module names of Python 2 pickles, as pickle maps them.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    # How protocol 2 pickles bytes: _codecs.encode(text, "latin1"), only that.
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise RestrictedLoadError(
            f"refused _codecs.encode with encoding {encoding!r}: restricted mode "
            "only decodes bytes written by pickle"
        )
    return _codecs.encode(text, "latin1")


class _SafeModule(SimpleNamespace):
    """Stands for a dhruva collection module inside a pickle."""


def _import_collection_module(name: str) -> _SafeModule:
    # dhruva writes the class of a referenced collection object as
    # getattr(importlib.import_module("durus.btree"), "BNode16"): allow that
    # for dhruva's own collection modules and nothing else.
    module_name = rename_module(name)
    head, _, tail = module_name.partition(".")
    if head != "dhruva" or tail not in _DURUS_CLASSES:
        raise RestrictedLoadError(
            f"refused to import module {name}: restricted mode imports only "
            "dhruva's collection modules"
        )
    module = _import_renamed(name)
    return _SafeModule(**{cls: getattr(module, cls) for cls in _DURUS_CLASSES[tail]})


#: ``getattr(cls, name)`` calls pickles make that restricted mode allows.
_SAFE_ATTRIBUTES = {("zoneinfo", "ZoneInfo", "_unpickle")}


def _safe_getattr(namespace: Any, name: str) -> Any:
    if isinstance(namespace, type) and (
        (namespace.__module__, namespace.__qualname__, name) in _SAFE_ATTRIBUTES
    ):
        return getattr(namespace, name)
    if type(namespace) is not _SafeModule:
        raise RestrictedLoadError(
            f"refused getattr({type(namespace).__name__}, {name!r}): restricted "
            "mode only looks up dhruva's collection classes"
        )
    try:
        return getattr(namespace, name)
    except AttributeError:
        raise RestrictedLoadError(
            f"refused to load {name}: not one of dhruva's collection classes"
        ) from None


class PolicyFinder:
    """Finds the class a pickle names, under one :class:`LoadPolicy`."""

    def __init__(self, policy: LoadPolicy) -> None:
        self.policy = policy
        self._warned: set[tuple[str, str]] = set()

    def find(self, module: str, name: str) -> Any:
        """Return what ``module.name`` in a pickle stands for.

        :raises RestrictedLoadError: in restricted mode, for anything it does
            not load.
        """
        if module == "dhruva.broken" and name == "find_class":
            return self.find
        module, name = self.policy.rename(module, name)
        if not self.policy.restricted:
            if module == "importlib" and name == "import_module":
                return _import_renamed
            try:
                return _find_global(rename_module(module), name)
            except (ImportError, AttributeError):
                return broken_class(module, name)
        return self._find_restricted(module, name)

    def _find_restricted(self, module: str, name: str) -> Any:
        # Python 2 names first (protocol 2 writes range as __builtin__.xrange).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _PY2_MODULES.get(module, module)
        if (module, name) in SAFE_GLOBALS:
            return _find_global(module, name)
        if module == "importlib" and name == "import_module":
            return _import_collection_module
        if module == "builtins" and name == "getattr":
            return _safe_getattr
        if module == "_codecs" and name == "encode":
            return _encode_latin1

        allowed = self.policy.find_allowed(module, name)
        if allowed is not None:
            return allowed
        if (module, name) in self.policy.allowed_names:
            return broken_class(module, name)  # named, but cannot be imported
        persistent = find_loaded_class(rename_module(module), name)
        if persistent is not None:
            return persistent
        if _cannot_be_found(rename_module(module), name):
            if (module, name) not in self._warned:
                self._warned.add((module, name))
                log.warning(
                    "restricted mode: class %s.%s is not defined in this process "
                    "(restricted mode imports no module); its objects load as "
                    "broken placeholders. Import the module that defines it "
                    "before loading, or name it in allowed_classes",
                    module,
                    name,
                )
            return broken_class(module, name)
        log.error("restricted mode refused class %s.%s", module, name)
        raise RestrictedLoadError(
            f"refused to load {module}.{name}: restricted mode loads only "
            "persistent classes already imported, dhruva's collections, safe "
            "builtins and the classes named in allowed_classes. If you trust it, "
            "add it to allowed_classes (or import its module first, if it is "
            "a persistent class)"
        )


def _cannot_be_found(module: str, name: str) -> bool:
    """Whether ``module.name`` is a class restricted mode cannot find.

    Nothing is imported: a class of a module already imported is missing when
    the module does not define it; a module not imported counts as missing
    (its objects load as placeholders), except the standard library's and
    built-in modules, whose names are refused as they exist.
    """
    loaded = sys.modules.get(module)
    if loaded is not None:
        value: Any = loaded
        for part in name.split("."):
            value = getattr(value, part, _MISSING)
            if value is _MISSING:
                return True
        return False
    top = module.partition(".")[0]
    return top not in sys.stdlib_module_names and top not in sys.builtin_module_names


_MISSING = object()


def _find_global(module: str, name: str) -> Any:
    # Python 2 names map as pickle maps them (__builtin__.set -> builtins.set).
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    value: Any = importlib.import_module(module)
    for part in name.split("."):
        value = getattr(value, part)
    return value


def policy_unpickler(policy: LoadPolicy) -> type[_ConnectionUnpickler]:
    """Return a connection unpickler class that finds classes by ``policy``."""
    finder = PolicyFinder(policy)

    class _PolicyUnpickler(_ConnectionUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            return finder.find(module, name)

    return _PolicyUnpickler


def policy_class_loader(policy: LoadPolicy) -> Any:
    """Return ``load(data) -> class`` reading the class pickle by ``policy``."""
    import io
    import pickle

    finder = PolicyFinder(policy)

    class _ClassUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return finder.find(module, name)

    def load_class(data: bytes) -> type[Any]:
        cls = _ClassUnpickler(io.BytesIO(data)).load()
        if not isinstance(cls, type):
            raise RestrictedLoadError(
                f"record data starts with {type(cls).__name__}, not a class"
            )
        return cls

    return load_class


__all__ = ["SAFE_GLOBALS", "PolicyFinder", "policy_class_loader", "policy_unpickler"]
