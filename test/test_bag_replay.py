"""Bag replay into a live ROS 2 graph over loopback: every message arrives with its recorded stamp."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rosbags.rosbag2 import Reader
from rosbags.typesys import Stores, get_typestore

from surfel_mapping_node import topics
from surfel_mapping_node.bag_replay import replay_bag
from surfel_mapping_node.bag_writer import write_bag
from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.datasets.base import Frame

rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy is not importable: replay needs it")
from geometry_msgs.msg import PoseStamped  # noqa: E402
from nav_msgs.msg import Path as PathMsg  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

TYPESTORE = get_typestore(Stores.ROS2_JAZZY)
MESSAGE_CLASSES = {
    topics.IMAGE_TOPIC: Image,
    topics.DEPTH_TOPIC: Image,
    topics.CAMERA_INFO_TOPIC: CameraInfo,
    topics.POSE_TOPIC: PoseStamped,
    topics.KEYFRAMES_TOPIC: PathMsg,
}
# One DDS domain per test run, discovery on this machine only.
ROS_ENV = {
    "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
    "ROS_DOMAIN_ID": str(os.getpid() % 100 + 1),
    "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
}
RECEIVE_TIMEOUT_S = 30.0


@pytest.fixture(autouse=True)
def ros_env(monkeypatch):
    for name, value in ROS_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def small_bag(tmp_path) -> Path:
    """A converted RGB-D bag of 6 frames 30 ms apart, 8×6 pixels."""
    rng = np.random.default_rng(11)
    camera = PinholeCamera(8, 6, 10.0, 10.0, 3.5, 2.5)
    frames = []
    for i in range(6):
        T = np.eye(4)
        T[0, 3] = 0.06 * i
        frames.append(
            Frame(
                index=i,
                stamp_ns=1_700_000_000_000_000_000 + i * 30_000_000,
                image=rng.integers(0, 256, (6, 8, 3), dtype=np.uint8),
                camera=camera,
                T_world_camera=T,
                depth_raw=rng.integers(0, 5000, (6, 8), dtype=np.uint16),
            )
        )
    write_bag(frames, tmp_path / "bag")
    return tmp_path / "bag"


def recorded_stamps(bag: Path) -> dict[str, list[int]]:
    """Header stamps per topic, read from the bag with rosbags."""
    stamps: dict[str, list[int]] = {}
    with Reader(bag) as reader:
        for connection, _, raw in reader.messages():
            header = TYPESTORE.deserialize_cdr(raw, connection.msgtype).header
            stamps.setdefault(connection.topic, []).append(header.stamp.sec * 10**9 + header.stamp.nanosec)
    return stamps


class Subscriber:
    """A node in its own rclpy context that records the header stamp of every message."""

    def __init__(self, qos: QoSProfile) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("replay_test_subscriber", context=self.context)
        self.received: dict[str, list[int]] = {topic: [] for topic in MESSAGE_CLASSES}
        self.images: list[Image] = []
        for topic, message_class in MESSAGE_CLASSES.items():
            self.node.create_subscription(
                message_class, topic, lambda m, t=topic: self._on_message(t, m), qos
            )
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)

    def _on_message(self, topic: str, message) -> None:
        self.received[topic].append(message.header.stamp.sec * 10**9 + message.header.stamp.nanosec)
        if topic == topics.IMAGE_TOPIC:
            self.images.append(message)

    def spin_until(self, done, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=0.05)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def replay_in_thread(bag: Path, **options) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = replay_bag(bag, **options)
        except Exception as error:  # reported by the test
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_replay_delivers_all_stamps(small_bag):
    expected = recorded_stamps(small_bag)
    subscriber = Subscriber(QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    try:
        thread, result = replay_in_thread(small_bag, rate=2.0, wait_for_subscribers_s=15.0)
        subscriber.spin_until(lambda: subscriber.received == expected, RECEIVE_TIMEOUT_S)
        thread.join(RECEIVE_TIMEOUT_S)
        images = subscriber.images
    finally:
        subscriber.close()

    assert "error" not in result, result.get("error")
    assert subscriber.received == expected
    summary = result["summary"]
    assert summary.messages == sum(len(v) for v in expected.values()) == 6 * 4 + 3
    assert summary.loops == 1 and not summary.stopped
    # Paced by bag time / rate: 5 gaps of 30 ms at rate 2 last at least 75 ms.
    assert summary.duration_s >= 5 * 0.030 / 2.0
    # The bytes are the recorded ones: the image arrives as written.
    assert (images[0].encoding, images[0].width, images[0].height, images[0].step) == ("rgb8", 8, 6, 24)


def test_replay_topics_loop_until_stopped(small_bag):
    subscriber = Subscriber(QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    stop = threading.Event()
    try:
        thread, result = replay_in_thread(
            small_bag,
            rate=4.0,
            loop=True,
            topics=[topics.POSE_TOPIC],
            wait_for_subscribers_s=15.0,
            stop_event=stop,
        )
        subscriber.spin_until(lambda: len(subscriber.received[topics.POSE_TOPIC]) >= 14, RECEIVE_TIMEOUT_S)
        stop.set()
        thread.join(RECEIVE_TIMEOUT_S)
    finally:
        subscriber.close()

    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary.stopped and summary.loops >= 2
    assert set(summary.message_counts) == {topics.POSE_TOPIC}
    pose_stamps = recorded_stamps(small_bag)[topics.POSE_TOPIC]
    received = subscriber.received[topics.POSE_TOPIC]
    # Each pass repeats the recorded stamps in order; nothing else was published.
    assert received[:12] == pose_stamps * 2
    assert subscriber.received[topics.IMAGE_TOPIC] == []


def test_replay_sensor_data_qos(small_bag):
    subscriber = Subscriber(QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT))
    try:
        thread, result = replay_in_thread(
            small_bag,
            rate=1.0,
            topics=[topics.IMAGE_TOPIC],
            image_qos="sensor-data",
            wait_for_subscribers_s=15.0,
        )
        subscriber.spin_until(lambda: len(subscriber.received[topics.IMAGE_TOPIC]) == 6, RECEIVE_TIMEOUT_S)
        thread.join(RECEIVE_TIMEOUT_S)
    finally:
        subscriber.close()

    assert "error" not in result, result.get("error")
    # Best effort over loopback with 6 tiny images: none is lost in practice.
    assert subscriber.received[topics.IMAGE_TOPIC] == recorded_stamps(small_bag)[topics.IMAGE_TOPIC]


def test_replay_command_ctrl_c(small_bag):
    command = [sys.executable, "-m", "surfel_mapping_node.bag_cli", "replay", str(small_bag), "--loop"]
    process = subprocess.Popen(
        command, env={**os.environ, **ROS_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # Wait until it publishes (its log reports it), then interrupt it as Ctrl-C does.
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "publishing /slam/keyframes" in line:
                break
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = "".join(lines) + rest

    assert process.returncode == 130, stderr
    assert "surfel-map replay: interrupted" in stderr
    assert "Traceback" not in stderr


def test_replay_bad_arguments(small_bag, tmp_path):
    with pytest.raises(ValueError, match="invalid rate 0"):
        replay_bag(small_bag, rate=0)
    with pytest.raises(ValueError, match=r"invalid wait -1\.0 s"):
        replay_bag(small_bag, wait_for_subscribers_s=-1.0)
    with pytest.raises(ValueError, match="unknown image QoS 'fast': use one of reliable, sensor-data"):
        replay_bag(small_bag, image_qos="fast")
    with pytest.raises(FileNotFoundError, match="bag not found"):
        replay_bag(tmp_path / "missing")
    with pytest.raises(ValueError, match="has no topic /tf: choose --topics from /camera/camera_info"):
        replay_bag(small_bag, topics=["/tf"])


def test_replay_command_bad_input(tmp_path, capsys):
    from surfel_mapping_node.bag_cli import main

    code = main(["replay", str(tmp_path / "missing"), "--rate", "2"])

    assert code == 2
    assert "surfel-map replay: error: bag not found" in capsys.readouterr().err
