"""Run the same workloads on dhruva, Durus 4.3 and ZODB 6 and print a table.

Usage (from the repository root)::

    uv run python benchmarks/run.py --quick        # a few minutes
    uv run python benchmarks/run.py                # the full sizes
    uv run python benchmarks/run.py --only dhruva-file,durus-file
    uv run python benchmarks/run.py --attributes   # only the attribute rows

Durus and ZODB are installed from the package index into their own virtual
environments (``/tmp/bench-durus`` and ``/tmp/bench-zodb`` by default; see
``--durus-python`` and ``--zodb-python`` to use others). Every target runs in
its own processes through ``benchmarks/worker.py``; servers listen on loopback
only. The table shows each time (lower is better, commits per second higher),
then dhruva's best against the best of Durus and ZODB for the same kind of
storage, and whether the target of issue #6 is met.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"

FILE_TARGETS = [
    "dhruva-file",
    "dhruva-file2",
    "dhruva-sqlite",
    "durus-file",
    "zodb-file",
]
SERVER_TARGETS = ["dhruva-server", "durus-server", "zodb-zeo"]
ALL_TARGETS = (
    FILE_TARGETS[:3]
    + SERVER_TARGETS[:1]
    + FILE_TARGETS[3:4]
    + ["durus-server", "zodb-file", "zodb-zeo"]
)


def ensure_env(path: Path, requirements: list[str], probe: str) -> Path:
    """Return the Python of a venv at ``path`` holding ``requirements``."""
    python = path / "bin" / "python"
    if python.exists():
        check = subprocess.run([python, "-c", probe], capture_output=True)
        if check.returncode == 0:
            return python
    uv = shutil.which("uv")
    if uv is None:
        sys.exit(f"uv is needed to create {path}: pip install uv")
    subprocess.run([uv, "venv", "-q", "--python", "3.11", str(path)], check=True)
    subprocess.run(
        [uv, "pip", "install", "-q", "--python", str(python), *requirements],
        check=True,
    )
    return python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no server on 127.0.0.1:{port} after {timeout} s")


def start_server(target: str, python: Path, path: Path, port: int) -> subprocess.Popen:
    bin_dir = python.parent
    if target == "dhruva-server":
        command = [
            str(bin_dir / "dhruva"),
            "-s",
            "--file",
            str(path),
            "--port",
            str(port),
        ]
    elif target == "durus-server":
        command = [str(bin_dir / "durus"), "-s", f"--file={path}", f"--port={port}"]
    else:
        command = [str(bin_dir / "runzeo"), "-a", f"127.0.0.1:{port}", "-f", str(path)]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(port, process)
    return process


def run_worker(
    python: Path, target: str, directory: Path, quick: bool, *extra: str
) -> dict:
    command = [str(python), str(WORKER), target, str(directory), *extra]
    if quick:
        command.append("--quick")
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        print(
            f"{target} {' '.join(extra)} failed:\n{result.stderr[-2000:]}",
            file=sys.stderr,
        )
        return {}
    data: dict = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def concurrency(
    python: Path, target: str, directory: Path, quick: bool, port: int, clients: int
) -> float:
    """Commits per second of ``clients`` processes committing at once."""
    start_at = time.time() + 3 + clients * 0.5
    processes = []
    for number in range(clients):
        command = [
            str(python),
            str(WORKER),
            target,
            str(directory),
            "--mode",
            "client",
            "--port",
            str(port),
            "--start-at",
            str(start_at),
            "--name",
            f"client{clients}-{number}",
        ]
        if quick:
            command.append("--quick")
        processes.append(
            subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=900)
        if process.returncode != 0:
            print(f"{target} client failed:\n{err[-2000:]}", file=sys.stderr)
            return float("nan")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    began = min(report["began"] for report in reports)
    ended = max(report["ended"] for report in reports)
    return sum(report["commits"] for report in reports) / (ended - began)


def run_target(target: str, python: Path, work: Path, quick: bool) -> dict:
    directory = work / target
    directory.mkdir()
    results: dict = {}
    if target in SERVER_TARGETS:
        for mode in ("main", "btree"):
            port = free_port()
            server = start_server(target, python, directory / f"{mode}.db", port)
            try:
                results.update(
                    run_worker(
                        python,
                        target,
                        directory,
                        quick,
                        "--mode",
                        mode,
                        "--port",
                        str(port),
                    )
                )
                if mode == "main":
                    one = concurrency(python, target, directory, quick, port, 1)
                    eight = concurrency(python, target, directory, quick, port, 8)
                    results["commits/s, 1 client"] = one
                    results["commits/s, 8 clients"] = eight
                    results["8 clients / 1 client"] = eight / one
            finally:
                server.terminate()
                server.wait(timeout=30)
    else:
        results.update(run_worker(python, target, directory, quick))
        results.update(run_worker(python, target, directory, quick, "--mode", "btree"))
        run_worker(python, target, directory, quick, "--mode", "pack-build")
        results.update(
            run_worker(python, target, directory, quick, "--mode", "pack-run")
        )
    shutil.rmtree(directory, ignore_errors=True)
    return results


# --- the table -----------------------------------------------------------------

HIGHER_IS_BETTER = ("commits/s",)


def verdict(row: str, results: dict[str, dict]) -> str:
    """Compare dhruva with the target of issue #6 for this row."""

    def value(target: str) -> float | None:
        number = results.get(target, {}).get(row)
        return None if number is None else float(number)

    def best_of(targets: list[str], higher: bool = False) -> tuple[str, float] | None:
        found = [(t, v) for t in targets if (v := value(t)) is not None]
        if not found:
            return None
        return (max if higher else min)(found, key=lambda pair: pair[1])

    if row.startswith("attribute read"):
        limit = 1.3
    elif row.startswith("attribute write"):
        limit = 2.5
    elif row == "one-object commit / raw fsync":
        limit = 1.5
    elif row == "8 clients / 1 client":
        number = value("dhruva-server")
        if number is None:
            return ""
        return f"{number:.2f}x >= 3: {'met' if number >= 3 else 'MISSED'}"
    else:
        limit = 0.0
    if limit:
        number = value("dhruva-file")
        if number is None:
            return ""
        return f"{number:.2f} <= {limit}: {'met' if number <= limit else 'MISSED'}"

    higher = row.startswith(HIGHER_IS_BETTER)
    server_row = any(row in results.get(t, {}) for t in SERVER_TARGETS) and not any(
        row in results.get(t, {}) for t in FILE_TARGETS
    )
    if server_row:
        ours = best_of(["dhruva-server"], higher)
        theirs = best_of(["durus-server", "zodb-zeo"], higher)
    else:
        ours = best_of(["dhruva-file", "dhruva-file2", "dhruva-sqlite"], higher)
        theirs = best_of(["durus-file", "zodb-file"], higher)
    if ours is None or theirs is None or not theirs[1]:
        return ""
    ratio = ours[1] / theirs[1]
    if row.startswith("build + traverse"):
        theirs_zodb = best_of(["zodb-file"])
        if theirs_zodb is None:
            return ""
        ratio = ours[1] / theirs_zodb[1]
        return f"{ratio:.2f}x zodb-file <= 0.5: {'met' if ratio <= 0.5 else 'MISSED'}"
    if row == "one-object commit" and not server_row:
        # Durus's FileStorage does not fsync: compare with the durable one.
        zodb = value("zodb-file")
        if zodb is None:
            return ""
        ratio = ours[1] / zodb
        status = "met" if ratio <= 1 else "MISSED"
        return f"{ours[0]} {ratio:.2f}x zodb-file (durable): {status}"
    if row == "cold read per object via server":
        durus = value("durus-server")
        if durus is None:
            return ""
        ratio = ours[1] / durus
        return f"{ratio:.2f}x durus <= 0.5: {'met' if ratio <= 0.5 else 'MISSED'}"
    if row.startswith(("raw fsync", "pack", "build ", "traverse ")) and (
        "peak" in row
        or "growth" in row
        or row.startswith(("raw", "build ", "traverse "))
    ):
        return f"{ours[0]} {ratio:.2f}x {theirs[0]}"
    good = ratio >= 1 if higher else ratio <= 1
    return f"{ours[0]} {ratio:.2f}x {theirs[0]}: {'met' if good else 'MISSED'}"


