"""The plugin of dhruva-file: registers its file storages, recognizes their files.

The kinds are ``file`` (FileStorage, "SHELF-1") and ``file2`` (FileStorage2,
"DFS20"). The storages themselves are imported only when a file is opened.
"""

from __future__ import annotations

import os
from typing import Any

from dhruva.hookspecs import hookimpl
from dhruva.registry import StorageKind, StorageRegistry
from dhruva.storage import Storage

#: The first bytes of a FileStorage ("SHELF-1") file.
SHELF_PREFIX = b"SHELF-1"

#: The first bytes of a FileStorage2 ("DFS20") file.
DFS20_PREFIX = b"DFS20"


def _open_file(
    path: str | os.PathLike[str] | None,
    *,
    readonly: bool = False,
    repair: bool = False,
    **options: Any,
) -> Storage:
    from dhruva.file_storage import FileStorage

    if options:
        names = ", ".join(sorted(options))
        raise TypeError(f"the file storage takes no options {names}")
    return FileStorage(path, readonly=readonly, repair=repair)


def _open_file2(
    path: str | os.PathLike[str] | None,
    *,
    readonly: bool = False,
    repair: bool = False,
    **options: Any,
) -> Storage:
    from dhruva.file_storage2 import FileStorage2

    if options:
        names = ", ".join(sorted(options))
        raise TypeError(f"the file2 storage takes no options {names}")
    return FileStorage2(path, readonly=readonly, repair=repair)


@hookimpl
def dhruva_register_storages(registry: StorageRegistry) -> None:
    registry.add(
        StorageKind(
            name="file",
            open=_open_file,
            description="one append-only file in Durus's SHELF-1 format",
            file_based=True,
            distribution="dhruva-file",
        )
    )
    registry.add(
        StorageKind(
            name="file2",
            open=_open_file2,
            description="one file in Durus's FileStorage2 (DFS20) format",
            file_based=True,
            distribution="dhruva-file",
        )
    )


@hookimpl
def dhruva_recognize_storage(path: str, header: bytes) -> str | None:
    if header.startswith(SHELF_PREFIX):
        return "file"
    if header.startswith(DFS20_PREFIX):
        return "file2"
    return None
