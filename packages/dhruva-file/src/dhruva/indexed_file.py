"""IndexedFileStorage: what the file layouts with an index in memory share.

FileStorage2 (Durus's "DFS20") and CheckedFileStorage (dhruva's "DHRUVA1")
files both begin with a *base*, the records a pack (or the file's creation)
wrote, mapped by one index written after them; the commits after the index
are found by scanning them at open. The whole index is then kept in memory,
oid to byte offset. Each layout reads its own header and index and writes its
own transactions; reading the records, listing them, and taking in the scan
of the later transactions are the same, and live here.

Everything else (locking, repair, read-only opens that follow the file,
point-in-time views, crash-safe packs, deferred durability) is
:class:`~dhruva.file_storage.FileStorage`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import BinaryIO

from dhruva.file_storage import FileStorage

log = logging.getLogger(__name__)


class IndexedFileStorage(FileStorage):
    """A file storage whose layout keeps an index of its base, read whole at
    open (see the module docstring); a base class, not opened itself."""

    _LAYOUT_STATE = (
        *(name for name in FileStorage._LAYOUT_STATE if name != "_map"),
        "_base_count",
    )

    #: Byte offsets of the current record of each oid.
    _index: dict[bytes, int]
    #: The number of records the base holds.
    _base_count: int

    def _take_in(
        self,
        file: BinaryIO,
        base: dict[bytes, int],
        base_end: int,
        *,
        visible: int,
        repair: bool,
        recorded_next: int,
        index_name: str,
    ) -> None:
        """Scan the transactions after the base and make the index.

        :param base: the offsets of the base's records, from its index; it
            becomes the storage's index.
        :param base_end: where the base's index ends and commits begin.
        :param visible: the file's size, or the end of a point-in-time view.
        :param recorded_next: the oid counter the file records (0 if none).
        :param index_name: what the layout calls its index, for messages.
        """
        if visible < base_end:
            raise self._not_a_position(
                f"the {index_name}, written when the file was created or last "
                f"packed, ends at byte offset {base_end}"
            )
        scan = self._scan(file, base_end, visible)
        scan = self._check_last_transaction(
            file, scan, base_end, base=base, size=visible
        )
        self._check_tail(scan, visible, repair)
        self._base_count = len(base)
        base.update(scan.index)
        self._index = base
        self._end = scan.end
        self._base_end = base_end
        highest = max((int.from_bytes(oid, "big") for oid in base), default=-1)
        self._next_oid = max(recorded_next, highest + 1)
        log.debug(
            "%s: %d records, %d transactions after the %s",
            self.path,
            len(base),
            scan.transactions,
            index_name,
        )

    # --- reading -------------------------------------------------------------------

    def _position(self, oid: bytes) -> int | None:
        return self._index.get(oid)

    def _base_records(self) -> int:
        return self._base_count

    def _records_after_base(self) -> int:
        return len(self._index) - self._base_count

    def _gen_positions(self) -> Iterator[tuple[bytes, int]]:
        yield from list(self._index.items())

    def get_size(self) -> int:
        """Return the number of current records."""
        self._live_file()
        return len(self._index)
