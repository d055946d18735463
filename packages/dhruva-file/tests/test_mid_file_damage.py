"""Damage before the last transaction of a SHELF-1 file is not a torn tail."""

import pytest
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage
from dhruva.shelf import MidFileDamageError


def four_commits(path):
    """Commit four times; return the byte offset where the second commit starts."""
    connection = Connection(FileStorage(str(path)))
    starts = []
    for i in range(4):
        starts.append(path.stat().st_size)
        connection.get_root()[f"k{i}"] = "v" * 50
        connection.commit()
    connection.close()
    return starts[1]


def damage_record_at(path, start):
    data = bytearray(path.read_bytes())
    # A transaction: its length (8), then a record: its length (8) and oid (8),
    # which the record repeats: flip a byte of the record's own oid.
    data[start + 8 + 8 + 8 + 7] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damage_before_later_commits_is_refused_even_with_repair(tmp_path):
    path = tmp_path / "db.durus"
    damage_record_at(path, four_commits(path))
    before = path.read_bytes()

    with pytest.raises(MidFileDamageError, match="not an incomplete last commit"):
        FileStorage(str(path))
    with pytest.raises(MidFileDamageError, match="refused"):
        FileStorage(str(path), repair=True)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.torn-*"))


def test_a_cut_last_transaction_is_still_repaired(tmp_path):
    path = tmp_path / "db.durus"
    four_commits(path)
    path.write_bytes(path.read_bytes()[:-5])
    storage = FileStorage(str(path), repair=True)
    storage.close()
    connection = Connection(FileStorage(str(path)))
    assert sorted(connection.get_root()) == ["k0", "k1", "k2"]
    connection.close()
