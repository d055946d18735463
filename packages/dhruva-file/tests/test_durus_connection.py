"""A Connection on a FileStorage of a file Durus 4.3 wrote: every manifest value."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage

FIXTURES = (
    Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures" / "durus-4"
)
NAME = "legacy-shelf.durus"

pytestmark = pytest.mark.skipif(
    not (FIXTURES / NAME).exists(),
    reason=f"the Durus fixtures are not there ({FIXTURES}); they come with "
    "the shared folder next to the checkout",
)


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Iterator[Path]:
    """A writable copy of the Durus file, with its model module importable."""
    monkeypatch.syspath_prepend(str(FIXTURES))
    path = tmp_path / NAME
    shutil.copyfile(FIXTURES / NAME, path)
    yield path
    sys.modules.pop("legacy_model", None)


@pytest.fixture
def manifest() -> dict[str, Any]:
    return dict(json.loads((FIXTURES / "manifest.json").read_text())[NAME])


def canonical(value: Any) -> Any:
    """Write frozensets as ("frozenset", sorted list), as the manifest does."""
    if isinstance(value, frozenset):
        return ("frozenset", sorted(value))
    return value


def people_digest(people: Any) -> str:
    """SHA-256 of one line per person, in key order, as the manifest has it:
    ``key|name|age|tag,tag|friend name,friend name`` and a newline, UTF-8."""
    digest = hashlib.sha256()
    for key, p in people.items():
        fields = [key, p.name, p.age, ",".join(p.tags)]
        fields.append(",".join(friend.name for friend in p.friends))
        digest.update(("|".join(str(f) for f in fields) + "\n").encode())
    return digest.hexdigest()


def observed(root: Any) -> dict[str, Any]:
    """The values the manifest lists, read through the object model."""
    numbers = root["numbers"]
    values = sorted((k, canonical(v)) for k, v in root["values"].items())
    return {
        "blob_sha256": hashlib.sha256(root["blob"]).hexdigest(),
        "by_name_len": len(root["by_name"]),
        "counter": root["counter"].value,
        "evens": sorted(root["evens"]),
        "log": list(root["log"]),
        "numbers_len": len(numbers),
        "numbers_max": max(numbers),
        "numbers_min": min(numbers),
        "numbers_sum": sum(numbers.values()),
        "people_len": len(root["people"]),
        "people_sha256": people_digest(root["people"]),
        "root_keys": sorted(root.keys()),
        "slotted": [root["slotted"].x, root["slotted"].y],
        "values_canonical_repr": repr(values),
    }


def check(root: Any, manifest: dict[str, Any]) -> None:
    got = observed(root)
    assert set(got) == set(manifest), "the manifest lists other values"
    for key, wanted in manifest.items():
        assert got[key] == wanted, key
    # Same people behind both indexes.
    for key, person in root["people"].items():
        assert root["by_name"][person.name] is person, key


def test_every_manifest_value_reads_back(legacy, manifest):
    connection = Connection(FileStorage(legacy))
    try:
        check(connection.get_root(), manifest)
    finally:
        connection.get_storage().close()


def test_a_commit_appends_and_everything_reads_back_after_reopen(legacy, manifest):
    from legacy_model import Person  # type: ignore[import-not-found]

    size = legacy.stat().st_size
    connection = Connection(FileStorage(legacy))
    root = connection.get_root()
    root["counter"].bump()
    newcomer = Person("Zed-9999", 33)
    root["people"][9999] = newcomer
    root["by_name"][newcomer.name] = newcomer
    connection.commit()
    connection.get_storage().close()
    assert legacy.stat().st_size > size
    assert legacy.read_bytes()[:size] == (FIXTURES / NAME).read_bytes()

    connection = Connection(FileStorage(legacy))
    try:
        root = connection.get_root()
        assert root["counter"].value == manifest["counter"] + 1
        assert root["people"][9999].name == "Zed-9999"
        assert root["by_name"]["Zed-9999"] is root["people"][9999]
        del root["people"][9999]
        del root["by_name"]["Zed-9999"]
        root["counter"].value -= 1
        connection.commit()
        check(root, manifest)
    finally:
        connection.get_storage().close()

    # And once more from the file, after a pack.
    connection = Connection(FileStorage(legacy))
    try:
        connection.pack()
        check(connection.get_root(), manifest)
    finally:
        connection.get_storage().close()
    connection = Connection(FileStorage(legacy, readonly=True))
    try:
        check(connection.get_root(), manifest)
    finally:
        connection.get_storage().close()
