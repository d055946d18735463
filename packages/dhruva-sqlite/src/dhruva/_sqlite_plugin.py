"""The built-in plugin of dhruva-sqlite: the ``sqlite`` storage kind.

SQLite is part of the standard library; the storage module is still imported
only when a file is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dhruva.error import StorageError
from dhruva.hookspecs import hookimpl

if TYPE_CHECKING:
    from dhruva.registry import StorageRegistry
    from dhruva.storage import Storage

#: The first bytes of every SQLite 3 database file.
_SQLITE_HEADER = b"SQLite format 3\0"

#: File name endings that make ``dhruva convert`` write a SQLite database.
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")


def _open_sqlite(
    path: str | None, readonly: bool = False, repair: bool = False, **options: Any
) -> Storage:
    if path is None:
        raise StorageError(
            "the sqlite storage keeps its data in a file: give a path "
            "(a temporary database is not supported)"
        )
    from dhruva.sqlite_storage import SqliteStorage

    return SqliteStorage(path, readonly=readonly, repair=repair, **options)


@hookimpl
def dhruva_register_storages(registry: StorageRegistry) -> None:
    from dhruva.registry import StorageKind

    registry.add(
        StorageKind(
            name="sqlite",
            open=_open_sqlite,
            description="records in one SQLite table, the Durus SqliteStorage layout",
            file_based=True,
            distribution="dhruva-sqlite",
            suffixes=SQLITE_SUFFIXES,
        )
    )


@hookimpl
def dhruva_recognize_storage(path: str, header: bytes) -> str | None:
    if header.startswith(_SQLITE_HEADER):
        return "sqlite"
    return None
