"""A single-slot mailbox that keeps only the newest item and counts the ones it dropped.

When inference is slower than the camera, a queue would grow and each output would lag
more than the one before. With a single slot, an image waits for one inference at most. The
producer (a subscription callback) calls ``put``; the consumer (the inference worker)
calls ``take``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class SlotCounts:
    """Counters of a LatestSlot since it was made."""

    # Items given to put.
    received: int
    # Items replaced by a newer one before anyone took them.
    skipped: int
    # Items returned by take.
    taken: int


class LatestSlot(Generic[T]):
    """Mailbox that keeps only the newest item, thread-safe for any number of producers and consumers."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._item: T | None = None
        self._full = False
        self._closed = False
        self._received = 0
        self._skipped = 0
        self._taken = 0

    def put(self, item: T) -> bool:
        """Store ITEM, replacing an untaken one; return True when one was replaced (skipped)."""
        with self._condition:
            replaced = self._full
            self._item = item
            self._full = True
            self._received += 1
            if replaced:
                self._skipped += 1
            self._condition.notify()
        return replaced

    def take(self, timeout_s: float | None = None) -> T | None:
        """Remove and return the newest item, waiting up to TIMEOUT_S seconds (None: forever).

        Returns None on timeout or once the slot is closed.
        """
        with self._condition:
            self._condition.wait_for(lambda: self._full or self._closed, timeout=timeout_s)
            if not self._full:
                return None
            item = self._item
            self._item = None
            self._full = False
            self._taken += 1
            return item

    def close(self) -> None:
        """Wake all waiting consumers; later calls to take return what is left, then None."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    @property
    def counts(self) -> SlotCounts:
        with self._condition:
            return SlotCounts(self._received, self._skipped, self._taken)
