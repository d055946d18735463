"""What a file storage does at open about the end of its file.

A crash mid-commit leaves an incomplete transaction at the end of the file.
The layouts without checksums (SHELF-1, DFS20) can also end in a transaction
whose lengths add up but whose bytes, from some point on, are zeros: the file
grew before its data reached the disk. These functions find such a tail
(:func:`check_last`), decide what an open does
about it (:func:`settle_tail`: refuse, read up to it, or cut it off) and cut
it off, saving its bytes aside (:func:`cut_tail`). A file that does not
start with its layout's header is described by :func:`wrong_header_error`:
another layout's file, or one whose header is cut short or damaged.
"""

from __future__ import annotations

import logging
import os
from collections import ChainMap
from collections.abc import Callable, Container, Iterator, Mapping
from typing import BinaryIO

from dhruva.error import StorageError
from dhruva.record import split_oids, unpack_record
from dhruva.shelf import (
    PREFIX,
    MidFileDamageError,
    ScanResult,
    TornTailError,
    TransactionSpan,
    record_data_problem,
    zeros_start,
)

log = logging.getLogger(__name__)

#: Yields ``(offset, length)`` of each object record of a transaction.
RecordSpans = Callable[[BinaryIO, TransactionSpan], Iterator[tuple[int, int]]]


def zeroed_record(
    file: BinaryIO, span: TransactionSpan, record_spans: RecordSpans, trailer: int
) -> str | None:
    """Say where zeros stand in place of record data in the transaction
    ``span``; None when there are none.

    Only the records the trailing zeros reach are read (see
    :func:`~dhruva.shelf.record_data_problem`).

    :param trailer: bytes of a transaction after its last record (DFS20's
        end marker).
    """
    # A transaction whose records end in a non-zero byte has no zeros to
    # explain: most do, and then no record is read.
    body_end = span.end - trailer
    zeros_at = zeros_start(file, span.start, body_end)
    if zeros_at == body_end:
        return None
    for offset, length in record_spans(file, span):
        if offset + length <= zeros_at:
            continue
        file.seek(offset)
        record = file.read(length)
        problem = record_data_problem(record, max(0, zeros_at - offset))
        if problem is not None:
            return (
                f"zeros run from byte offset {zeros_at} to its end; the record "
                f"of oid {int.from_bytes(record[:8], 'big')} at byte offset "
                f"{offset} is not whole: {problem}"
            )
    return None


def dangling_reference(
    file: BinaryIO,
    span: TransactionSpan,
    known: Container[bytes],
    record_spans: RecordSpans,
) -> str | None:
    """Say which record of the transaction ``span`` refers to an oid with
    no record in ``known``; None when none does."""
    for offset, length in record_spans(file, span):
        file.seek(offset)
        oid, _data, refs = unpack_record(file.read(length))
        for ref in split_oids(refs):
            if ref not in known:
                return (
                    f"zeros follow it, and its record of oid "
                    f"{int.from_bytes(oid, 'big')} at byte offset {offset} "
                    f"refers to oid {int.from_bytes(ref, 'big')}, which has "
                    "no record: the zeros may have been its records"
                )
    return None


def check_last(
    file: BinaryIO,
    scan: ScanResult,
    *,
    rescan: Callable[[int], ScanResult],
    record_spans: RecordSpans,
    trailer: int,
    base: Mapping[bytes, int] | None = None,
    size: int = 0,
) -> ScanResult:
    """Treat the last transaction of a scan at open as torn when zeros stand
    where its records' data belongs.

    :param rescan: scans again from where ``scan`` began up to a byte offset.
    :param trailer: bytes of a transaction after its last record.
    :param base: for a layout where zeros can read as the end of a
        transaction (DFS20), the records before the scan: when zeros follow
        the last transaction up to ``size``, a reference from it to an oid
        with no record means the zeros were some of its records.
    :return: ``scan``, or a scan that ends before the last transaction.
    """
    last = scan.last
    if last is None or scan.damaged_inside:
        return scan
    problem = zeroed_record(file, last, record_spans, trailer)
    if (
        problem is None
        and base is not None
        and scan.torn_at == last.end
        and zeros_start(file, last.end, size) == last.end
    ):
        known = ChainMap(scan.index, dict(base))
        problem = dangling_reference(file, last, known, record_spans)
    if problem is None:
        return scan
    cut = rescan(last.start)
    cut.torn_at, cut.reason = last.start, problem
    return cut


