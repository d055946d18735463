import pytest
from dhruva.record import ROOT_OID
from dhruva.storage import MemoryStorage, get_reference_index
from dhruva.storage_testing import (
    BasicStorageContract,
    IterableStorageContract,
    PackableStorageContract,
    commit,
    make_record,
)


class TestMemoryStorage(
    BasicStorageContract, IterableStorageContract, PackableStorageContract
):
    @pytest.fixture
    def storage(self):
        return MemoryStorage()


def test_reference_index_lists_referrers():
    storage = MemoryStorage()
    a = storage.new_oid()
    a = storage.new_oid()
    commit(storage, make_record(ROOT_OID, b"r", [a]), make_record(a))
    assert get_reference_index(storage) == {a: [ROOT_OID]}
