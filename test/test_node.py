"""The mapping node with real rclpy on loopback: maps from 7-Scenes and KITTI, loop
closure, saving, bad input and invalid parameters.

The node and a test client run in one process, on an executor thread, in their own
ROS context on a domain chosen per run, with discovery limited to this host.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from scipy.spatial import cKDTree

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
DOMAIN_ID = 1 + os.getpid() % 100

rclpy = pytest.importorskip("rclpy", reason="rclpy and the ROS 2 message packages are not installed")

from geometry_msgs.msg import PoseStamped  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from nav_msgs.msg import Path as PathMsg  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from visualization_msgs.msg import Marker  # noqa: E402

from surfel_mapping_node import ros_conversions as conv  # noqa: E402
from surfel_mapping_node.node import SurfelMappingNode  # noqa: E402
from surfel_mapping_node.node_parameters import NodeParameterError  # noqa: E402
from surfel_mapping_node.ply_io import read_surfel_ply  # noqa: E402
from surfel_mapping_node.stereo import stereo_depth  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.slow]

RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)
FRAME_PERIOD_NS = 33_333_333  # 7-Scenes ran at 30 Hz
FIRST_STAMP_NS = 1_000_000_000


class NodeHarness:
    """The node under test plus a client node, spun in a thread as the node's main spins it."""

    def __init__(self, parameters: dict[str, Any], stereo: bool = False) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=DOMAIN_ID)
        overrides = [Parameter(name, value=value) for name, value in parameters.items()]
        try:
            self.node = SurfelMappingNode(parameter_overrides=overrides, context=self.context)
        except Exception:
            rclpy.shutdown(context=self.context)
            raise
        self.client = rclpy.create_node("surfel_test_client", context=self.context)

        # Publishers on the node's default (relative, unremapped) topic names.
        topics = (
            {"left": "/left/image_rect", "right": "/right/image_rect"}
            if stereo
            else {"image": "/image", "depth": "/depth"}
        )
        self.image_pubs = {
            name: self.client.create_publisher(Image, topic, RELIABLE) for name, topic in topics.items()
        }
        info_topics = (
            {"left": "/left/camera_info", "right": "/right/camera_info"}
            if stereo
            else {"image": "/camera_info"}
        )
        self.info_pubs = {
            name: self.client.create_publisher(CameraInfo, t, RELIABLE) for name, t in info_topics.items()
        }
        self.odometry = parameters.get("pose_type") == "odometry"
        self.pose_pub = self.client.create_publisher(
            Odometry if self.odometry else PoseStamped, "/pose", RELIABLE
        )
        self.path_pub = self.client.create_publisher(PathMsg, "/keyframes", RELIABLE)

        self.maps: list[PointCloud2] = []
        self.meshes: list[Marker] = []
        self.paths: list[PathMsg] = []
        self.client.create_subscription(PointCloud2, "/surfel_mapping_node/map", self.maps.append, LATCHED)
        self.client.create_subscription(
            PathMsg, "/surfel_mapping_node/keyframe_path", self.paths.append, LATCHED
        )
        self.client.create_subscription(Marker, "/surfel_mapping_node/map_mesh", self.meshes.append, LATCHED)
        self.save_client = self.client.create_client(Trigger, "/surfel_mapping_node/save_map")

        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.client)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        publishers = [*self.image_pubs.values(), *self.info_pubs.values(), self.pose_pub, self.path_pub]
        assert self.wait_for(lambda: all(p.get_subscription_count() > 0 for p in publishers)), "no discovery"

    def close(self) -> None:
        self.executor.shutdown()
        self.thread.join(timeout=10)
        self.node.destroy_node()
        self.client.destroy_node()
        rclpy.shutdown(context=self.context)

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()

    def counters(self) -> dict[str, Any]:
        return self.node.counters()

    def dropped(self, reason: str) -> int:
        return self.counters()["dropped"].get(reason, 0)

    def publish_frame(
        self, images: dict[str, Image], T_world_camera: np.ndarray | None, stamp_ns: int
    ) -> None:
        for name, msg in images.items():
            msg.header.stamp = conv.ns_to_stamp(stamp_ns)
            self.image_pubs[name].publish(msg)
        if T_world_camera is not None:
            self.publish_pose(T_world_camera, stamp_ns)

    def publish_pose(self, T_world_camera: np.ndarray, stamp_ns: int) -> None:
        if self.odometry:
            odometry = Odometry(header=conv.make_header(stamp_ns, "map"), child_frame_id="base_link")
            odometry.pose.pose = conv.matrix_to_pose(T_world_camera)
            self.pose_pub.publish(odometry)
            return
        pose = PoseStamped(header=conv.make_header(stamp_ns, "map"))
        pose.pose = conv.matrix_to_pose(T_world_camera)
        self.pose_pub.publish(pose)

    def publish_path(self, poses: dict[int, np.ndarray]) -> None:
        self.path_pub.publish(conv.poses_to_path(poses, "map", max(poses, default=0)))

    def process(self, images: dict[str, Image], T_world_camera: np.ndarray, stamp_ns: int) -> None:
        """Publish one frame and wait until the node integrated it."""
        before = self.counters()
        self.publish_frame(images, T_world_camera, stamp_ns)

        # The first frame compiles the numba kernels unless they are cached: allow minutes.
        def handled() -> bool:
            now = self.counters()
            return now["frames_processed"] > before["frames_processed"] or now["dropped"] != before["dropped"]

        self.wait_for(handled, 180)
        assert self.counters()["frames_processed"] > before["frames_processed"], (
            f"frame {stamp_ns} was not processed: {self.counters()}"
        )

    def current(self, messages: list) -> Any:
        """Wait until the node published its current map; return that message of ``messages``.

        ~/map, ~/map_mesh and ~/keyframe_path of one publication share a header stamp.
        """
        assert self.wait_for(lambda: self.counters()["map_published"], 10), "the map was not published"
        stamp_ns = self.counters()["last_publish_stamp_ns"]
        assert self.wait_for(
            lambda: messages and conv.stamp_to_ns(messages[-1].header.stamp) == stamp_ns, 10
        ), "the last publication did not arrive"
        return messages[-1]

    def save(self) -> Trigger.Response:
        assert self.save_client.wait_for_service(timeout_sec=10)
        future = self.save_client.call_async(Trigger.Request())
        assert self.wait_for(future.done, 30), "save_map did not answer"
        return future.result()


