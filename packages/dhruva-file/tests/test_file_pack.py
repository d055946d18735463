"""Packing FileStorage and FileStorage2: the incremental packer with commits
between its steps, packs killed with SIGKILL in a real process, packs that
fail, and the leftovers of interrupted packs."""

from __future__ import annotations

import pytest
from dhruva.file_storage import FileStorage
from dhruva.file_storage2 import FileStorage2
from dhruva.storage_testing import IncrementalPackStorageContract

KINDS = {"file": FileStorage, "file2": FileStorage2}


class TestFileStorageIncrementalPack(IncrementalPackStorageContract):
    @pytest.fixture
    def storage(self, tmp_path):
        s = FileStorage(tmp_path / "db.durus")
        yield s
        s.close()


class TestFileStorage2IncrementalPack(IncrementalPackStorageContract):
    @pytest.fixture
    def storage(self, tmp_path):
        s = FileStorage2(tmp_path / "db.dfs20")
        yield s
        s.close()
