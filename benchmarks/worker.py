"""One benchmark target, run in the interpreter of the system under test.

``benchmarks/run.py`` starts this script once per target with the Python of
that system's environment (dhruva's own, a Durus 4.3 venv, a ZODB 6 venv), so
it uses only the standard library and the system being measured. It prints
one JSON object: row name -> number (seconds, a ratio, or a count per second).

Usage: ``python worker.py TARGET DIR [--quick] [--port N] [--mode MODE]``,
TARGET one of the names in :data:`TARGETS`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import sys
import time
import timeit
from typing import Any

TARGETS = [
    "dhruva-file",
    "dhruva-file2",
    "dhruva-sqlite",
    "dhruva-server",
    "durus-file",
    "durus-server",
    "zodb-file",
    "zodb-zeo",
]

TARGET = sys.argv[1] if len(sys.argv) > 1 else ""
SYSTEM = TARGET.split("-")[0]

# The persistent base class and BTree class of each system.
_CLASSES = {
    "dhruva": ("dhruva.persistent", "Persistent", "dhruva.btree", "BTree"),
    "durus": ("durus.persistent", "Persistent", "durus.btree", "BTree"),
    "zodb": ("persistent", "Persistent", "BTrees.OOBTree", "OOBTree"),
}
_modules = _CLASSES.get(SYSTEM, _CLASSES["dhruva"])
Persistent: Any = getattr(importlib.import_module(_modules[0]), _modules[1])
BTree: Any = getattr(importlib.import_module(_modules[2]), _modules[3])


class Item(Persistent):
    """The object every workload stores: one small attribute."""

    def __init__(self, value: Any) -> None:
        self.value = value


# An Item of a fast_reads class (dhruva's opt-in, see dhruva.persistent).
FastItem: Any = None
if SYSTEM == "dhruva":

    class _FastItem(Item, fast_reads=True):  # type: ignore[call-arg,unused-ignore]
        pass

    FastItem = _FastItem


class Plain:
    """The plain object the attribute costs are compared with."""

    def __init__(self, value: int) -> None:
        self.value = value


class Database:
    """One open database of the target, behind a small common interface."""

    def __init__(self, target: str, path: str, port: int) -> None:
        self.target = target
        self.path = path
        self.port = port
        self.open()

    def open(self) -> None:
        target, path, port = self.target, self.path, self.port
        if target.startswith("dhruva"):
            from dhruva.connection import Connection

            if target == "dhruva-file":
                from dhruva.file_storage import FileStorage

                storage: Any = FileStorage(path)
            elif target == "dhruva-file2":
                from dhruva.file_storage2 import FileStorage2

                storage = FileStorage2(path)
            elif target == "dhruva-sqlite":
                from dhruva.sqlite_storage import SqliteStorage

                storage = SqliteStorage(path)
            else:
                from dhruva.client_storage import ClientStorage

                storage = ClientStorage("127.0.0.1", port)
            self.storage = storage
            self.connection: Any = Connection(storage, cache_size=1_000_000)
            self.root = self.connection.get_root()
        elif target.startswith("durus"):
            durus_connection = importlib.import_module("durus.connection")
            if target == "durus-file":
                module = importlib.import_module("durus.file_storage")
                storage = module.FileStorage(path)
            else:
                module = importlib.import_module("durus.client_storage")
                storage = module.ClientStorage(host="127.0.0.1", port=port)
            self.storage = storage
            self.connection = durus_connection.Connection(storage, cache_size=1_000_000)
            self.root = self.connection.get_root()
        else:
            zodb = importlib.import_module("ZODB")
            if target == "zodb-file":
                module = importlib.import_module("ZODB.FileStorage")
                storage = module.FileStorage(path)
            else:
                module = importlib.import_module("ZEO.ClientStorage")
                storage = module.ClientStorage(("127.0.0.1", port), wait=True)
            self.storage = storage
            self.db = zodb.DB(storage, cache_size=1_000_000)
            self.connection = self.db.open()
            self.root = self.connection.root()

    def commit(self) -> None:
        if SYSTEM == "zodb":
            self.connection.transaction_manager.commit()
        else:
            self.connection.commit()

    def ghost(self, objects: list[Any]) -> None:
        """Drop the loaded state of ``objects`` (the object cache is cleared)."""
        if SYSTEM == "zodb":
            self.connection.cacheMinimize()
        else:
            for obj in objects:
                obj._p_set_status_ghost()

    def new_oid(self) -> Any:
        return self.storage.new_oid()

    def pack(self) -> None:
        if SYSTEM == "zodb":
            self.db.pack()
        else:
            self.connection.pack()

    def close(self) -> None:
        if SYSTEM == "zodb":
            self.connection.close()
            self.db.close()
        else:
            self.connection.abort()
            self.storage.close()

    def reopen(self) -> None:
        self.close()
        self.open()


def best(function: Any, repeats: int) -> float:
    """The smallest time of ``repeats`` calls of ``function``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def read_all(items: list[Any]) -> int:
    total = 0
    for item in items:
        total += item.value
    return total


