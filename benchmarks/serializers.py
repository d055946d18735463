"""Commit and load times of each serializer (a script, not a test).

Run it with ``uv run python benchmarks/serializers.py [--objects N]``. For each
installed serializer it commits N persistent objects with a typical state (a
few strings and numbers, a datetime, a tuple, a list, a reference) into a
MemoryStorage, then loads every one of them in a new connection, and prints
the best of five runs in microseconds per object, with the record size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from decimal import Decimal
from typing import Any

from dhruva.connection import Connection
from dhruva.error import DhruvaError
from dhruva.persistent import Persistent
from dhruva.persistent_list import PersistentList
from dhruva.plugins import get_plugins
from dhruva.record import ROOT_OID
from dhruva.serializer import resolve_serializer
from dhruva.storage import MemoryStorage


class Order(Persistent):
    """A typical application object."""

    def __init__(self, number: int, customer: Any) -> None:
        self.number = number
        self.customer = customer
        self.placed = dt.datetime(2024, 1, 1) + dt.timedelta(minutes=number)
        self.lines = [("widget", 3, Decimal("9.99")), ("gadget", 1, Decimal("24.50"))]
        self.tags = ["new", "paid"]
        self.note = f"order number {number}"
        self.total = 54.47


def commit_objects(serializer: str, count: int) -> tuple[MemoryStorage, float]:
    storage = MemoryStorage()
    connection = Connection(storage, serializer=serializer)
    root = connection.get_root()
    root["orders"] = orders = PersistentList()
    customer = Persistent()
    started = time.perf_counter()
    for number in range(count):
        orders.append(Order(number, customer))
    connection.commit()
    return storage, time.perf_counter() - started


def load_objects(storage: MemoryStorage) -> float:
    connection = Connection(storage)
    started = time.perf_counter()
    for oid, _record in storage.gen_oid_record():
        if oid != ROOT_OID:
            connection.get(oid)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    count = args.objects

    print(f"Python {platform.python_version()}, {count} objects, best of {args.runs}")
    columns = ("commit us/obj", "load us/obj", "bytes/obj")
    print(f"{'serializer':<10} {columns[0]:>14} {columns[1]:>12} {columns[2]:>10}")
    for kind in get_plugins().serializers:
        try:
            resolve_serializer(kind.name)
        except DhruvaError as error:
            print(f"{kind.name:<10} not available: {error}")
            continue
        commits, loads = [], []
        for _run in range(args.runs):
            storage, seconds = commit_objects(kind.name, count)
            commits.append(seconds)
            loads.append(load_objects(storage))
        size = sum(len(record) for record in storage.records.values()) / count
        print(
            f"{kind.name:<10} {min(commits) / count * 1e6:>14.1f} "
            f"{min(loads) / count * 1e6:>12.1f} {size:>10.0f}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
