"""Monocular mapping end to end on 7-Scenes validation frames (240-299): the packaged
depth network's depth fused with ground-truth poses, compared with the map built from
the Kinect depth of the same frames.

Offline: the ROS-free pipeline (surfel_mapping_node.pipeline, mono_demo). With ROS:
the real quantized_inference_node (depth task, committed HAWQ model) and the real
surfel_mapping_node (depth_only) run in one process with a client that publishes the
frames. They use their own ROS context, a domain chosen per run, and discovery limited
to this host.

The network learned frames 0-239 of the same recording, so these distances show that
the pipeline is wired correctly, not how well the network generalizes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from surfel_mapping_node.config import MapperConfig
from surfel_mapping_node.datasets.seven_scenes import SevenScenesDataset
from surfel_mapping_node.mono_demo import (
    DEFAULT_MODEL,
    find_seven_scenes,
    map_distance,
    mono_mapper_config,
    run_mono_comparison,
    run_mono_demo,
)
from surfel_mapping_node.pipeline import NetworkDepthSource, run_pipeline

FRAMES = range(240, 260)
# Measured median distance, monocular map to RGB-D map, frames 240-259, HAWQ model:
# 0.0506 m (1001 surfels, 90th percentile 0.184 m), offline and through the ROS nodes
# alike. The ROS map was identical to the offline map (distance 0.000 m). The bounds
# leave room for onnxruntime and numba builds that round differently, and fail when
# the depth is wired wrongly (e.g. unscaled intrinsics put surfels metres away).
OFFLINE_MEDIAN_BOUND_M = 0.08
ROS_MEDIAN_BOUND_M = 0.08
# The ROS path runs the same engine, image downscaling, mapper options and poses as
# the offline pipeline: its map may differ only by float rounding of the poses
# through quaternions.
ROS_TO_OFFLINE_MEDIAN_BOUND_M = 0.002


@pytest.fixture(scope="module")
def rgbd_reference(seven_scenes_dir: Path):
    """The map built from the Kinect depth of FRAMES, default mapper options."""
    dataset = SevenScenesDataset(seven_scenes_dir)
    return run_pipeline(dataset, MapperConfig(), FRAMES).mapper.cloud()


@pytest.fixture(scope="module")
def offline_mono(seven_scenes_dir: Path):
    """The monocular map of FRAMES from the offline pipeline."""
    dataset = SevenScenesDataset(seven_scenes_dir)
    config = mono_mapper_config()
    source = NetworkDepthSource.load(DEFAULT_MODEL, config)
    return run_pipeline(dataset, config, FRAMES, depth_source=source)


# --- offline ---------------------------------------------------------------------------


def test_offline_mono_map_near_rgbd_map(offline_mono, rgbd_reference):
    cloud = offline_mono.mapper.cloud()

    distance = map_distance(cloud.position_m, rgbd_reference.position_m)

    assert offline_mono.summary()["frames_fused"] == len(FRAMES)
    # The mapper runs at the network's output size: 640 x 480 stretched to 80 x 64, so x
    # scales by 1/8 and y by 2/15, pixel centres kept (c' = (c + 0.5) s - 0.5).
    camera = offline_mono.mapper.camera
    assert (camera.width, camera.height) == (80, 64)
    np.testing.assert_allclose(
        [camera.fx, camera.fy, camera.cx, camera.cy],
        [585 / 8, 585 * 2 / 15, 320.5 / 8 - 0.5, 240.5 * 2 / 15 - 0.5],
        rtol=1e-12,
    )
    assert len(cloud) > 500
    assert distance.median_m < OFFLINE_MEDIAN_BOUND_M, distance


def test_network_depth_at_output_size(seven_scenes_dir: Path):
    dataset = SevenScenesDataset(seven_scenes_dir)
    frame = dataset[250]
    source = NetworkDepthSource.load(DEFAULT_MODEL, mono_mapper_config())
    stages_ms: dict[str, float] = {}

    estimate = source.estimate(frame, stages_ms)

    assert estimate.depth_m.shape == (64, 80)
    assert estimate.depth_m.dtype == np.float32
    assert estimate.camera == frame.camera.scaled(80, 64)
    assert "network_depth" in stages_ms
    # Independent check: the Kinect depth at the same pixel centres, nearest sampling.
    rows = ((np.arange(64) + 0.5) * 480 / 64).astype(int)
    cols = ((np.arange(80) + 0.5) * 640 / 80).astype(int)
    measured_m = frame.depth_raw[np.ix_(rows, cols)].astype(np.float64) * frame.depth_scale
    valid = (measured_m > 0.2) & (measured_m < 6.0) & np.isfinite(estimate.depth_m)
    abs_rel = np.mean(np.abs(estimate.depth_m[valid] - measured_m[valid]) / measured_m[valid])
    # Measured 0.04-0.10 on validation frames; 0.25 would be a badly broken network or scale.
    assert abs_rel < 0.25


def test_depth_source_rejects_segmentation_model():
    card = "pkg:quantized_inference_node/models/ppocr_det_v4.yaml"
    model = "pkg:rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
    pytest.importorskip("rapidocr_onnxruntime", reason="the PP-OCR detector comes with rapidocr-onnxruntime")

    with pytest.raises(ValueError, match=r"task 'segmentation'.*needs a model card with task 'depth'"):
        NetworkDepthSource.load(model, mono_mapper_config(), card)


def test_network_pipeline_on_synthetic_frames():
    """Runs without the 7-Scenes excerpt: the network's depth of rendered frames, any values."""
    from surfel_mapping_node.datasets.synthetic import SyntheticDataset

    dataset = SyntheticDataset.room(n_frames=3)
    config = mono_mapper_config()
    source = NetworkDepthSource.load(DEFAULT_MODEL, config)

    result = run_pipeline(dataset, config, range(3), depth_source=source)

    assert result.mapper.camera == dataset.camera.scaled(80, 64)
    assert result.summary()["frames_fused"] == 3
    assert "network_depth" in result.summary()["stages"]
    assert "image_resize" in result.summary()["stages"]