@pytest.fixture
def make_harness():
    harnesses = []

    def make(parameters: dict[str, Any], stereo: bool = False) -> NodeHarness:
        harness = NodeHarness(parameters, stereo)
        harnesses.append(harness)
        return harness

    yield make
    for harness in harnesses:
        harness.close()


def camera_info(width: int, height: int, fx: float, cx: float, cy: float, tx: float = 0.0) -> CameraInfo:
    info = CameraInfo(width=width, height=height, distortion_model="plumb_bob")
    info.header.frame_id = "camera"
    info.k = [fx, 0.0, cx, 0.0, fx, cy, 0.0, 0.0, 1.0]
    info.p = [fx, 0.0, cx, tx, 0.0, fx, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return info


# --- 7-Scenes ------------------------------------------------------------------------


def load_seven_scenes(folder: Path, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (BGR image, uint16 depth in mm, 4×4 camera-to-world pose) of one frame."""
    stem = folder / f"frame-{index:06d}"
    image_bgr = cv2.imread(f"{stem}.color.jpg", cv2.IMREAD_COLOR)
    depth_mm = cv2.imread(f"{stem}.depth.png", cv2.IMREAD_UNCHANGED)
    return image_bgr, depth_mm, np.loadtxt(f"{stem}.pose.txt")


def seven_scenes_messages(image_bgr: np.ndarray, depth_mm: np.ndarray) -> dict[str, Image]:
    return {
        "image": conv.numpy_to_image(image_bgr, "bgr8", 0, "camera"),
        "depth": conv.numpy_to_image(depth_mm, "16UC1", 0, "camera"),
    }


def ground_truth_points(folder: Path, indices: list[int], step_px: int = 4) -> np.ndarray:
    """Back-project the depth of the frames with their true poses: the reference map."""
    v, u = np.mgrid[0:480:step_px, 0:640:step_px]
    points = []
    for index in indices:
        _, depth_mm, T = load_seven_scenes(folder, index)
        depth_m = depth_mm[v, u].astype(np.float64) / 1000.0
        valid = (depth_mm[v, u] > 0) & (depth_mm[v, u] < 65535) & (depth_m < 10.0)
        x = (u[valid] - 320.0) / 585.0 * depth_m[valid]
        y = (v[valid] - 240.0) / 585.0 * depth_m[valid]
        camera_points = np.stack([x, y, depth_m[valid]], axis=1)
        points.append(camera_points @ T[:3, :3].T + T[:3, 3])
    return np.concatenate(points)


def rgbd_parameters(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "image_qos": "reliable",
        "publish_rate": 20.0,
        "log_every_n_frames": 5,
        "save_path": str(tmp_path / "map.ply"),
        **extra,
    }


def test_rgbd_map_grows_and_saves(make_harness, seven_scenes_dir: Path, tmp_path: Path):
    harness = make_harness(rgbd_parameters(tmp_path))
    harness.info_pubs["image"].publish(camera_info(640, 480, 585.0, 320.0, 240.0))
    harness.wait_for(lambda: False, 0.3)

    widths = []
    for index in range(0, 60, 4):
        image_bgr, depth_mm, T = load_seven_scenes(seven_scenes_dir, index)
        harness.process(
            seven_scenes_messages(image_bgr, depth_mm), T, FIRST_STAMP_NS + index * FRAME_PERIOD_NS
        )
        widths.append(harness.current(harness.maps).width)

    assert harness.counters()["frames_processed"] == 15
    assert widths[0] > 0
    assert widths[-1] > 1.5 * widths[0], f"map did not grow: {widths}"
    keyframes = harness.counters()["keyframes"]
    assert keyframes >= 2
    assert len(harness.current(harness.paths).poses) == keyframes
    last_map = harness.current(harness.maps)
    assert np.all(np.isfinite(conv.pointcloud2_to_xyz(last_map)))

    response = harness.save()
    assert response.success, response.message
    saved = read_surfel_ply(response.message)
    assert len(saved) == last_map.width
    assert Path(response.message) == (tmp_path / "map.ply").resolve()


def drift(index: int) -> np.ndarray:
    """A growing world-frame error: 0.15° about z and 3 mm along x per frame index."""
    angle = np.deg2rad(0.15 * index)
    D = np.eye(4)
    D[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    D[0, 3] = 0.003 * index
    return D


def median_distance_m(points: np.ndarray, reference: cKDTree) -> float:
    return float(np.median(reference.query(points)[0]))


def test_loop_closure_removes_drift(make_harness, seven_scenes_dir: Path, tmp_path: Path):
    harness = make_harness(rgbd_parameters(tmp_path))
    harness.info_pubs["image"].publish(camera_info(640, 480, 585.0, 320.0, 240.0))
    indices = list(range(0, 90, 3))
    true_poses = {}
    for index in indices:
        image_bgr, depth_mm, T = load_seven_scenes(seven_scenes_dir, index)
        stamp_ns = FIRST_STAMP_NS + index * FRAME_PERIOD_NS
        true_poses[stamp_ns] = T
        harness.process(seven_scenes_messages(image_bgr, depth_mm), drift(index) @ T, stamp_ns)
    reference = cKDTree(ground_truth_points(seven_scenes_dir, indices))
    drifted_map = harness.current(harness.maps)
    drifted = median_distance_m(conv.pointcloud2_to_xyz(drifted_map), reference)

    # The SLAM system closes the loop: its keyframe path now contains the true poses.
    harness.publish_path(true_poses)
    assert harness.wait_for(lambda: harness.counters()["keyframe_updates"] == 1, 20)
    corrected_map = harness.current(harness.maps)
    corrected = median_distance_m(conv.pointcloud2_to_xyz(corrected_map), reference)

    # Measured on these 30 frames: 72 mm before, 12 mm after. The correction is rigid per
    # keyframe, so surfels fused from frames with different drift keep part of the error.
    print(
        f"median distance to the true map: drifted {drifted * 1e3:.1f} mm, corrected {corrected * 1e3:.1f} mm"
    )
    assert drifted > 0.04
    assert corrected < 0.25 * drifted
    # The published keyframe path follows the correction.
    path_poses = conv.path_to_poses(harness.current(harness.paths)).poses
    assert len(path_poses) == harness.counters()["keyframes"]
    # The 7-Scenes rotations are orthonormal to about 1e-4 and go through a quaternion.
    for stamp_ns, T in path_poses.items():
        np.testing.assert_allclose(T, true_poses[stamp_ns], atol=2e-4)


# --- KITTI stereo --------------------------------------------------------------------


def test_stereo_mode_maps_kitti(make_harness, kitti_dir: Path, tmp_path: Path):
    sequence = kitti_dir / "sequences" / "00"
    projections = {
        line.split(":")[0]: np.array(line.split(":")[1].split(), dtype=np.float64)
        for line in (sequence / "calib.txt").read_text().splitlines()
        if line.strip()
    }
    poses = np.loadtxt(kitti_dir / "poses" / "00.txt").reshape(-1, 3, 4)
    P0, P1 = projections["P0"], projections["P1"]
    harness = make_harness(
        {
            "input_mode": "stereo",
            "image_qos": "reliable",
            "publish_rate": 20.0,
            "depth.max_depth_m": 30.0,
            "fusion.far_m": 30.0,
            "fusion.depth_tolerance_per_m2": 0.011,
            "surfels.inlier_range_m": 0.4,
            "superpixels.huber_delta_m": 0.4,
        },
        stereo=True,
    )
    harness.info_pubs["left"].publish(camera_info(1241, 376, P0[0], P0[2], P0[6], P0[3]))
    harness.info_pubs["right"].publish(camera_info(1241, 376, P1[0], P1[2], P1[6], P1[3]))
    harness.wait_for(lambda: False, 0.3)

    for index in range(3):
        left = cv2.imread(str(sequence / "image_0" / f"{index:06d}.png"), cv2.IMREAD_GRAYSCALE)
        right = cv2.imread(str(sequence / "image_1" / f"{index:06d}.png"), cv2.IMREAD_GRAYSCALE)
        T = np.vstack([poses[index], [0.0, 0.0, 0.0, 1.0]])
        messages = {
            "left": conv.numpy_to_image(left, "mono8", 0, "left"),
            "right": conv.numpy_to_image(right, "mono8", 0, "right"),
        }
        harness.process(messages, T, FIRST_STAMP_NS + index * 100_000_000)

    cloud = harness.current(harness.maps)
    assert cloud.width > 1000
    xyz = conv.pointcloud2_to_xyz(cloud)

    # Depth computed outside the node from the calibration's baseline must have the scale
    # of the map's depths. The first camera frame is the map frame; the car drives 2 m along z.
    left = cv2.imread(str(sequence / "image_0" / "000000.png"), cv2.IMREAD_GRAYSCALE)
    right = cv2.imread(str(sequence / "image_1" / "000000.png"), cv2.IMREAD_GRAYSCALE)
    depth_m = stereo_depth(left, right, P0[0], -P1[3] / P1[0], min_depth_m=0.1, max_depth_m=30.0)
    # Surfel centres lie on fitted planes, so a few end up slightly beyond max_depth_m.
    assert np.percentile(xyz[:, 2], 99) < 30.0 + 2.5
    np.testing.assert_allclose(np.median(xyz[:, 2]), np.nanmedian(depth_m), rtol=0.25)


# --- bad input ---------------------------------------------------------------------


def synthetic_frame(seed: int, width: int = 96, height: int = 72) -> tuple[np.ndarray, np.ndarray]:
    """A textured RGB image and a slanted plane 1.5-2.5 m away (uint16 mm)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    depth_mm = np.tile(np.linspace(1500, 2500, width, dtype=np.float64), (height, 1)).astype(np.uint16)
    return image, depth_mm


def test_bad_input_dropped_and_counted(make_harness, tmp_path: Path):
    harness = make_harness(rgbd_parameters(tmp_path, log_every_n_frames=1))
    image, depth_mm = synthetic_frame(1)
    good = {
        "image": conv.numpy_to_image(image, "rgb8", 0, "c"),
        "depth": conv.numpy_to_image(depth_mm, "16UC1", 0, "c"),
    }
    identity = np.eye(4)
    stamp = iter(range(FIRST_STAMP_NS, 10**12, 100_000_000))

    # Save before any frame: a valid empty PLY.
    response = harness.save()
    assert response.success, response.message
    assert len(read_surfel_ply(response.message)) == 0

    # Frames before any camera_info are dropped.
    harness.publish_frame(good, identity, next(stamp))
    assert harness.wait_for(lambda: harness.dropped("missing_camera_info") == 1)
    harness.info_pubs["image"].publish(camera_info(96, 72, 80.0, 47.5, 35.5))
    harness.wait_for(lambda: False, 0.3)

    # Unsupported encodings of the image and of the depth.
    yuv = conv.numpy_to_image(image, "rgb8", 0, "c")
    yuv.encoding = "yuv422"
    harness.publish_frame({"image": yuv}, None, next(stamp))
    assert harness.wait_for(lambda: harness.dropped("bad_image_message") == 1)
    harness.publish_frame({"depth": conv.numpy_to_image(image, "rgb8", 0, "c")}, None, next(stamp))
    assert harness.wait_for(lambda: harness.dropped("bad_depth_message") == 1)

    # Depth of another size than the camera.
    small_depth = conv.numpy_to_image(depth_mm[::2, ::2].copy(), "16UC1", 0, "c")
    harness.publish_frame({"image": good["image"], "depth": small_depth}, identity, next(stamp))
    assert harness.wait_for(lambda: harness.dropped("size_mismatch") == 1)

    # NaN pose.
    nan_pose = PoseStamped(header=conv.make_header(next(stamp), "map"))
    nan_pose.pose.position.x = float("nan")
    nan_pose.pose.orientation.w = 1.0
    harness.pose_pub.publish(nan_pose)
    assert harness.wait_for(lambda: harness.dropped("invalid_pose") == 1)

    # A pose far from every image: the image is given up, not waited for.
    far_stamp = next(stamp)
    harness.publish_frame(good, None, far_stamp)
    harness.publish_pose(identity, far_stamp + 2_000_000_000)
    assert harness.wait_for(lambda: harness.counters()["sync_dropped"]["unmatched"]["image"] >= 1)

    # A pose older than the previous one.
    harness.publish_pose(identity, far_stamp)
    assert harness.wait_for(lambda: harness.counters()["sync_dropped"]["out_of_order"]["pose"] == 1)

    # Keyframe paths: empty, with unknown stamps, then shrinking.
    harness.publish_path({})
    harness.publish_path({1: identity, 2: identity})
    assert harness.wait_for(lambda: harness.counters()["unknown_keyframe_stamps"] == 2)
    harness.publish_path({1: identity})
    assert harness.wait_for(lambda: harness.counters()["unknown_keyframe_stamps"] == 3)

    # Read-only and invalid runtime changes are refused with a reason; valid ones accepted.
    refused = harness.node.set_parameters([Parameter("input_mode", value="stereo")])[0]
    assert not refused.successful
    assert "read at start-up" in refused.reason
    refused = harness.node.set_parameters([Parameter("mesh_segments", value=2)])[0]
    assert not refused.successful
    assert "mesh_segments out of range" in refused.reason

    # Save to a path whose parent is a file: a clear failure, no crash.
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    accepted = harness.node.set_parameters([Parameter("save_path", value=str(blocker / "map.ply"))])[0]
    assert accepted.successful
    response = harness.save()
    assert not response.success
    assert f"cannot save the map to {blocker / 'map.ply'}: {blocker} is a file" in response.message

    # The node still maps valid frames, and has counted everything above.
    harness.process(good, identity, next(stamp) + 2_000_000_000)
    assert harness.current(harness.maps).width > 0
    counters = harness.counters()
    assert counters["frames_processed"] == 1
    assert counters["dropped"] == {
        "missing_camera_info": 1,
        "bad_image_message": 1,
        "bad_depth_message": 1,
        "size_mismatch": 1,
        "invalid_pose": 1,
    }


def test_silent_input_is_reported(make_harness, tmp_path: Path):
    harness = make_harness(rgbd_parameters(tmp_path))
    harness.info_pubs["image"].publish(camera_info(96, 72, 80.0, 47.5, 35.5))
    _, depth_mm = synthetic_frame(2)

    # Depth and pose arrive but the image never does, as with a wrong remapping.
    def depth_and_pose_only() -> bool:
        stamp_ns = time.time_ns()
        harness.publish_frame({"depth": conv.numpy_to_image(depth_mm, "16UC1", 0, "c")}, np.eye(4), stamp_ns)
        return harness.counters()["silent_inputs"] != []

    assert harness.wait_for(depth_and_pose_only, 30), "the silent image input was not reported"
    assert harness.counters()["silent_inputs"] == ["image"]
    assert harness.counters()["frames_processed"] == 0


def test_camera_info_just_after_the_frame_is_used(make_harness, tmp_path: Path):
    harness = make_harness(rgbd_parameters(tmp_path))
    image, depth_mm = synthetic_frame(2)
    messages = {
        "image": conv.numpy_to_image(image, "rgb8", 0, "c"),
        "depth": conv.numpy_to_image(depth_mm, "16UC1", 0, "c"),
    }

    # A publisher's first camera_info may trail its first images by a few milliseconds.
    assert harness.wait_for(lambda: harness.counters()["kernels_ready"], 120)
    harness.publish_frame(messages, np.eye(4), FIRST_STAMP_NS)
    time.sleep(0.1)
    harness.info_pubs["image"].publish(camera_info(96, 72, 80.0, 47.5, 35.5))

    assert harness.wait_for(lambda: harness.counters()["frames_processed"] == 1, 30)
    assert harness.dropped("missing_camera_info") == 0


def test_empty_map_keeps_existing_file(make_harness, tmp_path: Path):
    target = tmp_path / "map.ply"
    target.write_bytes(b"an earlier map")
    harness = make_harness(rgbd_parameters(tmp_path))

    response = harness.save()

    assert not response.success
    assert response.message.startswith(f"the map is empty: {target} was not overwritten")
    assert target.read_bytes() == b"an earlier map"


def test_unknown_keyframe_stamps_change_nothing(make_harness, tmp_path: Path):
    harness = make_harness(rgbd_parameters(tmp_path, publish_mesh=True, mesh_segments=5))
    harness.info_pubs["image"].publish(camera_info(96, 72, 80.0, 47.5, 35.5))
    harness.wait_for(lambda: False, 0.3)
    image, depth_mm = synthetic_frame(2)
    messages = {
        "image": conv.numpy_to_image(image, "rgb8", 0, "c"),
        "depth": conv.numpy_to_image(depth_mm, "16UC1", 0, "c"),
    }
    harness.process(messages, np.eye(4), FIRST_STAMP_NS)
    before = conv.pointcloud2_to_xyz(harness.current(harness.maps))
    assert len(before) > 0
    mesh = harness.current(harness.meshes)
    assert len(mesh.points) == 5 * 3 * len(before)

    moved = np.eye(4)
    moved[0, 3] = 1.0
    harness.publish_path({FIRST_STAMP_NS + 500_000_000: moved, FIRST_STAMP_NS + 700_000_000: moved})
    assert harness.wait_for(lambda: harness.counters()["unknown_keyframe_stamps"] == 2, 10)
    harness.publish_path({FIRST_STAMP_NS + 500_000_000: moved})  # shrinking
    harness.publish_path({})  # empty
    time.sleep(0.3)

    assert harness.counters()["keyframe_updates"] == 0
    np.testing.assert_allclose(conv.pointcloud2_to_xyz(harness.current(harness.maps)), before, atol=0)


def test_depth_only_mode_with_body_odometry(make_harness, tmp_path: Path):
    # Camera 0.2 m ahead of the body, rotated 90° about the body z axis.
    s = np.sqrt(0.5)
    T_body_camera = np.eye(4)
    T_body_camera[:3, :3] = [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    T_body_camera[:3, 3] = [0.2, 0.0, 0.0]
    harness = make_harness(
        rgbd_parameters(
            tmp_path,
            input_mode="depth_only",
            pose_type="odometry",
            # Small images: the default best-effort image QoS loses nothing on loopback.
            image_qos="sensor_data",
            T_body_camera=[0.2, 0.0, 0.0, 0.0, 0.0, s, s],
        )
    )
    harness.info_pubs["image"].publish(camera_info(96, 72, 80.0, 47.5, 35.5))
    harness.wait_for(lambda: False, 0.3)
    image, depth_mm = synthetic_frame(3)
    gray = image[..., 0].copy()
    T_map_camera = np.eye(4)
    T_map_camera[:3, 3] = [1.0, 2.0, 0.5]
    T_map_body = T_map_camera @ np.linalg.inv(T_body_camera)

    # A learned depth comes as 32FC1 metres; 16-bit depth is rejected in this mode.
    mm_depth = conv.numpy_to_image(depth_mm, "16UC1", 0, "c")
    harness.publish_frame(
        {"image": conv.numpy_to_image(gray, "mono8", 0, "c"), "depth": mm_depth}, None, FIRST_STAMP_NS
    )
    assert harness.wait_for(lambda: harness.dropped("bad_depth_message") == 1)
    metres = conv.numpy_to_image(depth_mm.astype(np.float32) / 1000.0, "32FC1", 0, "c")
    harness.process(
        {"image": conv.numpy_to_image(gray, "mono8", 0, "c"), "depth": metres},
        T_map_body,
        FIRST_STAMP_NS + 10**8,
    )

    # The keyframe is the camera pose: body pose times T_body_camera.
    (T_keyframe,) = conv.path_to_poses(harness.current(harness.paths)).poses.values()
    np.testing.assert_allclose(T_keyframe, T_map_camera, atol=1e-9)
    # The plane lies 1.5-2.5 m along the camera's optical axis (map z here).
    xyz = conv.pointcloud2_to_xyz(harness.current(harness.maps))
    assert np.all((xyz[:, 2] > 0.5 + 1.4) & (xyz[:, 2] < 0.5 + 2.6))


# --- parameters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("fusion.max_weight", -1.0, r"invalid fusion\.max_weight=-1\.0: it must be > 0"),
        ("sync_tolerance", 5.0, r"invalid parameter sync_tolerance=5\.0: use a double in \[0\.0, 1\.0\]"),
        (
            "input_mode",
            "lidar",
            r"invalid parameter input_mode='lidar': use one of 'rgbd', 'stereo', 'depth_only'",
        ),
        ("publish_rate", 2, r"invalid parameter publish_rate=2: use a double"),
        ("T_body_camera", [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], r"T_body_camera=.*invalid quaternion"),
        ("depth.min_depth_m", 20.0, r"invalid depth range \[20\.0, 10\.0\] m"),
        ("fusion.max_wieght", 3.0, r"unknown parameter 'fusion\.max_wieght': check its spelling"),
    ],
)
def test_invalid_parameter_stops_the_node(name: str, value: Any, match: str):
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN_ID)
    try:
        with pytest.raises(NodeParameterError, match=match):
            SurfelMappingNode(parameter_overrides=[Parameter(name, value=value)], context=context)
    finally:
        rclpy.shutdown(context=context)


