"""Point in time for the file storages: list the commits, view or restore one.

FileStorage ("SHELF-1", "DHRUVA1") and FileStorage2 ("DFS20") files only
ever grow at the end, one transaction per commit, until the next pack rewrites
them. Each commit therefore leaves a point the database can be seen at again: the
file's size right after it, called its *position*. The commits made before
the last pack are gone; what the pack kept is the *base*, the first point.

- :func:`list_transactions` lists the points; :func:`read_history` also says
  whether the file ends in an incomplete transaction (``dhruva history FILE``
  prints both);
- ``FileStorage(path, readonly=True, at=position)`` (or :func:`open_file`
  with ``at``) is a read-only view of the database as of one of them: a
  :class:`~dhruva.connection.Connection` on it sees the database as it was;
- :func:`restore` writes a new database file holding the database as of one
  of them (``dhruva restore FILE --at POSITION --output NEW``). The source is
  never changed.

Limitations:

- Durus's formats do not record when a commit was made, so no times are
  shown for them; dhruva's checked format (:mod:`dhruva.checked_file`)
  records each commit's time.
- A restored file is the first ``position`` bytes of the source: a valid file
  of the same format, with the history up to that point. Its oid counter
  starts after the oids it holds, so oids the source handed out later may be
  handed out again in the restored database (they belong to another
  database from then on).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dhruva.checked_file import MAGIC as CHECKED_MAGIC
from dhruva.checked_file import CheckedFileStorage
from dhruva.error import StorageError
from dhruva.file_lock import FileLockedError, fsync_directory
from dhruva.file_storage import FileStorage
from dhruva.file_storage2 import MAGIC, FileStorage2
from dhruva.shelf import PREFIX, MidFileDamageError, TornTailError, TransactionSpan

log = logging.getLogger(__name__)

#: Bytes copied per read when a file is restored.
_COPY_CHUNK = 1 << 20


def storage_class(path: str | os.PathLike[str]) -> type[FileStorage]:
    """Return the class that reads the file at ``path``, told by its first bytes.

    :raises StorageError: when the file is missing or of another format.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(16)
    except FileNotFoundError:
        raise StorageError(
            f"no database file {os.fspath(path)}; check the path"
        ) from None
    if header.startswith(PREFIX):
        return FileStorage
    if header.startswith(CHECKED_MAGIC):
        return CheckedFileStorage
    if header.startswith(MAGIC):
        return FileStorage2
    what = "a SQLite database, not" if header.startswith(b"SQLite format 3") else "not"
    raise StorageError(
        f"{os.fspath(path)} is {what} a FileStorage or FileStorage2 file (it "
        f"starts with {header[:8]!r}); only those keep their past commits until "
        "a pack"
    )


def open_file(path: str | os.PathLike[str], *, at: int | None = None) -> FileStorage:
    """Open a file storage read-only, as of the position ``at`` if given.

    :param at: the position of one of :func:`list_transactions`; None for
        the database as it is now.
    :raises StorageError: when the file is not a file storage, or ``at`` is
        not a position in it.
    """
    return storage_class(path)(path, readonly=True, at=at)


def list_transactions(path: str | os.PathLike[str]) -> list[TransactionSpan]:
    """Return the points in time of a file, oldest (the base) first.

    Each :class:`~dhruva.shelf.TransactionSpan` gives the ``end`` to pass as
    ``at``, and the number of records written there.
    """
    return read_history(path).spans


@dataclass(frozen=True)
class History:
    """What :func:`read_history` found in a file."""

    #: The storage class that reads the file (its format).
    kind: type[FileStorage]
    #: The points in time, oldest (the base) first.
    spans: list[TransactionSpan]
    #: What follows the last listed commit when it is not the end of the
    #: file: an incomplete last transaction
    #: (:class:`~dhruva.shelf.TornTailError`) or damage with more data after
    #: it (:class:`~dhruva.shelf.MidFileDamageError`); None otherwise.
    damage: StorageError | None


