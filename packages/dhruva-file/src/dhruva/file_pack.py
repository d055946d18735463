"""Packing a database file: a new file with the reachable records, renamed
over the old one.

:class:`FilePack` runs one pack of a :class:`~dhruva.file_storage.FileStorage`
step by step: it copies the records reachable from the root to
``<file>.pack`` through the layout's :class:`PackWriter`, carries over the
records committed between the steps (and what they reach anew), makes the
new file durable and renames it over the database. A crash at any moment
leaves the old file or the packed one, never neither; the ``.pack`` file a
crash leaves is removed at the next writable open
(:func:`remove_pack_leftover`), and a database a Durus pack moved aside is
put back (:func:`restore_interrupted_durus_pack`). A pack that fails removes
its ``.pack`` file and raises a :class:`~dhruva.error.StorageError` that
names the path, the cause and the fix.

The pack reaches the storage only through what it is given: the storage's
public Storage methods (``load``, for the reachable records) and explicit
callables for the rest (see :class:`FilePack`).

Limitations:

- A pack needs room for a second copy of the reachable records next to the
  file, and fails on a record that refers to an oid with no record (a
  dangling reference) without removing anything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable, Generator, Iterable
from typing import BinaryIO

from dhruva.error import DhruvaKeyError, StorageError
from dhruva.file_lock import FileLockedError, fsync_directory
from dhruva.record import split_oids, unpack_record
from dhruva.shelf import PREFIX, encode_map, encode_transaction
from dhruva.storage import Storage

log = logging.getLogger(__name__)


class PackWriter:
    """Writes a packed copy of a database in one layout, driven by a pack.

    The pack calls :meth:`add` for every reachable record, then
    :meth:`end_reachable`, then :meth:`finish` with the records committed
    while it ran (and those they reach anew).

    :param file: the new file, empty, opened for writing.
    """

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        #: The offset of each reachable record written, by oid.
        self.offsets: dict[bytes, int] = {}

    def add(self, oid: bytes, record: bytes) -> None:
        """Write one reachable record."""
        raise NotImplementedError

    def end_reachable(self, next_oid: int) -> None:
        """Close the part that holds the reachable records.

        :param next_oid: the storage's oid counter now.
        """

    def finish(self, carried: dict[bytes, bytes], next_oid: int) -> None:
        """Write the records committed while packing, and whatever the
        layout keeps after them (an index, the oid counter).

        :param next_oid: the oid counter, kept so that the oids of the
            records the pack dropped are never handed out again.
        """
        raise NotImplementedError


class ShelfPackWriter(PackWriter):
    """A packed SHELF-1 file: the reachable records as its first transaction,
    the offset map, and the carried records as a transaction after it."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        file.write(PREFIX + bytes(8))
        self.position = len(PREFIX) + 8

    def add(self, oid: bytes, record: bytes) -> None:
        self.file.write((8 + len(record)).to_bytes(8, "big") + oid + record)
        self.offsets[oid] = self.position
        self.position += 16 + len(record)

    def end_reachable(self, next_oid: int) -> None:
        map_start = self.position
        self.file.seek(len(PREFIX))
        self.file.write((map_start - len(PREFIX) - 8).to_bytes(8, "big"))

        # The map covers every oid ever handed out, so none is reused.
        numbers = {int.from_bytes(oid, "big"): at for oid, at in self.offsets.items()}
        self.file.seek(map_start)
        count = max(max(numbers) + 2 if numbers else 0, next_oid)
        self.file.write(encode_map(map_start, count, numbers))

    def finish(self, carried: dict[bytes, bytes], next_oid: int) -> None:
        if carried:
            self.file.write(encode_transaction(iter(carried.items()))[0])