def settle_tail(
    file: BinaryIO,
    path: str,
    scan: ScanResult,
    size: int,
    *,
    readonly: bool,
    repair: bool,
) -> StorageError | None:
    """Deal with what a scan at open found after the last whole transaction.

    A writable open refuses, or with ``repair`` cuts an incomplete tail off
    (never damage with commits after it); a read-only open reads up to it.

    :return: the damage a read-only open reads up to; None when the file
        ends cleanly or was repaired.
    :raises TornTailError: for an incomplete last transaction, on a
        writable open without ``repair``.
    :raises MidFileDamageError: for damage with commits after it, on a
        writable open.
    """
    if scan.torn_at is None:
        return None
    error: StorageError = TornTailError(path, scan.torn_at, size, scan.reason)
    if scan.damaged_inside:
        error = MidFileDamageError(path, scan.torn_at, size, scan.reason)
    if readonly:
        if os.path.exists(path + ".lock"):
            # A writer is open on the file: most likely mid-commit.
            log.debug("%s; a commit may be in progress: reading up to it", error)
        else:
            log.warning("%s; reading up to the incomplete transaction", error)
        return error
    if repair and not scan.damaged_inside:
        cut_tail(file, path, scan.torn_at, size, scan.reason)
        return None
    log.error("%s", error)
    raise error


def cut_tail(file: BinaryIO, path: str, offset: int, size: int, reason: str) -> None:
    """Save the bytes from ``offset`` to ``<path>.torn-<offset>``, then
    truncate the file there."""
    aside = f"{path}.torn-{offset}"
    file.seek(offset)
    with open(aside, "wb") as f:
        f.write(file.read())
        f.flush()
        os.fsync(f.fileno())
    file.truncate(offset)
    file.flush()
    os.fsync(file.fileno())
    log.warning(
        "%s: cut an incomplete last transaction (%s) at byte offset %d, "
        "%d bytes; they are saved in %s",
        path,
        reason,
        offset,
        size - offset,
        aside,
    )


def _layouts() -> list[tuple[str, bytes, str]]:
    """Return each layout's name, the first bytes of its files and what
    opens them."""
    from dhruva.checked_file import MAGIC as DHRUVA1_MAGIC
    from dhruva.file_storage2 import MAGIC as DFS20_MAGIC

    return [
        ("DHRUVA1", DHRUVA1_MAGIC, "FileStorage(path), storage kind 'file'"),
        ("SHELF-1", PREFIX, "FileStorage(path), storage kind 'file'"),
        ("DFS20", DFS20_MAGIC, "FileStorage2(path), storage kind 'file2'"),
    ]


def wrong_header_error(path: str, head: bytes, expected: str) -> StorageError:
    """Describe a file that does not start with the header of its layout.

    It may be another layout's file, a file cut short inside the first bytes
    of a header (its bytes are the start of one), or a file whose header is
    damaged (its first bytes differ from a header's in one or two).

    :param head: the file's first bytes (all of them when it is shorter).
    :param expected: what the opener reads, as messages name it, e.g.
        ``"FileStorage (SHELF-1)"``.
    """
    layouts = _layouts()
    for name, magic, opener in layouts:
        if head.startswith(magic):
            return StorageError(
                f"{path} is not a {expected} file: it is a {name} file; open it "
                f"with {opener}"
            )

    # A header cut short: every byte there is the start of one.
    cut = [name for name, magic, _ in layouts if head and magic.startswith(head)]
    if cut:
        return StorageError(
            f"{path} is not a whole database file: its {len(head)} bytes, "
            f"{head!r}, are the start of a {' or '.join(cut)} file's header; "
            "the file was cut short (damaged). Restore it from a backup"
        )

    # A damaged header: one or two bytes differ from one.
    for name, magic, _ in layouts:
        length = min(len(head), len(magic))
        differ = sum(a != b for a, b in zip(head[:length], magic, strict=True))
        if length >= len(magic) // 2 and differ <= 2:
            short = (
                f" and the file ends at byte offset {len(head)}"
                if len(head) < len(magic)
                else ""
            )
            return StorageError(
                f"{path} looks like a damaged {name} file: it starts with "
                f"{head[: len(magic)]!r}, {differ} byte(s) off the {name} header "
                f"{magic!r}{short}. Restore it from a backup"
            )
    return StorageError(
        f"{path} is not a {expected} file: it starts with {head[:8]!r}; open it "
        "with the storage kind that wrote it"
    )
