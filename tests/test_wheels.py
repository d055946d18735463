"""The built wheels install and work without uv, one distribution at a time.

Builds the four wheels with ``uv build``, installs only dhruva-core and
dhruva-file into a new virtual environment with pip, and uses them as a user
would. Needs uv on PATH and the package index for pluggy and click.
"""

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _uv_works() -> bool:
    try:
        subprocess.run(["uv", "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _uv_works(), reason="needs a working uv on PATH to build the wheels"
)


@pytest.fixture(scope="module")
def core_and_file_env(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        ["uv", "build", "--all-packages", "--wheel", "-o", str(dist)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    wheels = {path.name.split("-")[0]: path for path in dist.glob("*.whl")}
    assert {"dhruva_core", "dhruva_file", "dhruva_sqlite", "dhruva_net"} <= set(wheels)

    env = tmp_path_factory.mktemp("venv")
    venv.create(env, with_pip=True)
    bin_dir = env / ("Scripts" if sys.platform == "win32" else "bin")
    subprocess.run(
        [
            str(bin_dir / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(wheels["dhruva_core"]),
            str(wheels["dhruva_file"]),
        ],
        check=True,
        capture_output=True,
    )
    return bin_dir


def run(bin_dir, *args, stdin="", cwd=None):
    return subprocess.run(
        [str(bin_dir / "dhruva"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


def test_file_storage_and_connection_work_from_the_wheels(core_and_file_env, tmp_path):
    program = (
        "from dhruva.connection import Connection\n"
        "from dhruva.file_storage import FileStorage\n"
        "from dhruva.btree import BTree\n"
        "import sys\n"
        "c = Connection(FileStorage(sys.argv[1]))\n"
        "c.get_root()['tree'] = t = BTree()\n"
        "t.update((i, str(i)) for i in range(500))\n"
        "c.commit()\n"
        "c.close()\n"
        "c = Connection(sys.argv[1])\n"
        "print(len(c.get_root()['tree']), c.get_root()['tree'][499])\n"
    )
    result = subprocess.run(
        [str(core_and_file_env / "python"), "-c", program, str(tmp_path / "a.durus")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == ["500", "499"]


def test_cli_client_works_from_the_wheels(core_and_file_env, tmp_path):
    db = str(tmp_path / "cli.durus")
    stored = run(
        core_and_file_env,
        "-c",
        "--file",
        db,
        stdin="root['x'] = 41\nconnection.commit()\n",
    )
    assert stored.returncode == 0, stored.stderr
    shown = run(core_and_file_env, "-c", "--file", db, stdin="print(root['x'] + 1)\n")
    assert shown.stdout.strip().endswith("42")


def test_missing_packages_are_named(core_and_file_env, tmp_path):
    server = run(core_and_file_env, "-s", "--file", str(tmp_path / "s.durus"))
    assert server.returncode != 0
    assert "pip install dhruva-net" in server.stderr

    sqlite = run(
        core_and_file_env, "-c", "--file", str(tmp_path / "x.db"), "--storage", "sqlite"
    )
    assert sqlite.returncode != 0
    assert "pip install dhruva-sqlite" in sqlite.stderr

    client = run(core_and_file_env, "-c", "--port", "1")
    assert client.returncode != 0
    assert "dhruva-net" in client.stderr