def attribute_costs(db: Database) -> dict[str, float]:
    """Attribute read and write on a loaded object, as ratios to a plain one.

    For dhruva the read is measured on a default class and on a fast_reads one.
    """
    item = Item(1)
    db.root["attribute"] = item
    fast = None if FastItem is None else FastItem(1)
    if fast is not None:
        db.root["fast attribute"] = fast
    db.commit()
    item.value  # noqa: B018 - loads and stamps it in this transaction
    if fast is not None:
        fast.value  # noqa: B018
    plain = Plain(1)

    def cost(statement: str, obj: Any) -> float:
        # Five accesses a loop turn; the minimum of many short runs, because
        # a shared machine makes long runs noisy.
        timer = timeit.Timer(";".join([statement] * 5), globals={"o": obj})
        return min(timer.timeit(number=2000) for _ in range(150))

    def ratio(statement: str, obj: Any = item) -> float:
        ours, theirs = [], []
        for _ in range(3):
            ours.append(cost(statement, obj))
            theirs.append(cost(statement, plain))
        return min(ours) / min(theirs)

    results = {"attribute read / plain": ratio("o.value")}
    if fast is not None:
        results["attribute read, fast_reads class / plain"] = ratio("o.value", fast)
    item.value = 2  # the first write of the transaction
    results["attribute write / plain"] = ratio("o.value = 3")
    db.commit()
    return results


