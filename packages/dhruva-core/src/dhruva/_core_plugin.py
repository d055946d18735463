"""The built-in plugin of dhruva-core: the memory storage."""

from __future__ import annotations

from typing import Any

from dhruva.hookspecs import hookimpl
from dhruva.registry import StorageKind, StorageRegistry


def _open_memory(path: str | None, **options: Any) -> Any:
    from dhruva.storage import MemoryStorage

    return MemoryStorage()


@hookimpl
def dhruva_register_storages(registry: StorageRegistry) -> None:
    registry.add(
        StorageKind(
            name="memory",
            open=_open_memory,
            description="records in a dict; nothing survives the process",
            file_based=False,
            distribution="dhruva-core",
        )
    )
