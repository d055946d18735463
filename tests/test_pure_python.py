"""The package test suites pass with the pure-Python persistent objects too.

The normal run uses the C accelerator (``dhruva._persistent``) where it could be
built; this runs the four distributions' test suites once more in a
subprocess with ``DHRUVA_PURE_PYTHON=1``, so CI's single ``uv run pytest``
covers both implementations.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["dhruva-core", "dhruva-file", "dhruva-sqlite", "dhruva-net"]


@pytest.mark.timeout(1800)
def test_package_suites_pass_with_pure_python_persistent_objects() -> None:
    if os.environ.get("DHRUVA_PURE_PYTHON"):
        pytest.skip("this run already uses the pure-Python implementation")
    env = dict(os.environ, DHRUVA_PURE_PYTHON="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *(f"packages/{name}/tests" for name in PACKAGES),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"pure-Python run failed:\n{report}"
    assert " passed" in result.stdout


def test_pure_python_is_what_the_variable_selects() -> None:
    program = "import dhruva.persistent as p; print(p.PersistentBase.__module__)"
    env = dict(os.environ, DHRUVA_PURE_PYTHON="1")
    result = subprocess.run(
        [sys.executable, "-c", program],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "dhruva._persistent_py"