class FsyncProbe:
    """Appends 64 bytes to a file in ``directory`` and fsyncs it."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "fsync-probe")
        self.file = open(self.path, "ab")  # noqa: SIM115 - closed by close()

    def __call__(self) -> None:
        self.file.write(b"x" * 64)
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()
        os.remove(self.path)


def main_workloads(db: Database, quick: bool, directory: str) -> dict[str, float]:
    n = 1000
    commits = 100 if quick else 1000
    repeats = 2 if quick else 3
    results: dict[str, float] = {}
    server = db.target.endswith(("server", "zeo"))

    # add 1000 objects (a new list of them each time)
    counter = [0]

    def add() -> None:
        counter[0] += 1
        db.root[f"items{counter[0]}"] = [Item(i) for i in range(n)]
        db.commit()

    results["add 1000 objects"] = best(add, repeats)
    db.root["items"] = items = db.root[f"items{counter[0]}"]
    db.commit()

    def update() -> None:
        for item in items:
            item.value += 1
        db.commit()

    results["update 1000 objects"] = best(update, repeats)

    # cold: a new connection (and a new storage object) for every run
    def cold() -> None:
        read_all(db.root["items"])

    cold_times = []
    for _ in range(repeats):
        db.reopen()
        cold_times.append(best(cold, 1))
    results["cold read 1000 objects"] = min(cold_times)
    if server:
        results["cold read per object via server"] = min(cold_times) / n
    items = db.root["items"]

    def hot() -> None:
        read_all(items)

    hot_times = []
    for _ in range(repeats):
        db.ghost(items)
        hot_times.append(best(hot, 1))
    results["hot read 1000 objects"] = min(hot_times)
    read_all(items)
    results["cached read 1000 objects"] = best(hot, 50)

    # one-object commits
    def one_commit() -> None:
        items[0].value += 1
        db.commit()

    # Each commit is followed by a raw fsync in the same directory, so both
    # see the same disk weather; the medians are compared.
    probe = FsyncProbe(directory) if not server else None
    one_commit()
    commit_times, fsync_times = [], []
    for _ in range(commits):
        start = time.perf_counter()
        one_commit()
        commit_times.append(time.perf_counter() - start)
        if probe is not None:
            start = time.perf_counter()
            probe()
            fsync_times.append(time.perf_counter() - start)
    results["one-object commit"] = statistics.median(commit_times)
    if probe is not None:
        probe.close()
        raw = statistics.median(fsync_times)
        results["raw fsync of this disk"] = raw
        results["one-object commit / raw fsync"] = results["one-object commit"] / raw

    def new_oids() -> None:
        for _ in range(1000):
            db.new_oid()

    results["new oid"] = best(new_oids, repeats) / 1000
    results.update(attribute_costs(db))
    return results


def btree_workload(db: Database, quick: bool) -> dict[str, float]:
    size = 10_000 if quick else 100_000
    label = f"{size // 1000}k"

    def build() -> None:
        tree = BTree()
        db.root["tree"] = tree
        db.commit()
        for key in range(size):
            tree[key] = key
            if key % 1000 == 999:
                db.commit()
        db.commit()

    built = best(build, 1)
    db.reopen()

    def traverse() -> None:
        count = 0
        for _key, _value in db.root["tree"].items():
            count += 1
        assert count == size, count

    traversed = best(traverse, 1)
    return {
        f"build {label}-item BTree": built,
        f"traverse {label}-item BTree cold": traversed,
        f"build + traverse {label} BTree": built + traversed,
    }


def pack_build(db: Database, quick: bool) -> dict[str, float]:
    # Chunks of 1000 objects, each list held by a persistent object, one
    # commit each: ZODB slows down badly on one transaction of 200k objects.
    size = 10_000 if quick else 100_000
    for chunk in range(size // 1000):
        db.root[f"live{chunk}"] = Item([Item(i) for i in range(1000)])
        db.root[f"dead{chunk}"] = Item([Item(i) for i in range(1000)])
        db.commit()
    for chunk in range(size // 1000):
        del db.root[f"dead{chunk}"]
    db.commit()
    return {}


def pack_run(db: Database, quick: bool) -> dict[str, float]:
    size = 10_000 if quick else 100_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    db.pack()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    label = f"{size // 1000}k+{size // 1000}k"
    return {
        f"pack {label} live+dead": elapsed,
        f"pack {label} peak RSS MB": peak / 1024,
        f"pack {label} RSS growth MB": (peak - before) / 1024,
    }


def commit_client(db: Database, quick: bool, start_at: float, name: str) -> dict:
    commits = 20 if quick else 100
    item = Item(0)
    db.root[name] = item
    while True:
        try:
            db.commit()
            break
        except Exception:  # a conflict on the root: try again
            if SYSTEM == "zodb":
                db.connection.transaction_manager.abort()
            else:
                db.connection.abort()
            db.root[name] = item
    time.sleep(max(0.0, start_at - time.time()))
    began = time.time()
    for _ in range(commits):
        item.value += 1
        db.commit()
    return {"began": began, "ended": time.time(), "commits": commits}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("directory")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--mode",
        default="main",
        choices=["main", "btree", "pack-build", "pack-run", "client", "attributes"],
    )
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--name", default="client")
    args = parser.parse_args()

    suffix = {"btree": "-btree", "pack-build": "-pack", "pack-run": "-pack"}
    path = os.path.join(args.directory, f"{args.target}{suffix.get(args.mode, '')}.db")
    db = Database(args.target, path, args.port)
    if args.mode == "main":
        results: dict[str, Any] = main_workloads(db, args.quick, args.directory)
    elif args.mode == "attributes":
        results = attribute_costs(db)
    elif args.mode == "btree":
        results = btree_workload(db, args.quick)
    elif args.mode == "pack-build":
        results = pack_build(db, args.quick)
    elif args.mode == "pack-run":
        results = pack_run(db, args.quick)
    else:
        results = commit_client(db, args.quick, args.start_at, args.name)
    db.close()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
