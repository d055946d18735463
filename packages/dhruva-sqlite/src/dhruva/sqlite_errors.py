"""The errors of :class:`~dhruva.sqlite_storage.SqliteStorage`, and where
SQLite's own exceptions are turned into them.

No ``sqlite3.Error`` leaves a SqliteStorage: each is raised again as one of
the :class:`~dhruva.error.StorageError` subclasses below, with a message that
names the database file, says what the storage was doing, and how to fix it.

- :class:`NotSqliteError`: the file is not a SQLite database at all.
- :class:`SqliteDamagedError`: a SQLite file whose pages are damaged or cut
  short (SQLite's ``SQLITE_CORRUPT`` and ``SQLITE_NOTADB``).
- :class:`SqliteLockedError`: another program held the file locked for longer
  than the storage's timeout (``SQLITE_BUSY``, ``SQLITE_LOCKED``).
- :class:`SqliteStorageError`: anything else (a full disk, an I/O error).
"""

from __future__ import annotations

import logging
import sqlite3

from dhruva.error import StorageError

log = logging.getLogger(__name__)

#: The first bytes of every SQLite 3 database file.
SQLITE_HEADER = b"SQLite format 3\0"


class SqliteStorageError(StorageError):
    """SQLite failed on a database file.

    :param message: what happened and how to fix it.
    :param path: the database file.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        #: The database file.
        self.path = path


class NotSqliteError(SqliteStorageError):
    """The file is not a SQLite database."""


class SqliteDamagedError(SqliteStorageError):
    """The file is a SQLite database, but damaged or cut short."""


class SqliteLockedError(SqliteStorageError):
    """Another program kept the file locked for longer than the timeout."""

    retryable = True


def _has_sqlite_header(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def _error_name(exc: sqlite3.Error) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    if isinstance(name, str):
        return name
    text = str(exc)
    if "locked" in text or "busy" in text:
        return "SQLITE_BUSY"
    if "malformed" in text:
        return "SQLITE_CORRUPT"
    if "not a database" in text:
        return "SQLITE_NOTADB"
    return "SQLITE_ERROR"


def storage_error(
    exc: sqlite3.Error, path: str, doing: str, timeout: float
) -> SqliteStorageError:
    """Return the error to raise for SQLite's ``exc``.

    :param exc: what SQLite raised.
    :param path: the database file.
    :param doing: what the storage was doing, as in "while {doing}".
    :param timeout: the seconds the storage waits for locks.
    """
    name = _error_name(exc)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return SqliteLockedError(
            f"{path} stayed locked by another program for {timeout:g} s while "
            f"{doing}; close the other program or raise the timeout",
            path,
        )
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        if not _has_sqlite_header(path):
            return NotSqliteError(
                f"{path} is not a SQLite database ({exc}); the sqlite storage "
                "opens SQLite files only. Check the path, or open the file with "
                "the storage kind that wrote it",
                path,
            )
        log.error("%s is damaged (%s) while %s", path, exc, doing)
        return SqliteDamagedError(
            f"{path} is a damaged SQLite database: SQLite found '{exc}' while "
            f"{doing}. Restore it from a backup (`dhruva backup` takes one); "
            f"`dhruva verify {path}` tells what can still be read",
            path,
        )
    if name.startswith("SQLITE_CANTOPEN"):
        return SqliteStorageError(
            f"SQLite cannot open {path} ({exc}): check that its folder exists "
            "and that you may read it (and write it, unless read-only)",
            path,
        )
    return SqliteStorageError(f"{path}: SQLite failed while {doing}: {exc}", path)


__all__ = [
    "SQLITE_HEADER",
    "NotSqliteError",
    "SqliteDamagedError",
    "SqliteLockedError",
    "SqliteStorageError",
    "storage_error",
]
