"""The lock a writer holds on a database file, and telling who holds it.

One process at a time may open a file for writing: it holds an exclusive
``flock`` on the file (the lock Durus takes too) and writes its pid and host
to ``<file>.lock`` so that a refused opener can be told who holds it. These
helpers are shared by every layout of :class:`~dhruva.file_storage.FileStorage`
and by :mod:`dhruva.file_history`.

Limitations:

- POSIX only (``fcntl``); a process can not open one file for writing twice.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from typing import BinaryIO

from dhruva.error import StorageError

log = logging.getLogger(__name__)


class FileLockedError(StorageError):
    """Another process has the file open for writing.

    :param path: the database file.
    :param holder: who holds the lock, as far as it can be told.
    """

    def __init__(self, path: str, holder: str) -> None:
        super().__init__(path, holder)
        self.path = path
        self.holder = holder

    def __str__(self) -> str:
        return (
            f"{self.path} is open for writing in another process ({self.holder}); "
            "close it there first, or open the file with readonly=True"
        )


def fsync_directory(path: str) -> None:
    """Make a file's creation or renaming durable by syncing its directory."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_holder(path: str, file: BinaryIO) -> str:
    """Describe the process holding the lock on ``file``, as best we can."""
    try:
        with open(path + ".lock", encoding="utf-8") as f:
            text = f.read().strip()
        if text:
            return text + f" (from {path}.lock)"
    except OSError:
        pass

    # No note left: Linux lists flock holders with the file's inode.
    inode = os.fstat(file.fileno()).st_ino
    try:
        with open("/proc/locks", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if (
                    len(fields) > 5
                    and fields[1] == "FLOCK"
                    and fields[5].rsplit(":", 1)[-1] == str(inode)
                ):
                    return f"pid {fields[4]} on this host (from /proc/locks)"
    except OSError:
        pass
    return "holder unknown: perhaps a Durus process, which leaves no note"


def open_locked(path: str) -> BinaryIO:
    """Open ``path`` for writing (creating it) and lock it.

    :raises FileLockedError: when another process holds the lock.
    :raises StorageError: when the file keeps being replaced meanwhile.
    """
    for _attempt in range(3):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        file = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                file.close()
                raise
            holder = lock_holder(path, file)
            file.close()
            raise FileLockedError(path, holder) from None

        # A pack in another process may have renamed a new file over the
        # one we opened before we got the lock: then lock the new one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return file
        file.close()
    raise StorageError(f"{path} keeps being replaced while opening it; retry")


def write_lock_note(path: str) -> bool:
    """Write who holds the lock on ``path`` to ``<path>.lock``.

    :return: True when the note was written (and is to be removed on close).
    """
    note = f"pid {os.getpid()} on host {socket.gethostname()}\n"
    try:
        with open(path + ".lock", "w", encoding="utf-8") as f:
            f.write(note)
    except OSError as e:
        log.debug("could not write %s.lock: %s", path, e)
        return False
    return True