def test_default_depth_source_keeps_the_frame_camera():
    from surfel_mapping_node.datasets.synthetic import SyntheticDataset
    from surfel_mapping_node.pipeline import DepthSource

    frame = SyntheticDataset.room(n_frames=1)[0]

    estimate = DepthSource(MapperConfig()).estimate(frame, {})

    assert estimate.camera == frame.camera
    assert estimate.depth_m.shape == frame.camera.shape


def test_map_distance_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    reference = rng.uniform(-1, 1, (200, 3))
    offsets = rng.normal(0, 0.01, (50, 3))
    points = reference[:50] + offsets

    distance = map_distance(points, reference)

    direct = np.min(np.linalg.norm(points[:, None, :] - reference[None, :, :], axis=2), axis=1)
    np.testing.assert_allclose(distance.median_m, np.median(direct), rtol=1e-12)
    np.testing.assert_allclose(distance.p90_m, np.percentile(direct, 90), rtol=1e-12)
    assert distance.surfels == 50
    with pytest.raises(ValueError, match=r"cannot compare a map of 0 surfels with one of 200"):
        map_distance(np.zeros((0, 3)), reference)


def test_comparison_rejects_frames_outside_the_excerpt(seven_scenes_dir: Path):
    with pytest.raises(ValueError, match=r"invalid frame range 290-309: the excerpt has frames 0-299"):
        run_mono_comparison(seven_scenes_dir, range(290, 310))


def test_demo_without_data_returns_none(tmp_path: Path):
    assert find_seven_scenes(tmp_path) is None
    assert run_mono_demo(tmp_path, tmp_path / "mono") is None
    assert not (tmp_path / "mono").exists()


def test_demo_writes_map_preview_and_report(seven_scenes_dir: Path, tmp_path: Path):
    from surfel_mapping_node.ply_io import read_surfel_ply

    outputs = run_mono_demo(seven_scenes_dir.parent, tmp_path / "mono", indices=range(240, 246))

    cloud = read_surfel_ply(outputs.map_path)
    preview = cv2.imread(str(outputs.preview_path))
    report = outputs.report_path.read_text()
    assert len(cloud.position_m) == outputs.comparison.mono.summary()["surfels"] > 0
    assert preview.shape[1] > preview.shape[0]  # two panels side by side
    assert "frames 0-239 of this same room" in report
    assert "abs-rel" in report
    assert "median" in report


