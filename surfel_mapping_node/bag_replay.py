"""Publish a ROS 2 bag into a live ROS 2 graph with rclpy: ``ros2 bag play`` for machines without rosbag2.

Use :func:`replay_bag` (or ``surfel-map replay BAG``) to feed a bag written by
``surfel-map convert`` (or any rosbag2 bag, mcap or sqlite3) to the mapping node when
rosbag2 is not installed, e.g. with the ROS 2 wheels from PyPI. Where rosbag2 exists,
``ros2 bag play BAG`` plays the same bags.

Messages go out as the recorded CDR bytes, so header stamps are exactly those in the
bag. The gaps between messages are their bag time differences divided by ``rate``. Publishers
use the QoS the bag records as offered, as ``ros2 bag play`` does: reliable and
volatile for converted bags, keep last 10. ``image_qos="sensor-data"`` switches the
sensor_msgs topics (images, camera_info) to rclpy's sensor-data profile (best effort,
keep last 5); only best-effort subscribers receive those, since a reliable
subscriber does not match a best-effort publisher.

No clock is published: nodes that match messages by header stamp (the mapping node
does) need none.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

# History depth of the publishers (keep last), as in the bags' recorded offered QoS.
QUEUE_DEPTH = 10
# How long the end of a replay waits for reliable subscribers to acknowledge.
ACK_TIMEOUT_S = 5.0
# Maximum single sleep, so that a stop request takes effect quickly.
_SLEEP_SLICE_S = 0.05


class ImageQos(str, Enum):
    """QoS of the image and camera_info publishers."""

    # The QoS the bag records as offered (reliable for converted bags), as ros2 bag play.
    RELIABLE = "reliable"
    # rclpy's sensor-data profile: best effort, keep last 5.
    SENSOR_DATA = "sensor-data"


class ReplayError(RuntimeError):
    """The bag cannot be replayed: rclpy or a message package is missing, or bad arguments."""


class _TopicQos(NamedTuple):
    """The rclpy QoS profile of one publisher and how it reads in the log."""

    profile: Any
    description: str


@dataclass
class ReplaySummary:
    """Message counts and duration of one :func:`replay_bag` call."""

    messages: int = 0
    # Complete passes through the bag.
    loops: int = 0
    duration_s: float = 0.0
    message_counts: dict[str, int] = field(default_factory=dict)
    # True when stop_event ended the replay early.
    stopped: bool = False


def replay_bag(
    path: str | Path,
    *,
    rate: float = 1.0,
    loop: bool = False,
    topics: Sequence[str] | None = None,
    image_qos: ImageQos | str = ImageQos.RELIABLE,
    wait_for_subscribers_s: float = 0.0,
    stop_event: threading.Event | None = None,
    node_name: str = "surfel_bag_replay",
) -> ReplaySummary:
    """Publish the messages of the bag PATH at their recorded timing; return what was sent.

    It runs in its own rclpy context without signal handlers, so it can run beside other
    rclpy code in one process; Ctrl-C raises KeyboardInterrupt as usual after the node
    is shut down cleanly.

    Args:
        path: the bag directory (or a bare .mcap / .db3 file).
        rate: playback speed factor; 2.0 plays twice as fast.
        loop: start again at the end until stopped.
        topics: publish only these topics (default: all).
        image_qos: ``"reliable"`` or ``"sensor-data"`` for sensor_msgs topics.
        wait_for_subscribers_s: before publishing, wait up to this long until every
            topic has a subscriber, so that the first messages do not go out before
            discovery has matched them; after the wait it publishes regardless.
        stop_event: set it from another thread to stop the replay.
        node_name: name of the publishing node.

    Raises:
        FileNotFoundError: PATH does not exist.
        ValueError: a non-positive rate, an unknown topic or QoS name.
        ReplayError: rclpy or a message package cannot be imported, or the bag is unreadable.
    """
    from rosbags.rosbag2 import Reader

    path = Path(path).expanduser()
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"invalid rate {rate}: use a factor > 0 (1.0 = recorded speed, 2.0 = twice as fast)")
    if not (math.isfinite(wait_for_subscribers_s) and wait_for_subscribers_s >= 0):
        raise ValueError(f"invalid wait {wait_for_subscribers_s} s: use seconds >= 0")
    image_qos = _parse_image_qos(image_qos)
    if not path.exists():
        raise FileNotFoundError(
            f"bag not found: {path}; pass the bag directory (the folder holding metadata.yaml)"
        )
    rclpy = _import_rclpy()

    try:
        reader = Reader(path)
        reader.open()
    except Exception as error:  # rosbags raises several unrelated types for unreadable bags
        raise ReplayError(f"cannot open bag {path}: {error}") from error
    try:
        connections = _select_connections(reader.connections, topics, path)
        message_classes = {c.topic: _message_class(c.msgtype) for c in connections}
        return _publish(
            rclpy, reader, connections, message_classes, rate, loop, image_qos,
            wait_for_subscribers_s, stop_event or threading.Event(), node_name,
        )
    finally:
        reader.close()


def _publish(
    rclpy: Any,
    reader: Any,
    connections: list[Any],
    message_classes: dict[str, type],
    rate: float,
    loop: bool,
    image_qos: ImageQos,
    wait_for_subscribers_s: float,
    stop_event: threading.Event,
    node_name: str,
) -> ReplaySummary:
    from rclpy.duration import Duration
    from rclpy.signals import SignalHandlerOptions

    context = rclpy.Context()
    rclpy.init(context=context, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    summary = ReplaySummary(message_counts={c.topic: 0 for c in connections})
    started = time.monotonic()
    try:
        # Publishers, one per topic, with the QoS logged for the user.
        node = rclpy.create_node(node_name, context=context)
        publishers = {}
        for connection in connections:
            if connection.topic in publishers:
                continue  # one publisher per topic, however many connections recorded it
            qos = _qos_for(connection, image_qos)
            publishers[connection.topic] = node.create_publisher(
                message_classes[connection.topic], connection.topic, qos.profile
            )
            logger.info(
                "publishing %s (%s) with %s QoS", connection.topic, connection.msgtype, qos.description
            )
        _wait_for_subscribers(publishers, wait_for_subscribers_s, stop_event)

        # Messages at their bag time / rate after the start of each pass.
        while not stop_event.is_set():
            pass_start_wall = time.monotonic()
            first_bag_ns = None
            for connection, bag_ns, raw in reader.messages(connections):
                first_bag_ns = bag_ns if first_bag_ns is None else first_bag_ns
                due = pass_start_wall + (bag_ns - first_bag_ns) * 1e-9 / rate
                if not _sleep_until(due, stop_event):
                    break
                publishers[connection.topic].publish(raw if isinstance(raw, bytes) else bytes(raw))
                summary.messages += 1
                summary.message_counts[connection.topic] += 1
            else:
                summary.loops += 1
                if loop and first_bag_ns is not None:
                    continue
                break
        summary.stopped = stop_event.is_set()

        # Reliable subscribers get the last messages before the node goes away.
        for topic, publisher in publishers.items():
            if not publisher.wait_for_all_acked(Duration(seconds=ACK_TIMEOUT_S)):
                logger.warning("not every subscriber of %s acknowledged the last messages", topic)
    finally:
        summary.duration_s = time.monotonic() - started
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown(context=context)

    logger.info(
        "replayed %d messages in %.1f s (%d complete passes)%s",
        summary.messages, summary.duration_s, summary.loops, ", stopped" if summary.stopped else "",
    )
    return summary


def _import_rclpy() -> Any:
    try:
        import rclpy
    except ImportError as error:
        raise ReplayError(
            f"replay needs ROS 2's rclpy, which cannot be imported ({error}): source ROS 2 Jazzy "
            "(source /opt/ros/jazzy/setup.bash) or pip install the ROS wheels (requirements/ros.txt)"
        ) from error
    return rclpy


def _message_class(msgtype: str) -> type:
    """Return the rclpy message class of a type name such as "sensor_msgs/msg/Image"."""
    package, _, name = msgtype.rpartition("/")
    module_name = package.replace("/", ".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        pkg = package.split("/", 1)[0]
        raise ReplayError(
            f"cannot publish {msgtype}: its Python message package {pkg} is not importable ({error}); "
            f"install it (ros-jazzy-{pkg.replace('_', '-')}) or replay other --topics"
        ) from error


def _select_connections(connections: list[Any], topics: Sequence[str] | None, path: Path) -> list[Any]:
    available = sorted({c.topic for c in connections})
    if not topics:
        return list(connections)
    unknown = [t for t in topics if t not in available]
    if unknown:
        raise ValueError(
            f"bag {path} has no topic {', '.join(unknown)}: choose --topics from {' '.join(available)}"
        )
    return [c for c in connections if c.topic in set(topics)]


def _parse_image_qos(image_qos: ImageQos | str) -> ImageQos:
    try:
        return ImageQos(image_qos)
    except ValueError:
        choices = ", ".join(q.value for q in ImageQos)
        raise ValueError(f"unknown image QoS {image_qos!r}: use one of {choices}") from None


def _qos_for(connection: Any, image_qos: ImageQos) -> _TopicQos:
    """Return the publisher QoS of a topic and a short description for the log."""
    from rclpy.qos import (
        DurabilityPolicy,
        HistoryPolicy,
        QoSProfile,
        ReliabilityPolicy,
        qos_profile_sensor_data,
    )
    from rosbags.interfaces import QosDurability, QosReliability

    if image_qos is ImageQos.SENSOR_DATA and connection.msgtype.startswith("sensor_msgs/"):
        return _TopicQos(qos_profile_sensor_data, "sensor-data (best effort)")

    # As ros2 bag play: reliable unless a recorded publisher was best effort, transient
    # local only when every recorded publisher was.
    offered = list(getattr(connection.ext, "offered_qos_profiles", None) or [])
    best_effort = any(q.reliability == QosReliability.BEST_EFFORT for q in offered)
    transient_local = bool(offered) and all(q.durability == QosDurability.TRANSIENT_LOCAL for q in offered)
    qos = QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=QUEUE_DEPTH,
        reliability=ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if transient_local else DurabilityPolicy.VOLATILE,
    )
    reliability_name = "best effort" if best_effort else "reliable"
    durability_name = "transient local" if transient_local else "volatile"
    return _TopicQos(qos, f"{reliability_name}, {durability_name}")


def _wait_for_subscribers(publishers: dict[str, Any], timeout_s: float, stop_event: threading.Event) -> None:
    if timeout_s <= 0:
        return
    deadline = time.monotonic() + timeout_s
    waiting = list(publishers)
    while waiting and time.monotonic() < deadline and not stop_event.is_set():
        waiting = [t for t in waiting if publishers[t].get_subscription_count() == 0]
        if waiting:
            time.sleep(_SLEEP_SLICE_S)
    if waiting:
        logger.warning("no subscriber after %.1f s on %s; publishing anyway", timeout_s, ", ".join(waiting))


def _sleep_until(due_monotonic: float, stop_event: threading.Event) -> bool:
    """Sleep until DUE_MONOTONIC; return False when stop_event was set meanwhile."""
    while True:
        if stop_event.is_set():
            return False
        remaining = due_monotonic - time.monotonic()
        if remaining <= 0:
            return True
        stop_event.wait(min(remaining, _SLEEP_SLICE_S))
