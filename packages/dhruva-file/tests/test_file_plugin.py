"""Tests of the dhruva-file plugin: registration, recognition, lazy import."""

from __future__ import annotations

import subprocess
import sys

import pytest
from dhruva import _file_plugin
from dhruva.file_storage import FileStorage
from dhruva.hookspecs import hookimpl
from dhruva.plugins import Plugins, get_plugin_manager, open_storage
from dhruva.record import ROOT_OID, unpack_record
from dhruva.storage_testing import commit, make_record


@pytest.fixture
def plugins():
    pm = get_plugin_manager()
    pm.register(_file_plugin, name="file")
    return Plugins(pm)


def test_file_storage_kind_is_registered(plugins):
    kind = plugins.get_storage_kind("file")
    assert kind.file_based
    assert kind.distribution == "dhruva-file"
    assert kind.plugin == "file"
    assert kind.description


def test_opener_opens_a_file_storage(plugins, tmp_path):
    path = str(tmp_path / "db")
    kind = plugins.get_storage_kind("file")
    storage = kind.open(path, readonly=False, repair=False)
    try:
        assert isinstance(storage, FileStorage)
        commit(storage, make_record(ROOT_OID, b"root"))
    finally:
        storage.close()
    storage = kind.open(path, readonly=True, repair=False)
    try:
        assert storage.readonly
        assert unpack_record(storage.load(ROOT_OID))[1] == b"root"
    finally:
        storage.close()


def test_shelf_files_are_recognized(plugins, tmp_path):
    shelf = tmp_path / "db"
    FileStorage(shelf).close()
    assert plugins.recognize(str(shelf)) == "file"

    # FileStorage2 files belong to the file2 kind.
    dfs = tmp_path / "db2"
    dfs.write_bytes(b"DFS20\0" + bytes(8))
    assert plugins.recognize(str(dfs)) == "file2"


def test_installed_entry_point_opens_shelf_files(tmp_path):
    path = tmp_path / "db"
    FileStorage(path).close()
    storage = open_storage(path)
    try:
        assert isinstance(storage, FileStorage)
    finally:
        storage.close()


def test_plugin_module_does_not_import_the_storage():
    code = (
        "import sys, dhruva._file_plugin; print('dhruva.file_storage' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_file_kind_description_names_the_format_of_new_files(plugins, tmp_path):
    # `dhruva plugins` shows this text: it must name what a new file is.
    kind = plugins.get_storage_kind("file")
    path = tmp_path / "new.durus"
    kind.open(str(path), readonly=False, repair=False).close()
    magic = "SHELF-1" if path.read_bytes().startswith(b"SHELF-1") else "DHRUVA1"
    assert f"new files in Durus's {magic}" in kind.description or (
        f"new files in dhruva's checksummed {magic}" in kind.description
    )


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        (b"D", "file"),
        (b"DHRU", "file"),
        (b"DHrUVA1\n" + bytes(28), "file"),
        (b"SH", "file"),
        (b"SHELF-X\n" + bytes(8), "file"),
        (b"DFS2", "file2"),
        (b"DfS20\0" + bytes(8), "file2"),
    ],
)
def test_files_of_ours_cut_short_or_damaged_are_given_to_the_file_storage(
    plugins, tmp_path, header, kind
):
    # The storage then says what is wrong, where "not recognized" would not.
    path = tmp_path / "db"
    path.write_bytes(header)
    assert plugins.recognize(str(path)) == kind


@pytest.mark.parametrize(
    "header", [b"S", b"SQLite format 3\0", b"hello world", b"\x80\x04"]
)
def test_other_files_are_not_taken_for_damaged_ones(header):
    from dhruva._file_plugin import dhruva_recognize_storage, recognize_damaged_file

    assert dhruva_recognize_storage("other", header) is None
    assert recognize_damaged_file("other", header) is None


def test_another_plugins_header_near_ours_is_that_plugins(tmp_path):
    # A plugin whose magic is two bytes off DHRUVA1's is asked first, even
    # when registered before (pluggy calls the last registered first).
    class Near:
        @hookimpl
        def dhruva_recognize_storage(self, path: str, header: bytes) -> str | None:
            return "near" if header.startswith(b"DHRUVA-S") else None

    pm = get_plugin_manager()
    pm.register(Near())
    pm.register(_file_plugin, name="file")
    plugins = Plugins(pm)
    path = tmp_path / "db"
    path.write_bytes(b"DHRUVA-S" + bytes(20))
    assert plugins.recognize(str(path)) == "near"
