"""Durus 4.3 itself reads what FileStorage wrote, and the other way round.

Optional: runs only when ``DHRUVA_DURUS_PYTHON`` names a Python interpreter
that has Durus 4.3 installed, for example::

    uv venv /tmp/durusenv --python 3.11
    uv pip install --python /tmp/durusenv/bin/python durus==4.3
    DHRUVA_DURUS_PYTHON=/tmp/durusenv/bin/python uv run pytest packages/dhruva-file

The changes are made at the record level, so that only the file layout is
under test here, not the serializer.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest
from dhruva.file_storage import FileStorage
from dhruva.record import pack_record, unpack_record

FIXTURES = (
    Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures" / "durus-4"
)
DURUS_PYTHON = os.environ.get("DHRUVA_DURUS_PYTHON", "")

pytestmark = [
    pytest.mark.skipif(
        not DURUS_PYTHON,
        reason="set DHRUVA_DURUS_PYTHON to a Python with durus==4.3 installed",
    ),
    pytest.mark.skipif(
        not (FIXTURES / "legacy-shelf.durus").exists(),
        reason=f"the Durus fixtures are not there ({FIXTURES})",
    ),
]

# Run by Durus: report what it reads, optionally commit and pack first.
DURUS_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[2])
from durus.connection import Connection
from durus.file_storage import FileStorage
path, model, action = sys.argv[1:4]
extra = [int(n) for n in sys.argv[4:]]
storage = FileStorage(path, readonly=(action == "read"))
connection = Connection(storage)
root = connection.get_root()
if action == "bump-and-pack":
    root["counter"].bump()
    connection.commit()
    connection.pack()
loaded = 0
for oid, record in storage.gen_oid_record():
    obj = connection.get(oid)
    if obj._p_is_ghost():
        obj._p_load_state()
    loaded += 1
new_oids = []
if action != "read":
    new_oids = [int.from_bytes(storage.new_oid(), "big") for _ in range(5)]
print(json.dumps({
    "counter": root["counter"].value,
    "people": len(root["people"]),
    "loaded": loaded,
    "extra": [connection.get(n.to_bytes(8, "big")).name for n in extra],
    "new_oids": new_oids,
}))
storage.close()
"""


def run_durus(path: Path, action: str, *extra: int) -> dict[str, Any]:
    model = path.parent / "durus_model"
    if not model.exists():
        model.mkdir()
        text = (FIXTURES / "legacy_model.py").read_text()
        (model / "legacy_model.py").write_text(text.replace("dhruva.", "durus."))
    argv = [DURUS_PYTHON, "-c", DURUS_SCRIPT, str(path), str(model), action]
    out = subprocess.run(
        argv + [str(n) for n in extra], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, f"Durus failed on {path}:\n{out.stderr}"
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


class _ClassOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return (module, name)


def with_counter_value(data: bytes, value: int) -> bytes:
    """Return Counter record data with a new state ``{"value": value}``."""
    stream = io.BytesIO(data)
    _ClassOnly(stream).load()
    state = zlib.compress(pickle.dumps({"value": value}, 2))
    return data[: stream.tell()] + state


@pytest.fixture
def legacy(tmp_path) -> Path:
    path = tmp_path / "legacy-shelf.durus"
    shutil.copyfile(FIXTURES / "legacy-shelf.durus", path)
    return path


def test_durus_reads_a_file_dhruva_appended_to_and_packed(legacy):
    with FileStorage(legacy) as s:
        by_class: dict[bytes, tuple[bytes, bytes, bytes]] = {}
        for _oid, record in s.gen_oid_record():
            oid, data, refs = unpack_record(record)
            for name in (b"legacy_model\nCounter", b"legacy_model\nPerson"):
                if name in data[:60]:
                    by_class.setdefault(name, (oid, data, refs))
        counter_oid, counter_data, counter_refs = by_class[b"legacy_model\nCounter"]
        _person, person_data, person_refs = by_class[b"legacy_model\nPerson"]
        copy = s.new_oid()
        s.begin()
        s.store(
            counter_oid,
            pack_record(
                counter_oid, with_counter_value(counter_data, 18), counter_refs
            ),
        )
        s.store(copy, pack_record(copy, person_data, person_refs))
        s.end()
        records = s.get_size()
    number = int.from_bytes(copy, "big")

    seen = run_durus(legacy, "read", number)
    assert seen["counter"] == 18
    assert seen["people"] == 1990
    assert seen["loaded"] == records
    assert seen["extra"][0].startswith("Chidi-")

    # After a pack by dhruva, Durus hands out only oids no record has.
    with FileStorage(legacy) as s:
        s.pack()
        kept = {int.from_bytes(oid, "big") for oid, _r in s.gen_oid_record()}
    seen = run_durus(legacy, "write")  # the unreferenced copy is gone
    assert seen["counter"] == 18
    assert seen["loaded"] == len(kept)
    assert not set(seen["new_oids"]) & kept


def test_dhruva_reads_a_file_durus_packed(legacy):
    seen = run_durus(legacy, "bump-and-pack")
    assert seen["counter"] == 18
    with FileStorage(legacy) as s:
        records = dict(s.gen_oid_record())
        assert len(records) == seen["loaded"]
        assert int.from_bytes(s.new_oid(), "big") >= max(
            int.from_bytes(oid, "big") for oid in records
        )
