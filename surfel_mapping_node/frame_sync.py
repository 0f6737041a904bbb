"""Match messages of several streams (image, depth, pose, ...) by stamp. No ROS.

The first stream is the reference (the image): a frame is complete when every other
stream has a message within ``tolerance_ns`` of a reference message. Queues are
bounded, and every message that can no longer match is dropped at once and counted.
Nothing waits for a message that cannot come. A reference message is given up as
soon as a stream it still needs has moved past it without a partner, or when its
queue overflows.

Each stream is assumed to arrive in stamp order (as one publisher sends it); a
message older than its stream's previous one is dropped as out of order.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class SyncError(ValueError):
    """Invalid synchronizer setup or an unknown stream name."""


@dataclass(frozen=True)
class MatchedFrame:
    """Messages of all streams that belong to one reference stamp."""

    # Stamp of the reference (first) stream's message, ns.
    stamp_ns: int
    # Stream name -> payload given to FrameSynchronizer.add.
    payloads: dict[str, Any]
    # Stream name -> stamp of its matched message, ns.
    stamps_ns: dict[str, int]


@dataclass
class SyncStats:
    """Counters of what the synchronizer did; all counts are messages."""

    received: dict[str, int] = field(default_factory=dict)
    matched: int = 0
    # Older than the previous message of the same stream.
    dropped_out_of_order: dict[str, int] = field(default_factory=dict)
    # Arrived after every frame it could have joined was already matched or given up.
    dropped_late: dict[str, int] = field(default_factory=dict)
    # Given up because no partner can come any more (partners moved past it).
    dropped_unmatched: dict[str, int] = field(default_factory=dict)
    # Pushed out of a full queue before it matched.
    dropped_overflow: dict[str, int] = field(default_factory=dict)

    def total_dropped(self) -> int:
        """Return the number of dropped messages of all streams and reasons."""
        return sum(
            sum(counts.values())
            for counts in (
                self.dropped_out_of_order,
                self.dropped_late,
                self.dropped_unmatched,
                self.dropped_overflow,
            )
        )


@dataclass
class _Message:
    stamp_ns: int
    payload: Any
    # Part of a matched frame already; removing it later is no drop.
    used: bool = False


class FrameSynchronizer:
    """Approximate-time matcher over bounded per-stream queues.

    Use it from one thread (or under a lock): ``add`` returns the frames that the new
    message completed, oldest first.

    Args:
        streams: stream names; the first is the reference stream (one frame per message).
        tolerance_ns: largest |stamp difference| between a reference message and a
            partner, ns (>= 0).
        queue_size: messages kept per stream while they wait for partners (>= 1); a
            high-rate stream (odometry at 200 Hz) needs a longer queue than the
            camera: pass a dict of stream name -> size.

    Raises:
        SyncError: fewer than two or repeated stream names, a negative tolerance or a
            queue size below 1.
    """

    def __init__(
        self,
        streams: Sequence[str],
        tolerance_ns: int,
        queue_size: int | dict[str, int] = 10,
    ) -> None:
        streams = list(streams)
        if len(streams) < 2 or len(set(streams)) != len(streams):
            raise SyncError(f"invalid streams {streams}: need two or more distinct names")
        if tolerance_ns < 0:
            raise SyncError(f"invalid tolerance_ns={tolerance_ns}: it must be >= 0")
        sizes = queue_size if isinstance(queue_size, dict) else dict.fromkeys(streams, queue_size)
        unknown = sorted(set(sizes) - set(streams))
        if unknown:
            raise SyncError(f"queue_size names unknown stream {unknown[0]!r}: streams are {streams}")
        for name in streams:
            size = sizes.get(name, 10)
            if size < 1:
                raise SyncError(f"invalid queue size {size} for stream {name!r}: it must be >= 1")

        self.streams = streams
        self.reference = streams[0]
        self.tolerance_ns = int(tolerance_ns)
        self._queues: dict[str, deque[_Message]] = {
            name: deque(maxlen=sizes.get(name, 10)) for name in streams
        }
        self._last_stamp_ns: dict[str, int | None] = dict.fromkeys(streams)
        # Reference stamps up to this one are done (matched or given up).
        self._done_until_ns: int | None = None
        self.stats = SyncStats(
            received=dict.fromkeys(streams, 0),
            dropped_out_of_order=dict.fromkeys(streams, 0),
            dropped_late=dict.fromkeys(streams, 0),
            dropped_unmatched=dict.fromkeys(streams, 0),
            dropped_overflow=dict.fromkeys(streams, 0),
        )

    def add(self, stream: str, stamp_ns: int, payload: Any) -> list[MatchedFrame]:
        """Queue one message; return the frames it completed, oldest first.

        Args:
            stream: one of the names given at construction.
            stamp_ns: the message's header stamp, ns.
            payload: anything; handed back in MatchedFrame.payloads.

        Raises:
            SyncError: an unknown stream name.
        """
        if stream not in self._queues:
            raise SyncError(f"unknown stream {stream!r}: streams are {self.streams}")
        stamp_ns = int(stamp_ns)
        self.stats.received[stream] += 1

        # Step 1: drop what can never be used.
        last = self._last_stamp_ns[stream]
        if last is not None and stamp_ns <= last:
            self.stats.dropped_out_of_order[stream] += 1
            return []
        self._last_stamp_ns[stream] = stamp_ns
        if self._is_late(stream, stamp_ns):
            self.stats.dropped_late[stream] += 1
            return []

        # Step 2: queue it, counting what a full queue pushes out.
        queue = self._queues[stream]
        if len(queue) == queue.maxlen and not queue[0].used:
            self.stats.dropped_overflow[stream] += 1
        queue.append(_Message(stamp_ns, payload))

        # Step 3: match and prune.
        matched = self._match()
        self._prune()
        return matched

    def pending(self) -> dict[str, int]:
        """Return the number of queued messages per stream."""
        return {name: len(queue) for name, queue in self._queues.items()}

    def _is_late(self, stream: str, stamp_ns: int) -> bool:
        if self._done_until_ns is None:
            return False
        if stream == self.reference:
            return stamp_ns <= self._done_until_ns
        # A partner can only join reference messages after the last finished one.
        return stamp_ns < self._done_until_ns - self.tolerance_ns

    def _match(self) -> list[MatchedFrame]:
        matched = []
        reference_queue = self._queues[self.reference]
        for message in list(reference_queue):
            partners = {}
            for name in self.streams[1:]:
                partner = self._nearest(name, message.stamp_ns)
                if partner is None:
                    break
                partners[name] = partner
            else:
                matched.append(self._complete(message, partners))
        return matched

    def _nearest(self, stream: str, stamp_ns: int) -> _Message | None:
        best = None
        for candidate in self._queues[stream]:
            distance = abs(candidate.stamp_ns - stamp_ns)
            if distance <= self.tolerance_ns and (best is None or distance < abs(best.stamp_ns - stamp_ns)):
                best = candidate
        if best is None:
            return None
        # While the stream has not reached the stamp, a closer partner may still come.
        last = self._last_stamp_ns[stream]
        if last is None or last < stamp_ns:
            return None
        return best

    def _complete(self, message: _Message, partners: dict[str, _Message]) -> MatchedFrame:
        # Older reference messages can no longer match: partners are consumed in order.
        reference_queue = self._queues[self.reference]
        while reference_queue and reference_queue[0].stamp_ns < message.stamp_ns:
            reference_queue.popleft()
            self.stats.dropped_unmatched[self.reference] += 1
        reference_queue.popleft()
        self._done_until_ns = message.stamp_ns
        self.stats.matched += 1

        # Partners older than the used one are dropped. The used one stays because a
        # slower pose stream may serve the next image with the same pose.
        for name, partner in partners.items():
            queue = self._queues[name]
            while queue and queue[0].stamp_ns < partner.stamp_ns:
                self._discard(name, queue.popleft())
            partner.used = True

        payloads = {self.reference: message.payload}
        payloads.update({name: partner.payload for name, partner in partners.items()})
        stamps = {self.reference: message.stamp_ns}
        stamps.update({name: partner.stamp_ns for name, partner in partners.items()})
        return MatchedFrame(message.stamp_ns, payloads, stamps)

    def _prune(self) -> None:
        # Give up reference messages that some stream has passed without a partner.
        reference_queue = self._queues[self.reference]
        while reference_queue:
            oldest = reference_queue[0]
            hopeless = any(
                self._last_stamp_ns[name] is not None
                and self._last_stamp_ns[name] > oldest.stamp_ns + self.tolerance_ns
                and self._nearest(name, oldest.stamp_ns) is None
                for name in self.streams[1:]
            )
            if not hopeless:
                break
            reference_queue.popleft()
            self.stats.dropped_unmatched[self.reference] += 1
            self._done_until_ns = oldest.stamp_ns

        # Drop partners too old for any reference message that is queued or may come.
        if reference_queue:
            horizon_ns = reference_queue[0].stamp_ns
        elif self._last_stamp_ns[self.reference] is not None:
            horizon_ns = self._last_stamp_ns[self.reference]
        else:
            return
        for name in self.streams[1:]:
            queue = self._queues[name]
            # Keep the newest message: it may be the nearest partner of the next image.
            while len(queue) > 1 and queue[0].stamp_ns < horizon_ns - self.tolerance_ns:
                self._discard(name, queue.popleft())

    def _discard(self, stream: str, message: _Message) -> None:
        if not message.used:
            self.stats.dropped_unmatched[stream] += 1
