"""Packing SqliteStorage: the incremental packer with commits between its
steps, packs killed with SIGKILL in a real process, and packs that fail."""

from __future__ import annotations

import pytest
from dhruva.sqlite_storage import SqliteStorage
from dhruva.storage_testing import IncrementalPackStorageContract


class TestSqliteStorageIncrementalPack(IncrementalPackStorageContract):
    @pytest.fixture
    def storage(self, tmp_path):
        s = SqliteStorage(tmp_path / "db.sqlite")
        yield s
        s.close()
