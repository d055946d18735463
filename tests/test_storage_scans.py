"""Full-scan tools (census, every instance) on the three Durus-written files.

The three files were written by Durus from the same transactions, so a scan
of every record must count the same classes in each, unreachable records
included, and a pack must leave only what the root reaches.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dhruva.connection import Connection, gen_every_instance
from dhruva.plugins import open_storage
from dhruva.storage import get_census

FIXTURES = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "durus-4"
)
FILES = ["legacy-shelf.durus", "legacy-filestorage2.dfs20", "legacy-sqlite.sqlite"]

pytestmark = pytest.mark.skipif(
    not FIXTURES.exists(), reason=f"the Durus fixtures are not there ({FIXTURES})"
)

#: What every file holds: 1990 people in the tree, 10 deleted ones left behind.
CENSUS = {
    "dhruva.btree.BNode16": 465,
    "dhruva.btree.BTree": 2,
    "dhruva.persistent_dict.PersistentDict": 2,
    "dhruva.persistent_list.PersistentList": 2001,
    "dhruva.persistent_set.PersistentSet": 1,
    "legacy_model.Counter": 1,
    "legacy_model.Person": 2000,
    "legacy_model.Point": 1,
}


@pytest.fixture
def legacy_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(FIXTURES))
    yield
    sys.modules.pop("legacy_model", None)


@pytest.mark.parametrize("name", FILES)
def test_census_counts_every_record(name, tmp_path):
    path = tmp_path / name
    shutil.copyfile(FIXTURES / name, path)
    with open_storage(path, readonly=True) as storage:
        assert get_census(storage) == CENSUS
        assert storage.get_size() == sum(CENSUS.values())


@pytest.mark.parametrize("name", FILES)
def test_every_instance_then_pack(name, tmp_path, legacy_model):
    path = tmp_path / name
    shutil.copyfile(FIXTURES / name, path)
    from legacy_model import Person  # type: ignore[import-not-found]

    with Connection(open_storage(path)) as connection:
        people = list(gen_every_instance(connection, Person))
        assert len(people) == 2000
        in_tree = {id(p) for p in connection.get_root()["people"].values()}
        assert len(in_tree) == 1990
        assert in_tree < {id(p) for p in people}

        connection.pack()
        assert len(list(gen_every_instance(connection, Person))) == 1990
        census = get_census(connection.storage)
        assert census["legacy_model.Person"] == 1990