def read_history(path: str | os.PathLike[str]) -> History:
    """List a file's points in time, and what ends it if not a commit."""
    kind = storage_class(path)
    with kind(path, readonly=True) as storage:
        return History(kind, storage.transactions(), storage.damage)


def describe_damage(path: str | os.PathLike[str], damage: StorageError) -> str:
    """Say, for ``dhruva history``, what ``damage`` means and how to deal
    with it."""
    name = os.fspath(path)
    if isinstance(damage, TornTailError):
        return (
            f"{name} ends in an incomplete transaction at byte offset "
            f"{damage.offset} ({damage.size - damage.offset} bytes: "
            f"{damage.reason}), left by a crash during a commit (or a commit "
            "in progress); it is not listed. Opening the file for writing "
            "refuses it until it is opened once with --repair (for example "
            f"`dhruva client --file {name} --repair`), which cuts it off and "
            f"saves the bytes as {name}.torn-{damage.offset}"
        )
    if isinstance(damage, MidFileDamageError):
        return (
            f"{name} is damaged at byte offset {damage.offset} "
            f"({damage.reason}), and {damage.size - damage.offset} bytes follow "
            "it: the commits after it are not listed, and --repair can not fix "
            "it. Restore the file from a backup, or copy the listed commits "
            f"with `dhruva restore {name} --at POSITION --output NEW`"
        )
    return f"{name}: {damage}"


def restore(
    path: str | os.PathLike[str],
    at: int,
    output: str | os.PathLike[str],
    *,
    force: bool = False,
) -> tuple[int, TransactionSpan]:
    """Write the database as it was at position ``at`` to a new file.

    The new file appears under its name whole or not at all (it is written
    aside, synced, then renamed).

    :param path: the source file; it is never changed.
    :param at: a position from :func:`list_transactions`.
    :param output: the file to write.
    :param force: replace ``output`` if it exists (unless a process has it
        open for writing).
    :return: the number of the transaction restored (0 for the base) and
        its span.
    :raises StorageError: when ``at`` is not a position of ``path``, or
        ``output`` exists and ``force`` is false, or is the source.
    """
    source = Path(path)
    target = Path(output)
    storage_class(source)  # a missing or foreign source is named first
    if target.exists():
        if target.resolve() == source.resolve() or os.path.samefile(source, target):
            raise StorageError(
                f"{target} is the file being restored from; restore writes a new "
                "file and never changes its source: choose another --output"
            )
        if not force:
            raise StorageError(
                f"{target} exists already; choose another name, or pass "
                "force=True (`--force`) to replace it"
            )

    with open_file(source, at=at) as view:
        spans = view.transactions()
        number = next(i for i, span in enumerate(spans) if span.end == at)
        file = view._live_file()
        fd, temporary = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".restoring"
        )
        try:
            _copy_prefix(file.fileno(), fd, at)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            _check_readable(temporary, at)
            _replace(temporary, target)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    log.info(
        "restored %s as of byte offset %d (transaction %d) to %s",
        source,
        at,
        number,
        target,
    )
    return number, spans[number]


def _copy_prefix(source_fd: int, target_fd: int, length: int) -> None:
    offset = 0
    while offset < length:
        chunk = os.pread(source_fd, min(_COPY_CHUNK, length - offset), offset)
        if not chunk:
            raise StorageError(
                f"the source ended at byte offset {offset} while copying"
            )
        os.write(target_fd, chunk)
        offset += len(chunk)


def _check_readable(path: str, size: int) -> None:
    # The copy must open as a whole database of its own.
    with storage_class(path)(path, readonly=True, at=size):
        pass


def _replace(temporary: str, target: Path) -> None:
    """Rename ``temporary`` over ``target``, unless a writer has ``target`` open."""
    existing = None
    with contextlib.suppress(FileNotFoundError):
        existing = open(target, "rb")  # noqa: SIM115 (held for its lock)
    try:
        if existing is not None:
            try:
                fcntl.flock(existing.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise FileLockedError(str(target), "a writer has it open") from None
        os.replace(temporary, target)
        fsync_directory(str(target))
    finally:
        if existing is not None:
            existing.close()
