"""Durus-written databases under restricted mode, and migrated to msgspec.

The fixture files (copied to a temporary folder) were written by Durus 4.3.
A restricted connection must read all of them, since they hold only
persistent classes (the fixture's ``legacy_model``), dhruva collections and
safe builtins; ``dhruva migrate --serializer msgspec`` must turn every record
into a msgspec record that reads back the same.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from dhruva.cli import make_cli
from dhruva.connection import Connection
from dhruva.plugins import Plugins, open_storage
from dhruva.record import unpack_record

FIXTURES = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "durus-4"
)
FILES = ["legacy-shelf.durus", "legacy-sqlite.sqlite", "legacy-filestorage2.dfs20"]

pytestmark = pytest.mark.skipif(
    not (FIXTURES / "manifest.json").exists(),
    reason=f"the Durus fixtures are not at {FIXTURES}",
)


@pytest.fixture
def model(tmp_path: Path) -> Iterator[Path]:
    """The fixture folder copied, with ``legacy_model`` imported from it."""
    shutil.copytree(FIXTURES, tmp_path / "fixtures")
    folder = tmp_path / "fixtures"
    sys.path.insert(0, str(folder))
    importlib.import_module("legacy_model")

    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("legacy_model", None)


def summary(root: Any) -> dict[str, Any]:
    numbers = root["numbers"]
    return {
        "root_keys": sorted(root.keys()),
        "counter": root["counter"].value,
        "people_len": len(root["people"]),
        "by_name_len": len(root["by_name"]),
        "numbers_len": len(numbers),
        "numbers_min": numbers.get_min_item()[0],
        "numbers_max": numbers.get_max_item()[0],
        "numbers_sum": sum(numbers.values()),
        "evens": sorted(root["evens"]),
        "log": list(root["log"]),
        "slotted": [root["slotted"].x, root["slotted"].y],
        "blob_sha256": hashlib.sha256(root["blob"]).hexdigest(),
    }


def canonical(values: Any) -> str:
    # As the fixture's manifest writes the "values" dict.
    items = []
    for key, value in sorted(values.items()):
        if isinstance(value, frozenset):
            value = ("frozenset", sorted(value))
        items.append((key, value))
    return repr(items)


def check(path: Path, name: str) -> None:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())[name]
    connection = Connection(open_storage(path), restricted=True)
    try:
        found = summary(connection.get_root())
        found["values_canonical_repr"] = canonical(connection.get_root()["values"])
    finally:
        connection.close()
    assert found == {key: manifest[key] for key in found}


@pytest.mark.parametrize("name", FILES)
def test_restricted_mode_reads_durus_databases(model: Path, name: str) -> None:
    check(model / name, name)


@pytest.mark.parametrize("name", FILES)
def test_durus_databases_migrate_to_msgspec(model: Path, name: str) -> None:
    path = model / name
    result = CliRunner().invoke(
        make_cli(Plugins()), ["migrate", str(path), "--serializer", "msgspec"]
    )
    assert result.exit_code == 0, result.output
    storage = open_storage(path, readonly=True)
    try:
        starts = {
            unpack_record(record)[1][:9] for _oid, record in storage.gen_oid_record()
        }
    finally:
        storage.close()
    assert starts == {b"\0msgspec\0"}
    check(path, name)
