import pickle
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
    assert extract_class_name(root) == "durus.persistent_dict.PersistentDict"


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