def test_executable_invalid_parameter_exits():
    env = dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN_ID))
    result = subprocess.run(
        [sys.executable, "-m", "surfel_mapping_node.node", "--ros-args", "-p", "fusion.max_weight:=0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert (
        "not starting: invalid mapper parameter: invalid fusion.max_weight=0.0: it must be > 0"
        in result.stderr
    )


def test_help_lists_every_parameter():
    command = [sys.executable, "-m", "surfel_mapping_node.node", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: surfel_mapping_node")
    for name in ("input_mode", "save_path", "fusion.max_weight", "superpixels.grid_px"):
        assert f"\n  {name} (default " in result.stdout


def _ignore_sigint() -> None:
    # What a non-interactive shell does to the commands it starts in the background.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(
    ("stop_signal", "start_in_background"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["sigint", "sigterm", "sigint_after_background_start"],
)
def test_stop_signal_saves_map(tmp_path: Path, stop_signal: int, start_in_background: bool):
    target = tmp_path / "on_exit" / "map.ply"
    env = dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN_ID))
    command = [sys.executable, "-m", "surfel_mapping_node.node", "--ros-args", "-p", "save_on_shutdown:=true"]
    process = subprocess.Popen(
        [*command, "-p", f"save_path:={target}"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigint if start_in_background else None,
    )
    try:
        for line in process.stderr:
            if "started; Ctrl-C or SIGTERM stops the node" in line:
                break
        process.send_signal(stop_signal)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 0, stderr
    assert len(read_surfel_ply(target)) == 0
    assert f"saved 0 surfels to {target}" in stderr
    assert "totals: 0 frames fused, 0 skipped while busy" in stderr
