"""Point in time for FileStorage and FileStorage2: the list of commits, views
as of one of them, restoring one to a new file, and the CLI commands."""

from __future__ import annotations

import fcntl
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from dhruva.cli import make_cli
from dhruva.connection import Connection
from dhruva.error import StorageError
from dhruva.file_history import list_transactions, open_file, read_history, restore
from dhruva.file_storage import FileLockedError, FileStorage
from dhruva.file_storage2 import FileStorage2
from dhruva.plugins import open_storage
from dhruva.shelf import MidFileDamageError, TornTailError

#: "file" makes new files in dhruva's DHRUVA1 format, "shelf" in Durus's SHELF-1.
KINDS = {"file": FileStorage, "file2": FileStorage2, "shelf": FileStorage}

FIXTURES = (
    Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures" / "durus-4"
)


@pytest.fixture(params=sorted(KINDS))
def kind(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> type[FileStorage]:
    if request.param == "shelf":
        # New files as FileStorage(path, format="durus") makes them.
        monkeypatch.setattr("dhruva.checked_file.DEFAULT_FORMAT", "durus")
    return KINDS[request.param]


@pytest.fixture
def counted(tmp_path: Path, kind: type[FileStorage]) -> tuple[Path, list[int]]:
    """A file whose root["n"] is 0, 1, 2, 3 in four commits, with the file's
    size after each."""
    path = tmp_path / "db"
    sizes = []
    connection = Connection(kind(path))
    try:
        root = connection.get_root()
        sizes.append(path.stat().st_size)  # the root's own first commit
        for n in range(4):
            root["n"] = n
            if n == 2:
                root["extra"] = [1, 2, 3]
            connection.commit()
            sizes.append(path.stat().st_size)
    finally:
        connection.close()
    return path, sizes


def value_at(path: Path, at: int | None, key: str = "n") -> object:
    connection = Connection(open_file(path, at=at))
    try:
        return connection.get_root().get(key)
    finally:
        connection.close()


def fingerprint(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


# --- the list of commits -----------------------------------------------------


def test_history_lists_every_commit_with_its_position(counted, kind):
    path, sizes = counted
    spans = list_transactions(path)

    # The base of a new file is empty; then the root's commit and four more.
    assert spans[0].records == 0
    assert [span.end for span in spans[1:]] == sizes
    assert [span.records for span in spans[1:]] == [1, 1, 1, 1, 1]
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:], strict=False))


def test_history_after_a_pack_starts_at_the_pack(counted, kind):
    path, _sizes = counted
    with kind(path) as storage:
        storage.pack()
    spans = list_transactions(path)
    assert len(spans) == 1
    assert spans[0].records == 1  # the root, with everything inside it
    assert spans[0].end == path.stat().st_size


# --- views ------------------------------------------------------------------


def test_a_view_sees_the_database_as_of_each_commit(counted, kind):
    path, sizes = counted
    assert [value_at(path, size) for size in sizes] == [None, 0, 1, 2, 3]
    assert value_at(path, sizes[2], "extra") is None
    assert value_at(path, sizes[3], "extra") == [1, 2, 3]
    assert value_at(path, None) == 3


def test_a_view_opens_through_the_plugin_with_at(counted, kind):
    path, sizes = counted
    storage = open_storage(path, readonly=True, at=sizes[2])
    try:
        assert isinstance(storage, kind)
        assert Connection(storage).get_root()["n"] == 1
    finally:
        storage.close()


def test_a_view_stays_put_while_the_file_grows(counted, kind):
    path, sizes = counted
    view = kind(path, readonly=True, at=sizes[1])
    try:
        connection = Connection(view)
        with Connection(kind(path)) as writer:
            writer.get_root()["n"] = 99
            writer.commit()
        connection.abort()  # syncs
        assert connection.get_root()["n"] == 0
        assert view.sync() == []
    finally:
        view.close()


