"""The server stress script (benchmarks/stress_server.py), run briefly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "stress_server.py"


@pytest.mark.parametrize("storage", ["file", "sqlite"])
def test_stress_script_keeps_its_invariants(storage, tmp_path):
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} is not in this checkout")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "3", "--clients", "3"]
        + ["--storage", storage, "--pack-every", "1", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "invariants hold" in done.stdout
    assert '"problems": []' in done.stdout
    assert '"packs": 0' not in done.stdout
