"""Fixtures shared by dhruva-file's tests: the three file layouts.

``fmt`` runs a test once per layout: dhruva's checksummed DHRUVA1 (what
``FileStorage(path)`` makes), Durus's SHELF-1 (``format="durus"``) and
Durus's DFS20 (``FileStorage2``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dhruva.checked_file import MAGIC as DHRUVA1_MAGIC
from dhruva.checked_file import CheckedFileStorage
from dhruva.file_storage import FileStorage
from dhruva.file_storage2 import MAGIC as DFS20_MAGIC
from dhruva.file_storage2 import FileStorage2
from dhruva.shelf import PREFIX
from dhruva.storage_testing import commit, make_record


@dataclass(frozen=True)
class Format:
    """One file layout, and how a test opens a file in it."""

    #: The layout's name in test ids.
    name: str
    #: The class a file in this layout is opened with.
    kind: type[FileStorage]
    #: The first bytes of every file in it.
    magic: bytes
    #: Keyword arguments that make a new file in this layout.
    new_file: dict[str, Any]
    #: Python source that opens ``sys.argv[1]`` for writing as ``s``.
    source: str

    def open(self, path: Path | str | None = None, **options: Any) -> FileStorage:
        """Open ``path`` (a temporary file when None) in this layout."""
        return self.kind(path, **self.new_file, **options)


FORMATS = {
    "dhruva": Format(
        "dhruva",
        CheckedFileStorage,
        DHRUVA1_MAGIC,
        {},
        "from dhruva.file_storage import FileStorage\ns = FileStorage(sys.argv[1])",
    ),
    "shelf": Format(
        "shelf",
        FileStorage,
        PREFIX,
        {"format": "durus"},
        "from dhruva.file_storage import FileStorage\n"
        "s = FileStorage(sys.argv[1], format='durus')",
    ),
    "dfs20": Format(
        "dfs20",
        FileStorage2,
        DFS20_MAGIC,
        {},
        "from dhruva.file_storage2 import FileStorage2\ns = FileStorage2(sys.argv[1])",
    ),
}


@pytest.fixture(params=sorted(FORMATS))
def fmt(request: pytest.FixtureRequest) -> Format:
    """Each file layout in turn."""
    return FORMATS[request.param]


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The file descriptors os.fsync is called on from now on."""
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


#: What :func:`three_commits_in` returns: the path, the oids of the root, a
#: and b, and where the last commit starts and ends.
ThreeCommits = tuple[Path, tuple[bytes, bytes, bytes], int, int]


@pytest.fixture
def three_commits_in() -> Callable[[Callable[[Path], FileStorage], Path], ThreeCommits]:
    """Return a function that writes three commits with an opener: the root
    and a, then a again, then a (100 bytes) and a new b."""

    def write(opener: Callable[[Path], FileStorage], path: Path) -> ThreeCommits:
        with opener(path) as s:
            root, a, b = (s.new_oid() for _ in range(3))
            commit(s, make_record(root, b"root", [a]), make_record(a, b"a1"))
            commit(s, make_record(a, b"a2"))
            start = path.stat().st_size
            commit(s, make_record(a, b"a3" * 50), make_record(b, b"b"))
            end = path.stat().st_size
        return path, (root, a, b), start, end

    return write