@pytest.mark.parametrize("where", ["inside", "past the end", "inside the base"])
def test_a_view_not_at_a_commit_is_refused_naming_the_offset(counted, kind, where):
    path, sizes = counted
    at = {
        "inside": sizes[2] - 5,
        "past the end": sizes[-1] + 1,
        "inside the base": 10,
    }[where]
    with pytest.raises(StorageError, match=rf"byte offset {at}.*dhruva history"):
        kind(path, readonly=True, at=at)


def test_a_view_must_be_readonly(counted, kind):
    path, sizes = counted
    before = fingerprint(path)
    with pytest.raises(StorageError, match="readonly=True"):
        kind(path, at=sizes[1])
    assert fingerprint(path) == before


# --- restore ----------------------------------------------------------------


def test_restore_writes_a_new_writable_database_and_leaves_the_source(
    counted, kind, tmp_path
):
    path, sizes = counted
    before = fingerprint(path)
    output = tmp_path / "restored"

    number, span = restore(path, sizes[2], output)
    assert (number, span.end) == (3, sizes[2])
    assert fingerprint(path) == before
    assert output.read_bytes() == before[0][: sizes[2]]
    assert value_at(output, None) == 1

    # The restored file is a database of its own: it takes commits.
    with Connection(output) as connection:
        assert isinstance(connection.storage, kind)
        connection.get_root()["n"] = "restored"
        connection.commit()
    assert value_at(output, None) == "restored"
    assert value_at(path, None) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "restored"]


def test_restore_refuses_an_existing_output_unless_forced(counted, kind, tmp_path):
    path, sizes = counted
    output = tmp_path / "taken"
    output.write_bytes(b"precious")
    with pytest.raises(StorageError, match=r"taken exists.*force"):
        restore(path, sizes[1], output)
    assert output.read_bytes() == b"precious"

    restore(path, sizes[1], output, force=True)
    assert value_at(output, None) == 0


def test_restore_never_writes_over_its_source(counted, kind):
    path, sizes = counted
    before = fingerprint(path)
    with pytest.raises(StorageError, match="never changes its source"):
        restore(path, sizes[1], path, force=True)
    assert fingerprint(path) == before


def test_restore_does_not_replace_a_file_a_writer_has_open(counted, kind, tmp_path):
    path, sizes = counted
    output = tmp_path / "busy"
    shutil.copyfile(path, output)
    with open(output, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(FileLockedError, match="busy"):
            restore(path, sizes[1], output, force=True)
    assert output.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "db"]


