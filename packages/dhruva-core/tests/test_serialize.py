import pickle
import subprocess
import sys
import textwrap
import zlib

from dhruva.connection import Connection
from dhruva.persistent_dict import PersistentDict
from dhruva.persistent_list import PersistentList
from dhruva.record import ROOT_OID, pack_record, unpack_record
from dhruva.serialize import extract_class_name, rename_module
from dhruva.storage import MemoryStorage, get_census
from dhruva.storage_testing import commit


def durus_record(oid, module, name, state, refs=b"", compress=True):
    """A record as Durus writes it: class and state pickles, state compressed."""
    class_pickle = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nq\x00."
    state_pickle = pickle.dumps(state, 2)
    if compress:
        state_pickle = zlib.compress(state_pickle)
    return pack_record(oid, class_pickle + state_pickle, refs)


def test_durus_module_names_load_as_dhruva_classes():
    assert rename_module("durus.persistent_dict") == "dhruva.persistent_dict"
    assert rename_module("durus") == "dhruva"
    assert rename_module("durusx.thing") == "durusx.thing"
    assert rename_module("myapp.models") == "myapp.models"

    storage = MemoryStorage()
    storage.new_oid()
    root = durus_record(
        ROOT_OID, "durus.persistent_dict", "PersistentDict", {"data": {"n": 1}}
    )
    commit(storage, root)
    connection = Connection(storage)
    loaded = connection.get_root()
    assert type(loaded) is PersistentDict
    assert loaded["n"] == 1
    assert extract_class_name(root) == "dhruva.persistent_dict.PersistentDict"


def test_uncompressed_durus_state_loads():
    storage = MemoryStorage()
    storage.new_oid()
    commit(
        storage,
        durus_record(
            ROOT_OID,
            "durus.persistent_list",
            "PersistentList",
            {"data": [1, 2]},
            compress=False,
        ),
    )
    root = Connection(storage).get_root()
    assert type(root) is PersistentList
    assert list(root) == [1, 2]


def test_written_records_list_their_references_and_compress_big_states():
    storage = MemoryStorage()
    connection = Connection(storage)
    root = connection.get_root()
    root["child"] = child = PersistentDict()
    root["text"] = "x" * 10000
    connection.commit()
    oid, data, refs = unpack_record(storage.load(ROOT_OID))
    assert refs == child._p_oid
    assert len(data) < 1000
    assert get_census(storage) == {"dhruva.persistent_dict.PersistentDict": 2}


FAKE_DURUS = {
    "durus/__init__.py": "",
    "durus/persistent.py": """
        class PersistentObject:
            def __setstate__(self, state):
                self.__dict__.update(state or {})
        class Persistent(PersistentObject):
            pass
        class ComputedAttribute(PersistentObject):
            pass
    """,
    "durus/persistent_dict.py": """
        from durus.persistent import Persistent
        class PersistentDict(Persistent):
            pass
    """,
    "durus/persistent_list.py": """
        from durus.persistent import Persistent
        class PersistentList(Persistent):
            pass
    """,
    "durus/persistent_set.py": """
        from durus.persistent import Persistent
        class PersistentSet(Persistent):
            pass
    """,
    "durus/btree.py": """
        from durus.persistent import PersistentObject
        class BTree(PersistentObject):
            pass
        class BNode(PersistentObject):
            pass
        class BNode16(BNode):
            pass
    """,
}

READ_LIKE_DURUS = """
import io, pickle, sys, zlib

class Unpickler(pickle.Unpickler):
    def persistent_load(self, oid_class):
        oid, cls = oid_class
        return ("ref", cls.__module__, cls.__name__)

data = sys.stdin.buffer.read()
stream = io.BytesIO(data)
cls = Unpickler(stream).load()
state = data[stream.tell():]
if state[:1] == b"x":
    state = zlib.decompress(state)
unpickler = Unpickler(io.BytesIO(state))
print(cls.__module__, cls.__name__)
print(repr(unpickler.load()))
"""


def test_records_name_durus_classes_so_durus_can_load_them(tmp_path):
    for name, text in FAKE_DURUS.items():
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(textwrap.dedent(text))
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["list"] = PersistentList([1])
    connection.commit()
    data = unpack_record(storage.load(ROOT_OID))[1]

    result = subprocess.run(
        [sys.executable, "-c", READ_LIKE_DURUS],
        input=data,  # the root: a PersistentDict referring to a PersistentList
        capture_output=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "durus.persistent_dict PersistentDict"
    assert "'durus.persistent_list', 'PersistentList'" in lines[1]