class FilePack:
    """One pack of a database file, from its first step to the rename.

    :param storage: the storage packed; only its Storage methods are used.
    :param path: its database file.
    :param step: records copied between the points where :meth:`run` yields.
    :param records: yields the ``(oid, record)`` pairs the new file starts
        with: those reachable from the root for a pack, every record for a
        rewrite that only moves the oid counter on.
    :param current_oids: returns the oids that have a record now.
    :param oid_counter: returns the next oid the storage would hand out.
    :param writer: makes the layout's :class:`PackWriter` for a new file.
    :param install: takes the packed file, durable and renamed over the
        database, as the storage's file.
    """

    def __init__(
        self,
        storage: Storage,
        path: str,
        *,
        step: int,
        records: Callable[[], Iterable[tuple[bytes, bytes]]],
        current_oids: Callable[[], set[bytes]],
        oid_counter: Callable[[], int],
        writer: Callable[[BinaryIO], PackWriter],
        install: Callable[[BinaryIO], None],
    ) -> None:
        self.storage = storage
        self.path = path
        self.step = step
        self._records = records
        self._current_oids = current_oids
        self._oid_counter = oid_counter
        self._writer = writer
        self._install = install
        #: Oids committed since the pack started.
        self.committed: set[bytes] = set()

    @property
    def pack_path(self) -> str:
        """Where the packed file is written before it is renamed."""
        return self.path + ".pack"

    def note_commit(self, oids: Iterable[bytes]) -> None:
        """Tell the pack about records committed while it runs."""
        self.committed.update(oids)

    def run(self, mode: int) -> Generator[None, None, set[bytes]]:
        """Pack, yielding between steps.

        :param mode: the permission bits of the database file.
        :return: the oids the pack removed.
        :raises StorageError: naming the file and the cause when the pack
            fails; the database is then as it was.
        """
        log.info("packing %s", self.path)
        new: BinaryIO | None = None
        try:
            new = self._create(mode)
            old_oids = self._current_oids()
            writer = self._writer(new)

            # The reachable records, a step at a time.
            for i, (oid, record) in enumerate(self._records()):
                writer.add(oid, record)
                if i % self.step == self.step - 1:
                    yield None
            writer.end_reachable(self._oid_counter())
            yield None

            # Records committed while packing, and what they reach anew.
            carried = self._carry_over(set(writer.offsets) - self.committed)
            kept = set(writer.offsets) | set(carried)
            writer.finish(carried, self._oid_counter())
            packed, new = new, None
            self._replace_with(packed)
        except OSError as e:
            raise self._pack_error(e) from e
        except DhruvaKeyError as e:
            raise self._dangling_error(e) from e
        finally:
            if new is not None:
                self._discard(new)
        removed = old_oids - kept
        log.info(
            "packed %s: %d records kept, %d removed",
            self.path,
            len(kept),
            len(removed),
        )
        return removed

    def _create(self, mode: int) -> BinaryIO:
        """Create and lock the packed file, with the database file's mode."""
        new = open(self.pack_path, "w+b")  # noqa: SIM115 (becomes the file)
        try:
            fcntl.flock(new.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(new.fileno(), stat.S_IMODE(mode))
        except BaseException:
            self._discard(new)
            raise
        return new

    def _discard(self, new: BinaryIO) -> None:
        with contextlib.suppress(OSError):
            new.close()
        with contextlib.suppress(OSError):
            os.unlink(self.pack_path)

    def _carry_over(self, copied: set[bytes]) -> dict[bytes, bytes]:
        """Return the records committed while packing, and those they reach
        that the first pass did not copy.

        :param copied: the oids the first pass copied that no commit has
            changed since; what they refer to was copied too.
        """
        carried: dict[bytes, bytes] = {}
        todo = sorted(self.committed, reverse=True)
        while todo:
            oid = todo.pop()
            if oid in copied or oid in carried:
                continue
            record = self.storage.load(oid)
            carried[oid] = record
            todo.extend(split_oids(unpack_record(record)[2]))
        return carried

    def _replace_with(self, packed: BinaryIO) -> None:
        """Make the packed file durable, rename it over the database file and
        hand it to the storage: the moment a pack takes effect.

        On failure before the rename, the packed file is removed and the
        database is untouched.
        """
        try:
            packed.flush()
            os.fsync(packed.fileno())
            os.replace(self.pack_path, self.path)
        except BaseException:
            self._discard(packed)
            raise

        # From here the packed file is the database; the lock on it guards
        # the path. It holds every commit, and is on disk.
        self._install(packed)
        try:
            fsync_directory(self.path)
        except OSError as e:
            log.warning(
                "%s: packed, but syncing its folder failed (%s); a power failure "
                "now may bring back the file as it was before the pack",
                self.path,
                e,
            )

    def _dangling_error(self, error: DhruvaKeyError) -> StorageError:
        """Describe a pack stopped by a reference to an oid with no record."""
        oid = error.args[0] if error.args else b""
        number = int.from_bytes(oid, "big") if isinstance(oid, bytes) else oid
        message = (
            f"packing {self.path} failed: a reachable record refers to oid "
            f"{number}, which has no record (a dangling reference); nothing was "
            "removed and the database is still writable. Find the referring "
            "records with dhruva.storage.gen_referring_oid_record, repair "
            "them, and pack again"
        )
        log.error("%s", message)
        return StorageError(message)

    def _pack_error(self, error: OSError) -> StorageError:
        """Describe a pack that failed, and what to do about it."""
        where = error.filename or self.pack_path
        folder = os.path.dirname(os.path.abspath(self.path))
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            fix = (
                f"free disk space in {folder} (a pack writes a new copy of the "
                "reachable objects there) and pack again"
            )
        elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = (
                f"make {folder} writable (a pack writes its new file there and "
                "renames it over the database) and pack again"
            )
        else:
            fix = "remove the cause and pack again"
        message = (
            f"packing {self.path} failed at {where}: "
            f"{error.strerror or error}; the database is unchanged and still "
            f"writable. To pack it, {fix}"
        )
        log.error("%s", message)
        return StorageError(message)


def remove_pack_leftover(path: str) -> None:
    """Remove the ``.pack`` file of a pack that a crash interrupted.

    Called with the lock on ``path`` held: no pack can be running in
    another process.
    """
    leftover = path + ".pack"
    try:
        os.unlink(leftover)
    except FileNotFoundError:
        return
    except OSError as e:
        log.warning(
            "%s: could not remove %s, left by an interrupted pack: %s",
            path,
            leftover,
            e,
        )
        return
    log.warning(
        "%s: removed %s, the unfinished new file of a pack that was "
        "interrupted; the database is as it was before that pack",
        path,
        leftover,
    )


def restore_interrupted_durus_pack(path: str, readonly: bool) -> None:
    """Put back a database file that a Durus pack moved aside.

    Durus packs a DFS20 file by renaming it to ``<file>.prepack``, then
    renaming the packed file to ``<file>``: a crash between the two leaves
    no file under the name. The file moved aside is complete, so a writable
    open renames it back (and the ``.pack`` file is removed as a leftover);
    a read-only open, which changes nothing, refuses.

    :raises StorageError: on a read-only open of such a file.
    :raises FileLockedError: when the Durus process is still packing.
    """
    aside = path + ".prepack"
    if os.path.exists(path) or not os.path.exists(aside):
        return
    if readonly:
        raise StorageError(
            f"no database file {path}, but {aside} is there: a Durus "
            "pack was interrupted after moving the database aside. Open it "
            f"once without readonly=True to put it back, or rename {aside} "
            f"to {path}"
        )

    # A Durus process still between its two renames holds its lock.
    with open(aside, "rb") as moved:
        try:
            fcntl.flock(moved.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileLockedError(
                path, f"a process packing it, which holds {aside}"
            ) from None
        try:
            os.link(aside, path)
        except FileExistsError:
            return  # someone else put a file there meanwhile: open that
        os.unlink(aside)
        fsync_directory(path)
    log.warning(
        "%s was missing after an interrupted Durus pack; put back the "
        "database it had moved to %s (the pack is lost, no commit is)",
        path,
        aside,
    )
