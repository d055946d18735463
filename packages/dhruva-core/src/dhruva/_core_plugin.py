"""The built-in plugin of dhruva-core: the memory storage and the serializers."""

from __future__ import annotations

from typing import Any

from dhruva.hookspecs import hookimpl
from dhruva.registry import (
    SerializerKind,
    SerializerRegistry,
    StorageKind,
    StorageRegistry,
)


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


def _pickle() -> Any:
    from dhruva.serialize import PickleSerializer

    return PickleSerializer()


def _msgspec() -> Any:
    from dhruva.serializer import require_library

    require_library("msgspec", "msgspec")
    from dhruva.msgspec_serializer import MsgspecSerializer

    return MsgspecSerializer()


def _dill() -> Any:
    from dhruva.serializer import require_library

    require_library("dill", "dill")
    from dhruva.dill_serializer import DillSerializer

    return DillSerializer()


@hookimpl
def dhruva_register_serializers(registry: SerializerRegistry) -> None:
    registry.add(
        SerializerKind(
            name="pickle",
            factory=_pickle,
            description="pickle, Durus-compatible records (the default)",
        )
    )
    registry.add(
        SerializerKind(
            name="msgspec",
            factory=_msgspec,
            description="msgpack of exact plain types; loading runs no code",
            install="pip install 'dhruva-core[msgspec]'",
        )
    )
    registry.add(
        SerializerKind(
            name="dill",
            factory=_dill,
            description="dill: also functions, lambdas and closures",
            install="pip install 'dhruva-core[dill]'",
        )
    )