def test_restore_at_a_bad_position_writes_nothing(counted, kind, tmp_path):
    path, sizes = counted
    with pytest.raises(StorageError, match="dhruva history"):
        restore(path, sizes[2] - 1, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_restore_of_a_missing_source_names_it(tmp_path):
    taken = tmp_path / "taken"
    taken.write_bytes(b"x")
    with pytest.raises(StorageError, match=r"no database file .*missing"):
        restore(tmp_path / "missing", 40, taken, force=True)
    assert taken.read_bytes() == b"x"


def test_history_refuses_a_sqlite_file(tmp_path):
    path = tmp_path / "db.sqlite"
    path.write_bytes(b"SQLite format 3\0" + bytes(100))
    with pytest.raises(StorageError, match="SQLite database"):
        list_transactions(path)


# --- the Durus files ------------------------------------------------------------


@pytest.fixture
def legacy_model(monkeypatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(FIXTURES))
    yield
    sys.modules.pop("legacy_model", None)


@pytest.mark.skipif(
    not FIXTURES.exists(), reason=f"the Durus fixtures are not there ({FIXTURES})"
)
@pytest.mark.parametrize("name", ["legacy-shelf.durus", "legacy-filestorage2.dfs20"])
def test_a_durus_file_shows_its_counter_going_back(name, tmp_path, legacy_model):
    path = tmp_path / name
    shutil.copyfile(FIXTURES / name, path)
    spans = list_transactions(path)
    assert len(spans) > 17

    # The last commits bumped the counter; earlier points show lower values.
    values = []
    for span in spans[-5:]:
        with Connection(open_file(path, at=span.end)) as connection:
            values.append(connection.get_root()["counter"].value)
    assert values[-1] == 17
    assert values == sorted(values)
    assert values[0] < 17


# --- the command line ----------------------------------------------------------


def test_cli_history_lists_positions_and_times_where_recorded(counted, kind):
    path, sizes = counted
    timed = path.read_bytes().startswith(b"DHRUVA1\n")  # Durus formats have none
    result = CliRunner().invoke(make_cli(), ["history", str(path)])
    assert result.exit_code == 0, result.output
    assert ("records no commit times" in result.output) is not timed
    lines = result.output.splitlines()
    rows = [line.split() for line in lines if line.split()[0:1] != ["#"]]
    rows = rows[1 if timed else 2 :]
    assert rows[0][0] == "base"
    assert [int(row[1]) for row in rows[1:]] == sizes
    if timed:
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\d", row[3]) for row in rows)
    else:
        assert all(row[3] == "-" for row in rows)


def test_cli_restore_and_its_refusals(counted, kind, tmp_path):
    path, sizes = counted
    output = tmp_path / "new"
    cli = make_cli()
    runner = CliRunner()
    args = ["restore", str(path), "--at", str(sizes[3]), "--output", str(output)]

    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"as of position {sizes[3]}" in result.output
    assert value_at(output, None) == 2

    result = runner.invoke(cli, args)
    assert result.exit_code == 1
    assert "exists" in result.output and "--force" in result.output

    result = runner.invoke(cli, [*args[:3], str(sizes[1]), *args[4:], "--force"])
    assert result.exit_code == 0, result.output
    assert value_at(output, None) == 0

    result = runner.invoke(cli, [*args[:3], str(sizes[1] + 3), *args[4:], "--force"])
    assert result.exit_code == 1
    assert f"byte offset {sizes[1] + 3}" in result.output


@pytest.mark.parametrize("damage", ["cut", "zeros"])
def test_cli_history_says_the_file_ends_in_an_incomplete_transaction(
    counted, kind, damage
):
    path, sizes = counted
    last = sizes[-2]  # where the last commit starts
    if damage == "cut":
        with open(path, "r+b") as f:
            f.truncate(sizes[-1] - 3)
    else:
        with open(path, "r+b") as f:
            f.seek(last + (sizes[-1] - last) // 2)
            f.write(bytes(sizes[-1] - f.tell()))

    history = read_history(path)
    assert [span.end for span in history.spans[1:]] == sizes[:-1]
    assert isinstance(history.damage, TornTailError)
    assert history.damage.offset == last

    result = CliRunner().invoke(make_cli(), ["history", str(path)])
    assert result.exit_code == 0, result.output
    assert (
        f"{path} ends in an incomplete transaction at byte offset {last}"
        in result.output
    )
    assert "--repair" in result.output
    assert f"{path}.torn-{last}" in result.output

    # Repaired as it says, the file lists the same commits and ends cleanly.
    with kind(path, repair=True):
        pass
    result = CliRunner().invoke(make_cli(), ["history", str(path)])
    assert "incomplete" not in result.output
    assert read_history(path).damage is None


def test_cli_history_says_where_damage_stops_the_list(tmp_path):
    # A damaged commit with good ones after it (DHRUVA1's checksums tell).
    path = tmp_path / "db"
    connection = Connection(FileStorage(path))
    root = connection.get_root()
    sizes = []
    for n in range(3):
        root["n"] = n
        connection.commit()
        sizes.append(path.stat().st_size)
    connection.close()
    data = bytearray(path.read_bytes())
    data[sizes[0] + 30] ^= 0x01
    path.write_bytes(bytes(data))

    result = CliRunner().invoke(make_cli(), ["history", str(path)])
    assert result.exit_code == 0, result.output
    assert f"{path} is damaged at byte offset {sizes[0]}" in result.output
    assert "restore" in result.output
    assert isinstance(read_history(path).damage, MidFileDamageError)


def test_dhruva_plugins_shows_the_commands_under_the_file_plugin():
    result = CliRunner().invoke(make_cli(), ["plugins"])
    assert result.exit_code == 0, result.output
    found = re.search(r"^file .*?\n(?=\S)", result.output, re.M | re.S)
    assert found is not None, result.output
    section = found.group()
    assert "command    history" in section
    assert "command    restore" in section
