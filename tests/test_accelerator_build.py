"""dhruva-core builds and works where no C compiler is present.

Builds the dhruva-core wheel from a copy of its sources with ``CC=false`` (a
compiler that always fails), installs it into a new virtual environment and
checks that dhruva falls back to the pure-Python persistent objects. Needs uv
on PATH and the package index (or uv's cache) for setuptools, pluggy and click.
"""

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "packages" / "dhruva-core"


def _uv_works() -> bool:
    try:
        subprocess.run(["uv", "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _uv_works(), reason="needs a working uv on PATH to build the wheel"
)


def test_the_build_falls_back_to_pure_python_without_a_compiler(tmp_path):
    source = tmp_path / "dhruva-core"
    shutil.copytree(
        CORE,
        source,
        ignore=shutil.ignore_patterns(
            "build", "*.egg-info", "__pycache__", "*.so", "*.pyd", "tests"
        ),
    )
    dist = tmp_path / "dist"
    env = {**os.environ, "CC": "false", "CXX": "false"}
    build = subprocess.run(
        ["uv", "build", "--wheel", "-o", str(dist), str(source)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dhruva/_persistent_py.py" in names
    assert not [name for name in names if name.endswith((".so", ".pyd"))]

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    program = (
        "from dhruva.persistent import Persistent, PersistentBase\n"
        "from dhruva.connection import Connection\n"
        "from dhruva.storage import MemoryStorage\n"
        "c = Connection(MemoryStorage())\n"
        "c.root['x'] = 1\n"
        "c.commit()\n"
        "print(PersistentBase.__module__, c.root['x'])\n"
    )
    result = subprocess.run(
        [python, "-c", program], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["dhruva._persistent_py", "1"]