def format_value(row: str, number: float) -> str:
    if row.startswith(("attribute", "8 clients")) or "/ raw" in row:
        return f"{number:.2f}x"
    if "commits/s" in row:
        return f"{number:.0f}/s"
    if "MB" in row:
        return f"{number:.0f} MB"
    if number < 1e-3:
        return f"{number * 1e6:.1f} µs"
    if number < 1:
        return f"{number * 1e3:.1f} ms"
    return f"{number:.2f} s"


def table(results: dict[str, dict], targets: list[str]) -> str:
    rows: list[str] = []
    for target in targets:
        for row in results.get(target, {}):
            if row not in rows:
                rows.append(row)
    header = ["workload", *targets, "dhruva vs best other (target)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row]
        for target in targets:
            number = results.get(target, {}).get(row)
            cells.append("" if number is None else format_value(row, number))
        cells.append(verdict(row, results))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, load average {load:.1f} at start"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--only", help="comma-separated targets to run")
    parser.add_argument("--durus-python", type=Path)
    parser.add_argument("--zodb-python", type=Path)
    parser.add_argument(
        "--attributes",
        action="store_true",
        help="measure only the attribute rows (default and fast_reads classes) "
        "on dhruva-file, in well under a minute",
    )
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--dir", type=Path, help="where the databases go")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="print the table of earlier --json files (later ones win) and exit",
    )
    args = parser.parse_args()

    targets = args.only.split(",") if args.only else ALL_TARGETS
    if args.attributes:
        with tempfile.TemporaryDirectory(prefix="dhruva-bench-", dir=args.dir) as work:
            numbers = run_worker(
                Path(sys.executable),
                "dhruva-file",
                Path(work),
                True,
                "--mode",
                "attributes",
            )
        print(f"Machine: {machine()}. Mode: attribute rows only.\n")
        print(table({"dhruva-file": numbers}, ["dhruva-file"]))
        return
    if args.merge:
        merged: dict[str, dict] = {}
        for path in args.merge:
            saved = json.loads(path.read_text())
            merged.update(saved["results"])
            print(f"{path}: {saved['machine']}", file=sys.stderr)
        print(table(merged, [t for t in targets if t in merged]))
        return
    pythons: dict[str, Path] = {"dhruva": Path(sys.executable)}
    if any(t.startswith("durus") for t in targets):
        pythons["durus"] = args.durus_python or ensure_env(
            Path("/tmp/bench-durus"), ["durus==4.3"], "import durus.connection"
        )
    if any(t.startswith("zodb") for t in targets):
        pythons["zodb"] = args.zodb_python or ensure_env(
            Path("/tmp/bench-zodb"), ["ZODB>=6,<7", "ZEO>=6,<7"], "import ZODB, ZEO"
        )

    import dhruva.persistent

    print(f"machine: {machine()}", file=sys.stderr)
    print(
        f"dhruva persistent base: {dhruva.persistent.PersistentBase.__module__}",
        file=sys.stderr,
    )
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="dhruva-bench-", dir=args.dir) as work:
        for target in targets:
            started = time.monotonic()
            python = pythons[target.split("-")[0]]
            results[target] = run_target(target, python, Path(work), args.quick)
            print(f"{target}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "results": results}, indent=1)
        )
    print(f"Machine: {machine()}. Mode: {'quick' if args.quick else 'full'}.\n")
    print(table(results, targets))


if __name__ == "__main__":
    main()
