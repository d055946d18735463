"""Every serializer, through a real FileStorage file and a new process.

One process stores every value type the serializer promises into a file;
another process, which has only imported the module defining the persistent
class, opens the file and checks each value is equal and of the exact type it
was stored with. Mixed-serializer files, refusal without writes, dill
functions, crafted malicious records and ``dhruva migrate`` run the same way.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from dhruva.cli import make_cli
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage
from dhruva.persistent import Persistent
from dhruva.plugins import Plugins
from dhruva.serializer import SerializationError

#: A module the writing and the reading process both import.
VALUES_MODULE = '''
import datetime as dt
import uuid
import zoneinfo
from decimal import Decimal

from dhruva.persistent import Persistent


class Item(Persistent):
    def __init__(self, name):
        self.name = name


def make_values():
    """Every type the msgspec serializer promises to keep exactly."""
    return {
        "none": None,
        "bools": [True, False],
        "ints": [0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**200), 10**40],
        "float": [1.5, -0.0, float("inf")],
        "str": "héllo \\0 wörld",
        "bytes": b"\\x00\\xffbytes",
        "bytearray": bytearray(b"mutable"),
        "tuple": (1, "two", (3.0, (None,))),
        "empty": [(), [], {}, set(), frozenset(), b"", ""],
        "list": [1, [2, [3, (4,)]]],
        "dict_keys": {1: "int", "s": "str", (1, 2): "tuple", frozenset({3}): "fs",
                      b"k": "bytes", 2.5: "float", None: "none", True: "bool",
                      dt.date(2020, 1, 1): "date"},
        "str_dict": {"a": {"b": {"c": [1, 2]}}},
        "set": {1, "a", (2, 3)},
        "frozenset": frozenset({frozenset({1}), "b"}),
        "datetime_naive": dt.datetime(2024, 2, 29, 23, 59, 59, 999999),
        "datetime_utc": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
        "datetime_offset": dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(
            dt.timedelta(hours=-5, minutes=-30), "EST-ish")),
        "datetime_zone": dt.datetime(2021, 11, 7, 1, 30, fold=1,
                                     tzinfo=zoneinfo.ZoneInfo("America/New_York")),
        "date": dt.date(1, 1, 1),
        "time": dt.time(23, 59, 59, 1),
        "time_aware": dt.time(8, 0, tzinfo=dt.timezone(dt.timedelta(hours=9))),
        "timedelta": dt.timedelta(days=-3, seconds=5, microseconds=7),
        "decimals": [Decimal("3.14159265358979323846264338327950288"),
                     Decimal("-0E+3"), Decimal("NaN"), Decimal("-Infinity")],
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "nested": {"k": [({1: (frozenset({b"x"}),)},)]},
    }


#: Pickle protocol 2 (the Durus one) does not keep datetime.fold.
CHECK_FOLD = True


def assert_exact(a, b, path="value"):
    """Fail unless a and b are equal and of the same types, all the way down."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, float) and a != a:
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_exact(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert len(a) == len(b), path
        for (k1, v1), (k2, v2) in zip(a.items(), b.items()):
            assert_exact(k1, k2, f"{path} key {k1!r}")
            assert_exact(v1, v2, f"{path}[{k1!r}]")
    elif isinstance(a, (set, frozenset)):
        assert {(type(x), x) for x in a} == {(type(x), x) for x in b}, path
    elif isinstance(a, dt.datetime) or isinstance(a, dt.time):
        assert a == b and a.tzinfo == b.tzinfo, path
        assert a.fold == b.fold or not CHECK_FOLD, path
        if a.tzinfo is not None:
            assert type(a.tzinfo) is type(b.tzinfo), path
            assert a.tzname() == b.tzname() or not CHECK_FOLD, path
    elif isinstance(a, Decimal):
        assert str(a) == str(b), path
    else:
        assert a == b, path
'''

WRITE = """
import sys
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage
from values import Item, make_values

connection = Connection(FileStorage(sys.argv[1]), serializer=sys.argv[2])
root = connection.get_root()
root["values"] = make_values()
root["item"] = item = Item("first")
item.friend = Item("second")
item.values = make_values()
root["items_by_key"] = {("a", 1): item, 7: item.friend}
connection.commit()
connection.close()
"""

READ = """
import sys
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage
import values
from values import Item, assert_exact, make_values

values.CHECK_FOLD = sys.argv[3] != "pickle"
connection = Connection(FileStorage(sys.argv[1]), restricted=sys.argv[2] == "r")
root = connection.get_root()
assert_exact(root["values"], make_values())
item = root["item"]
assert type(item) is Item and item.name == "first"
assert type(item.friend) is Item and item.friend.name == "second"
assert_exact(item.values, make_values())
assert root["items_by_key"][("a", 1)] is item
assert root["items_by_key"][7] is item.friend
print("OK", type(root).__name__)
"""


def run(cwd: Path, script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "values.py").write_text(VALUES_MODULE)
    return tmp_path


@pytest.mark.parametrize("serializer", ["pickle", "msgspec", "dill"])
def test_every_type_round_trips_through_a_file_and_a_new_process(
    workdir: Path, serializer: str
) -> None:
    path = str(workdir / "db.durus")
    run(workdir, WRITE, path, serializer)
    assert run(workdir, READ, path, "-", serializer) == "OK PersistentDict\n"


@pytest.mark.parametrize("serializer", ["pickle", "msgspec"])
def test_restricted_connection_reads_pickle_and_msgspec_files(
    workdir: Path, serializer: str
) -> None:
    path = str(workdir / "db.durus")
    run(workdir, WRITE, path, serializer)
    assert run(workdir, READ, path, "r", serializer) == "OK PersistentDict\n"


def test_msgspec_records_are_tagged_in_the_file(workdir: Path) -> None:
    path = workdir / "db.durus"
    run(workdir, WRITE, str(path), "msgspec")
    data = path.read_bytes()
    assert b"\0msgspec\0dhruva.persistent_dict:PersistentDict\0" in data
    assert b"\0msgspec\0values:Item\0" in data


MIXED = """
import sys
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage
from dhruva.persistent_list import PersistentList
from values import Item

path, step = sys.argv[1], sys.argv[2]
if step == "write":
    for serializer in ["pickle", "msgspec", "dill", "pickle", "msgspec"]:
        connection = Connection(FileStorage(path), serializer=serializer)
        root = connection.get_root()
        root.setdefault("log", PersistentList())
        item = Item(serializer)
        item.made_by = (serializer, len(root["log"]))
        root["log"].append(item)
        root[serializer] = item
        connection.commit()
        connection.close()
else:
    connection = Connection(FileStorage(path))
    root = connection.get_root()
    print([item.made_by for item in root["log"]])
    print(sorted(k for k in root if k != "log"))
"""


def test_one_file_holds_records_of_every_serializer(workdir: Path) -> None:
    path = workdir / "mixed.durus"
    run(workdir, MIXED, str(path), "write")
    out = run(workdir, MIXED, str(path), "read").splitlines()
    assert out[0] == (
        "[('pickle', 0), ('msgspec', 1), ('dill', 2), ('pickle', 3), ('msgspec', 4)]"
    )
    assert out[1] == "['dill', 'msgspec', 'pickle']"
    data = path.read_bytes()
    for tag in (b"\0msgspec\0values:Item\0", b"\0dill\0values:Item\0"):
        assert tag in data


class Unstorable(Persistent):
    pass


def test_a_refused_commit_writes_nothing_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "db.durus"
    connection = Connection(FileStorage(str(path)), serializer="msgspec")
    root = connection.get_root()
    root["kept"] = [1, 2]
    connection.commit()
    before = path.read_bytes()

    root["new"] = child = Unstorable()
    child.bad = {"ok": 1, "odd": range(3)}
    root["kept"] = [3]
    with pytest.raises(SerializationError) as raised:
        connection.commit()
    message = str(raised.value)
    assert f"{__name__}.Unstorable oid" in message
    assert "attribute 'bad'" in message and "builtins.range" in message
    assert path.read_bytes() == before

    # Fixed, the same transaction commits, the new object with it.
    child.bad = {"ok": 1, "odd": (0, 1, 2)}
    connection.commit()
    connection.close()
    connection = Connection(FileStorage(str(path)))
    root = connection.get_root()
    assert root["kept"] == [3]
    assert root["new"].bad == {"ok": 1, "odd": (0, 1, 2)}
    connection.close()


DILL_WRITE = """
import sys
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage
from values import Item

RATE = 3

def make_counter(start):
    count = [start]
    def step(by=1):
        count[0] += by
        return count[0] * RATE
    return step

connection = Connection(FileStorage(sys.argv[1]), serializer="dill")
root = connection.get_root()
item = Item("functions")
item.square = lambda x: x * x
item.counter = make_counter(10)
item.adder = (lambda n: (lambda x: x + n))(100)
item.friend = Item("friend")
item.greet = lambda: "hello " + item.friend.name
root["item"] = item
connection.commit()
connection.close()
"""

DILL_READ = """
import sys
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage

connection = Connection(FileStorage(sys.argv[1]))
item = connection.get_root()["item"]
print(item.square(7), item.counter(), item.counter(5), item.adder(1), item.greet())
"""


def test_dill_functions_lambdas_and_closures_survive_a_new_process(
    workdir: Path,
) -> None:
    path = str(workdir / "dill.durus")
    run(workdir, DILL_WRITE, path)
    assert run(workdir, DILL_READ, path) == "49 33 48 101 hello friend\n"


MALICIOUS = """
import os, sys
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage
from dhruva.serializer import RestrictedLoadError, SerializationError

path, marker, mode = sys.argv[1:]
try:
    connection = Connection(FileStorage(path), restricted=mode == "restricted")
    print(repr(dict(connection.get_root())))
except (RestrictedLoadError, SerializationError) as error:
    print("refused:", error)
print("marker exists:", os.path.exists(marker))
"""


def _malicious_file(path: Path, marker: Path, tagged: bool) -> None:
    # A root record whose state pickle calls os.system when loaded.
    import pickle

    from dhruva.record import ROOT_OID, pack_record

    class Attack:
        def __reduce__(self) -> tuple[object, ...]:
            import os

            return os.system, (f"touch {marker}",)

    class_pickle = b"\x80\x02cdurus.persistent_dict\nPersistentDict\nq\x00."
    state = pickle.dumps({"data": {"x": Attack()}}, 2)
    data = class_pickle + state
    if tagged:  # the same bytes dressed as a msgspec record
        data = b"\0msgspec\0dhruva.persistent_dict:PersistentDict\0\0" + state
    storage = FileStorage(str(path))
    assert storage.new_oid() == ROOT_OID
    storage.begin()
    storage.store(ROOT_OID, pack_record(ROOT_OID, data, b""))
    storage.end()
    storage.close()


def test_crafted_malicious_pickle_runs_only_without_restriction(
    tmp_path: Path,
) -> None:
    path, marker = tmp_path / "evil.durus", tmp_path / "marker"
    _malicious_file(path, marker, tagged=False)

    out = run(tmp_path, MALICIOUS, str(path), str(marker), "restricted")
    assert "refused:" in out and "posix.system" in out
    assert "marker exists: False" in out
    assert not marker.exists()

    # The file really is malicious: unrestricted pickle runs it.
    out = run(tmp_path, MALICIOUS, str(path), str(marker), "plain")
    assert marker.exists()


def test_crafted_pickle_in_a_msgspec_record_does_not_run(tmp_path: Path) -> None:
    path, marker = tmp_path / "evil.durus", tmp_path / "marker"
    _malicious_file(path, marker, tagged=True)
    for mode in ("plain", "restricted"):
        out = run(tmp_path, MALICIOUS, str(path), str(marker), mode)
        assert "refused:" in out and "msgspec record" in out
        assert not marker.exists()


MIGRATE_SETUP = """
import sys
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage
from oldmodels import Account

connection = Connection(FileStorage(sys.argv[1]))
root = connection.get_root()
root["accounts"] = [Account(n) for n in range(5)]
connection.commit()
connection.close()
"""

MIGRATE_CHECK = """
import sys
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage
from dhruva.storage import get_census
from newmodels import Customer

storage = FileStorage(sys.argv[1])
print(sorted(get_census(storage).items()))
connection = Connection(storage)
accounts = connection.get_root()["accounts"]
print([type(a).__name__ for a in accounts], [a.number for a in accounts])
"""


@pytest.mark.parametrize("terminal", [False, True])
def test_dhruva_migrate_rewrites_renamed_classes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    import dhruva.cli

    monkeypatch.setattr(dhruva.cli, "_is_terminal", lambda: terminal)
    (tmp_path / "oldmodels.py").write_text(
        "from dhruva.persistent import Persistent\n"
        "class Account(Persistent):\n"
        "    def __init__(self, number):\n"
        "        self.number = number\n"
    )
    path = tmp_path / "db.durus"
    run(tmp_path, MIGRATE_SETUP, str(path))

    # The class moves: the old module is gone, the new one importable.
    (tmp_path / "oldmodels.py").unlink()
    (tmp_path / "newmodels.py").write_text(
        "from dhruva.persistent import Persistent\n"
        "class Customer(Persistent):\n"
        "    pass\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        result = CliRunner().invoke(
            make_cli(Plugins()),
            ["migrate", str(path), "--rename", "oldmodels.Account=newmodels.Customer"],
        )
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("newmodels", None)
    assert result.exit_code == 0, result.output
    summary = f"rewrote 6 records in {path}\n"  # 5 + the root
    if terminal:
        assert "migrating" in result.output and result.output.endswith(summary)
    else:
        assert result.output == summary  # piped: no progress bar

    out = run(tmp_path, MIGRATE_CHECK, str(path)).splitlines()
    assert out[0] == (
        "[('dhruva.persistent_dict.PersistentDict', 1), ('newmodels.Customer', 5)]"
    )
    assert out[1] == str(["Customer"] * 5) + " [0, 1, 2, 3, 4]"


def test_dhruva_migrate_changes_the_serializer_of_every_record(
    workdir: Path,
) -> None:
    path = workdir / "db.durus"
    run(workdir, WRITE, str(path), "pickle")
    sys.path.insert(0, str(workdir))
    try:
        result = CliRunner().invoke(
            make_cli(Plugins()), ["migrate", str(path), "--serializer", "msgspec"]
        )
    finally:
        sys.path.remove(str(workdir))
        sys.modules.pop("values", None)
    assert result.exit_code == 0, result.output
    storage = FileStorage(str(path), readonly=True)
    try:
        kinds = {
            record[12:21] == b"\0msgspec\0" for _oid, record in storage.gen_oid_record()
        }
    finally:
        storage.close()
    assert kinds == {True}
    assert run(workdir, READ, str(path), "r", "pickle") == "OK PersistentDict\n"


MIGRATE_SETUP_WITH = """
import sys
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage
from dhruva.persistent_list import PersistentList
from oldmodels import Account

connection = Connection(FileStorage(sys.argv[1]), serializer=sys.argv[2])
root = connection.get_root()
root["accounts"] = PersistentList(Account(n) for n in range(2))
root["one"] = root["accounts"][0]
if sys.argv[2] == "dill":
    root["one"].rate = lambda hours: hours * 3
connection.commit()
connection.close()
"""

MIGRATE_CHECK_WITH = """
import sys
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage
from dhruva.record import unpack_record
from dhruva.serializer import tagged_serializer_name
from newmodels import Customer

storage = FileStorage(sys.argv[1])
print(sorted({tagged_serializer_name(unpack_record(r)[1]) or "pickle"
              for _oid, r in storage.gen_oid_record()}))
root = Connection(storage).get_root()
one = root["one"]
print(type(one).__name__, one.number, root["accounts"][0] is one)
if sys.argv[2] == "dill":
    print(root["one"].rate(2))
"""


def _move_class(tmp_path: Path, serializer: str) -> Path:
    (tmp_path / "oldmodels.py").write_text(
        "from dhruva.persistent import Persistent\n"
        "class Account(Persistent):\n"
        "    def __init__(self, number):\n"
        "        self.number = number\n"
    )
    path = tmp_path / "db.durus"
    run(tmp_path, MIGRATE_SETUP_WITH, str(path), serializer)
    (tmp_path / "oldmodels.py").unlink()
    (tmp_path / "newmodels.py").write_text(
        "from dhruva.persistent import Persistent\n"
        "class Customer(Persistent):\n"
        "    pass\n"
    )
    return path


def _migrate(tmp_path: Path, *args: str) -> Result:
    sys.path.insert(0, str(tmp_path))
    try:
        return CliRunner().invoke(make_cli(Plugins()), ["migrate", *args])
    finally:
        sys.path.remove(str(tmp_path))
        module = sys.modules.pop("newmodels", None)
        if module is not None:
            module.Customer.__module__ = "gone"  # no later test finds it loaded


@pytest.mark.parametrize("serializer", ["msgspec", "dill"])
def test_dhruva_migrate_rename_keeps_each_records_serializer(
    tmp_path: Path, serializer: str
) -> None:
    path = _move_class(tmp_path, serializer)
    result = _migrate(
        tmp_path, str(path), "--rename", "oldmodels.Account=newmodels.Customer"
    )
    assert result.exit_code == 0, result.output
    assert result.output == f"rewrote 4 records in {path}\n"

    out = run(tmp_path, MIGRATE_CHECK_WITH, str(path), serializer).splitlines()
    assert out[0] == str([serializer])
    assert out[1] == "Customer 0 True"
    if serializer == "dill":
        assert out[2] == "6"


def test_dhruva_migrate_refuses_a_misspelt_new_class(tmp_path: Path) -> None:
    path = _move_class(tmp_path, "msgspec")
    before = path.read_bytes()
    result = _migrate(
        tmp_path, str(path), "--rename", "oldmodels.Account=newmodels.Custmer"
    )
    assert result.exit_code == 1
    assert "newmodels.Custmer (module newmodels has no Custmer)" in result.output
    assert "nothing was rewritten" in result.output
    assert path.read_bytes() == before


def test_dhruva_migrate_serializer_pickle_converts_msgspec_records(
    workdir: Path,
) -> None:
    path = workdir / "db.durus"
    run(workdir, WRITE, str(path), "msgspec")
    sys.path.insert(0, str(workdir))
    try:
        result = CliRunner().invoke(
            make_cli(Plugins()), ["migrate", str(path), "--serializer", "pickle"]
        )
    finally:
        sys.path.remove(str(workdir))
        sys.modules.pop("values", None)
    assert result.exit_code == 0, result.output
    storage = FileStorage(str(path), readonly=True)
    try:
        tagged = {record[12:13] == b"\0" for _oid, record in storage.gen_oid_record()}
    finally:
        storage.close()
    assert tagged == {False}
