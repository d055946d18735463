"""``dhruva -c`` and ``dhruva -p`` on database files, Durus-written ones too.

A Durus user keeps the files and the application module (its imports changed
from ``durus.`` to ``dhruva.``), runs ``dhruva -c --file`` in the folder that
holds the module, and sees the same objects; ``dhruva -p`` packs the file and
the objects are still there. The files come from /work/shared/fixtures and are
copied to a temporary folder first.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

FIXTURES = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "durus-4"
)


#: Printed by ``dhruva -c`` on a fixture: what manifest.json says it holds.
SUMMARY = """\
import hashlib, json
numbers = root["numbers"]
print(json.dumps({
    "root_keys": sorted(root.keys()),
    "counter": root["counter"].value,
    "people_len": len(root["people"]),
    "by_name_len": len(root["by_name"]),
    "numbers_len": len(numbers),
    "numbers_min": numbers.get_min_item()[0],
    "numbers_max": numbers.get_max_item()[0],
    "numbers_sum": sum(numbers.values()),
    "evens": sorted(root["evens"]),
    "log": list(root["log"]),
    "slotted": [root["slotted"].x, root["slotted"].y],
    "blob_sha256": hashlib.sha256(root["blob"]).hexdigest(),
}))
"""

FILES = ["legacy-shelf.durus", "legacy-sqlite.sqlite", "legacy-filestorage2.dfs20"]


def dhruva(cwd: Path, *args: str, input: str = "") -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("dhruva")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dhruva.cli"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=300,
    )


#: The manifest entries that SUMMARY prints.
KEYS = (
    "root_keys",
    "counter",
    "people_len",
    "by_name_len",
    "numbers_len",
    "numbers_min",
    "numbers_max",
    "numbers_sum",
    "evens",
    "log",
    "slotted",
    "blob_sha256",
)


def expected(name: str) -> dict[str, Any]:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    return {key: manifest[name][key] for key in KEYS}


def summary(cwd: Path, *options: str) -> dict[str, Any]:
    done = dhruva(cwd, "-c", *options, input=SUMMARY)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def check(seen: dict[str, Any], name: str) -> None:
    want = expected(name)
    assert seen["numbers_sum"] == pytest.approx(want.pop("numbers_sum"))
    del seen["numbers_sum"]
    assert seen == want


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder with the application module, as a Durus user would have."""
    if not (FIXTURES / "manifest.json").exists():
        pytest.skip(f"the Durus-written fixtures are not at {FIXTURES.resolve()}")
    shutil.copy(FIXTURES / "legacy_model.py", tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", FILES)
def test_client_reads_a_durus_file_and_pack_keeps_its_objects(
    folder: Path, name: str
) -> None:
    path = folder / name
    shutil.copy(FIXTURES / name, path)
    path.chmod(0o644)

    check(summary(folder, "--file", name), name)

    # Ten people were deleted before Durus closed the file: pack drops them.
    packed = dhruva(folder, "-p", "--file", name)
    assert packed.returncode == 0, packed.stderr
    assert packed.stdout.startswith(f"packed {name}")
    check(summary(folder, "--file", name), name)


def test_readonly_client_cannot_change_a_durus_file(folder: Path) -> None:
    name = "legacy-shelf.durus"
    path = folder / name
    shutil.copy(FIXTURES / name, path)
    path.chmod(0o644)
    before = path.read_bytes()

    done = dhruva(
        folder,
        "-c",
        "--file",
        name,
        "--readonly",
        input='root["counter"].bump()\nconnection.commit()\n',
    )
    assert done.returncode == 1
    assert "ReadOnlyError" in done.stderr
    assert path.read_bytes() == before


@pytest.mark.skipif(
    importlib.util.find_spec("dhruva.client_storage") is None,
    reason="serving a file needs dhruva-net (`pip install dhruva-net`)",
)
def test_server_serves_a_durus_file(folder: Path) -> None:
    import socket

    name = "legacy-shelf.durus"
    path = folder / name
    shutil.copy(FIXTURES / name, path)
    path.chmod(0o644)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])

    script = Path(sys.executable).with_name("dhruva")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dhruva.cli"]
    server = subprocess.Popen(
        [*command, "-s", "--file", name, "--port", port],
        cwd=folder,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # The client waits for nothing: poll until the server answers.
        for _attempt in range(600):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", int(port))) == 0:
                    break
            assert server.poll() is None, "the server exited at startup"
            time.sleep(0.05)
        check(summary(folder, "--port", port), name)
        stop = dhruva(folder, "-s", "--stop", "--port", port)
        assert stop.returncode == 0, stop.stderr
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)


@pytest.mark.parametrize(
    ("options", "header"),
    [
        ([], b"DHRUVA1\n"),
        (["--storage", "shelf"], b"SHELF-1\n"),
        (["--storage", "sqlite"], b"SQLite format 3"),
    ],
)
def test_new_file_kind_is_recognized_when_opened_again(
    tmp_path: Path, options: list[str], header: bytes
) -> None:
    # Without --storage a new file gets dhruva's own (checksummed) format.
    first = dhruva(
        tmp_path,
        "-c",
        "--file",
        "new.db",
        *options,
        input='root["n"] = 42\nconnection.commit()\n',
    )
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "new.db").read_bytes().startswith(header)

    again = dhruva(tmp_path, "-c", "--file", "new.db", input='print(root["n"])')
    assert again.returncode == 0, again.stderr
    assert again.stdout == "42\n"
