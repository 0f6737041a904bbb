"""End to end: a KITTI bag replayed into surfel_mapping_node gives the offline map of that bag.

Real rclpy with Fast DDS on loopback, a real bag written by ``surfel-map convert`` and
replayed by ``bag_replay.replay_bag``; the reference is the offline pipeline on the same
bag (``surfel-map run BAG --format bag``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy and the ROS 2 message packages are needed")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import PointCloud2  # noqa: E402

from surfel_mapping_node import topics  # noqa: E402
from surfel_mapping_node.bag_replay import replay_bag  # noqa: E402
from surfel_mapping_node.config import MapperConfig, preset_for_format  # noqa: E402
from surfel_mapping_node.datasets.rosbag import BagDataset  # noqa: E402
from surfel_mapping_node.node import SurfelMappingNode  # noqa: E402
from surfel_mapping_node.pipeline import run_pipeline, select_indices  # noqa: E402
from surfel_mapping_node.ply_io import read_surfel_ply  # noqa: E402

FRAMES = 6
# Seconds between replayed frames: long enough for stereo matching and mapping of one
# 1241×376 pair on a busy 2-core machine, so that the node fuses every frame.
FRAME_PERIOD_S = 4.0
DOMAIN_ID = 201 + os.getpid() % 30


@pytest.fixture
def ros_env(monkeypatch):
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    monkeypatch.setenv("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    monkeypatch.setenv("ROS_DOMAIN_ID", str(DOMAIN_ID))


@pytest.fixture
def kitti_bag(kitti_dir: Path, tmp_path: Path) -> Path:
    bag = tmp_path / "kitti_bag"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "surfel_mapping_node.cli",
            "convert",
            str(kitti_dir),
            "--format",
            "kitti",
            "--max-frames",
            str(FRAMES),
            "--out",
            str(bag),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    return bag


def kitti_node_parameters(save_path: Path) -> list[Parameter]:
    values = {
        "input_mode": "stereo",
        "image_qos": "reliable",
        "publish_rate": 5.0,
        "save_path": str(save_path),
    }
    for section, options in preset_for_format("kitti").items():
        values.update({f"{section}.{name}": value for name, value in options.items()})
    return [Parameter(name, value=value) for name, value in values.items()]


def remaps() -> list[str]:
    names = topics.DEFAULT_TOPICS
    pairs = {
        "left/image_rect": names.left_image,
        "right/image_rect": names.right_image,
        "left/camera_info": names.left_camera_info,
        "right/camera_info": names.right_camera_info,
        "pose": names.pose,
        "keyframes": names.keyframes,
    }
    arguments = ["--ros-args"]
    for name, target in pairs.items():
        arguments += ["-r", f"{name}:={target}"]
    return arguments


def test_replayed_kitti_bag_maps_like_offline_run(ros_env, kitti_bag: Path, tmp_path: Path):
    offline = run_pipeline(
        BagDataset(kitti_bag), MapperConfig.from_dict(preset_for_format("kitti")), select_indices(FRAMES)
    ).mapper.cloud()

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN_ID)
    node = SurfelMappingNode(
        context=context, parameter_overrides=kitti_node_parameters(tmp_path / "map.ply"), cli_args=remaps()
    )
    map_sizes: list[int] = []
    probe = rclpy.create_node("map_probe", context=context)
    probe.create_subscription(
        PointCloud2, "/surfel_mapping_node/map", lambda m: map_sizes.append(m.width), 10
    )
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    executor.add_node(probe)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    try:
        summary = replay_bag(kitti_bag, rate=0.1 / FRAME_PERIOD_S, wait_for_subscribers_s=20.0)
        deadline = time.monotonic() + 60.0
        while node.counters()["frames_processed"] < FRAMES and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # one more ~/map publication after the last frame
        saved = node.save_map()
    finally:
        executor.shutdown()
        node.destroy_node()
        probe.destroy_node()
        rclpy.shutdown(context=context)

    assert summary.messages > 0
    assert node.counters()["frames_processed"] == FRAMES
    assert saved.success, saved.message
    assert len(map_sizes) >= 2
    assert map_sizes == sorted(map_sizes)
    assert map_sizes[-1] > map_sizes[0]
    online = read_surfel_ply(tmp_path / "map.ply")
    assert len(online.position_m) == len(offline.position_m)
    np.testing.assert_allclose(online.position_m, offline.position_m, atol=1e-4)
    np.testing.assert_array_equal(online.color_rgb, offline.color_rgb)