# --- ROS end to end --------------------------------------------------------------------

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
# Its own range, apart from test_node's domains, so parallel runs do not meet.
DOMAIN_ID = 101 + os.getpid() % 100
FRAME_PERIOD_NS = 33_333_333  # 7-Scenes ran at 30 Hz
FIRST_STAMP_NS = 1_000_000_000
NETWORK_NODE = "quantized_inference_node"


def _import_ros():
    try:
        import rclpy  # noqa: F401

        from quantized_inference_node.node import QuantizedInferenceNode
        from surfel_mapping_node.node import SurfelMappingNode
    except ImportError as error:
        pytest.skip(f"rclpy and the ROS 2 message packages cannot be imported: {error}")
    return QuantizedInferenceNode, SurfelMappingNode


class MonoRosHarness:
    """The inference node, the mapping node (depth_only) and a client, on one executor thread.

    Topics as in launch/mono_depth_mapping.launch.xml. The client replaces the
    camera and the SLAM system: it publishes the full-size image and camera_info and
    the ground-truth pose; the mapping node downscales the image to the depth's size.
    """

    def __init__(self, save_path: Path) -> None:
        import rclpy
        from geometry_msgs.msg import PoseStamped
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.parameter import Parameter
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image
        from std_srvs.srv import Trigger

        QuantizedInferenceNode, SurfelMappingNode = _import_ros()
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=DOMAIN_ID)
        config = mono_mapper_config()
        mapper_parameters = {
            "input_mode": "depth_only",
            "sync_tolerance": 0.001,
            "image_queue_size": 30,
            "image_qos": "reliable",
            "save_path": str(save_path),
            "superpixels.grid_px": config.superpixels.grid_px,
            "surfels.min_pixels_with_depth": config.surfels.min_pixels_with_depth,
            "depth.min_depth_m": config.depth.min_depth_m,
            "depth.max_depth_m": config.depth.max_depth_m,
        }
        self.nodes = []
        try:
            self.network = QuantizedInferenceNode(
                context=self.context,
                parameter_overrides=[
                    Parameter("model_path", value=DEFAULT_MODEL),
                    Parameter("card_path", value=DEFAULT_MODEL.replace(".onnx", ".yaml")),
                ],
                cli_args=_remaps({"image": "/camera/image_raw", "camera_info": "/camera/camera_info"}),
            )
            self.nodes.append(self.network)
            self.mapper = SurfelMappingNode(
                context=self.context,
                parameter_overrides=[Parameter(k, value=v) for k, v in mapper_parameters.items()],
                cli_args=_remaps(
                    {
                        "image": "/camera/image_raw",
                        "depth": f"/{NETWORK_NODE}/depth",
                        "camera_info": f"/{NETWORK_NODE}/camera_info",
                        "pose": "/slam/camera_pose",
                        "keyframes": "/slam/keyframe_path",
                    }
                ),
            )
            self.nodes.append(self.mapper)
        except Exception:
            self._destroy()
            raise
        assert self.network.engine is not None, "the committed depth model did not load"

        self.client = rclpy.create_node("mono_test_client", context=self.context)
        self.nodes.append(self.client)
        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.image_pub = self.client.create_publisher(Image, "/camera/image_raw", reliable)
        self.info_pub = self.client.create_publisher(CameraInfo, "/camera/camera_info", reliable)
        self.pose_pub = self.client.create_publisher(PoseStamped, "/slam/camera_pose", reliable)
        self.depth_stamps: list[int] = []
        self.client.create_subscription(Image, f"/{NETWORK_NODE}/depth", self._on_depth, reliable)
        self.save_client = self.client.create_client(Trigger, "/surfel_mapping_node/save_map")

        self.executor = SingleThreadedExecutor(context=self.context)
        for node in self.nodes:
            self.executor.add_node(node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        publishers = [self.image_pub, self.info_pub, self.pose_pub]
        discovered = self.wait_for(lambda: all(p.get_subscription_count() > 0 for p in publishers), 30)
        assert discovered, "the nodes did not discover the client's publishers"

    def _on_depth(self, message) -> None:
        from surfel_mapping_node import ros_conversions as conv

        self.depth_stamps.append(conv.stamp_to_ns(message.header.stamp))

    def close(self) -> None:
        self.executor.shutdown()
        self.thread.join(timeout=10)
        self._destroy()

    def _destroy(self) -> None:
        import rclpy

        for node in self.nodes:
            node.destroy_node()
        rclpy.shutdown(context=self.context)

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()

    def process(self, image_rgb: np.ndarray, camera, T_world_camera: np.ndarray, stamp_ns: int) -> None:
        """Publish one frame and wait until the mapping node integrated it.

        One frame at a time: the inference node keeps only the newest image, so a
        faster stream would be thinned, which a test of the wiring does not need.
        """
        from geometry_msgs.msg import PoseStamped
        from sensor_msgs.msg import CameraInfo

        from surfel_mapping_node import ros_conversions as conv

        header = conv.make_header(stamp_ns, "camera")
        info = CameraInfo(
            header=header, width=camera.width, height=camera.height, distortion_model="plumb_bob"
        )
        info.k = camera.K.reshape(-1).tolist()
        info.d = [0.0] * 5
        info.r = np.eye(3).reshape(-1).tolist()
        info.p = np.hstack([camera.K, np.zeros((3, 1))]).reshape(-1).tolist()
        before = self.mapper.counters()["frames_processed"]

        self.info_pub.publish(info)
        # The inference node pairs an image with the newest camera_info it has received.
        time.sleep(0.02)
        pose = PoseStamped(header=conv.make_header(stamp_ns, "map"), pose=conv.matrix_to_pose(T_world_camera))
        self.pose_pub.publish(pose)
        self.image_pub.publish(_rgb8(image_rgb, header))

        # The first frame compiles the numba kernels unless they are cached.
        assert self.wait_for(lambda: stamp_ns in self.depth_stamps, 60), f"no depth for frame {stamp_ns}"
        assert self.wait_for(lambda: self.mapper.counters()["frames_processed"] > before, 120), (
            f"frame {stamp_ns} was not integrated: {self.mapper.counters()}"
        )

    def save(self) -> bool:
        from std_srvs.srv import Trigger

        assert self.save_client.wait_for_service(timeout_sec=10)
        future = self.save_client.call_async(Trigger.Request())
        assert self.wait_for(future.done, 30), "save_map did not answer"
        return future.result().success


def _remaps(topics: dict[str, str]) -> list[str]:
    """Return the command-line arguments remapping each relative topic name to its target."""
    arguments = ["--ros-args"]
    for name, target in topics.items():
        arguments += ["-r", f"{name}:={target}"]
    return arguments


def _rgb8(pixels: np.ndarray, header):
    from sensor_msgs.msg import Image

    contiguous = np.ascontiguousarray(pixels)
    return Image(
        header=header,
        height=contiguous.shape[0],
        width=contiguous.shape[1],
        encoding="rgb8",
        is_bigendian=0,
        step=contiguous.shape[1] * 3,
        data=contiguous.tobytes(),
    )


@pytest.fixture
def ros_available() -> None:
    """Skip before the maps are built when rclpy is missing."""
    _import_ros()


@pytest.mark.ros
def test_ros_nodes_map_network_depth(
    ros_available, seven_scenes_dir: Path, tmp_path: Path, rgbd_reference, offline_mono
):
    from surfel_mapping_node.ply_io import read_surfel_ply

    dataset = SevenScenesDataset(seven_scenes_dir)
    save_path = tmp_path / "mono_ros.ply"
    harness = MonoRosHarness(save_path)
    try:
        for position, index in enumerate(FRAMES):
            frame = dataset[index]
            stamp_ns = FIRST_STAMP_NS + position * FRAME_PERIOD_NS
            harness.process(frame.image, frame.camera, frame.T_world_camera, stamp_ns)
        counters = harness.mapper.counters()
        saved = harness.save()
    finally:
        harness.close()

    ros_map = read_surfel_ply(save_path)
    to_rgbd = map_distance(ros_map.position_m, rgbd_reference.position_m)
    to_offline = map_distance(ros_map.position_m, offline_mono.mapper.cloud().position_m)
    assert saved
    assert counters["frames_processed"] == len(FRAMES), counters
    assert not counters["dropped"], counters
    assert to_rgbd.median_m < ROS_MEDIAN_BOUND_M, to_rgbd
    assert to_offline.median_m < ROS_TO_OFFLINE_MEDIAN_BOUND_M, to_offline
