"""ROS 2 node ``surfel_mapping_node``: a thin adapter around SurfelMapper.

Subscribes to these topics. All are remappable, and names are relative to the node's
namespace:
    rgbd, depth_only:  image (mono8, rgb8, bgr8, 8UC1, 8UC3, rgba8, bgra8), depth (16UC1/mono16 in units of
                       ``depth.depth_scale`` metres, millimetres per REP 118 by default,
                       or 32FC1 metres; depth_only takes 32FC1 only), camera_info
    stereo:            left/image_rect, right/image_rect, left/camera_info,
                       right/camera_info (rectified; baseline = −P[0,3] / P[0,0] of the
                       right camera)
    all modes:         pose (geometry_msgs/PoseStamped or nav_msgs/Odometry, see
                       ``pose_type``; the camera or body pose in ``map_frame``),
                       keyframes (nav_msgs/Path of the SLAM keyframes; when their poses
                       change, e.g. after a loop closure, the map follows)
Publishes:
    ~/map (sensor_msgs/PointCloud2, fields in ros_conversions.SURFEL_CLOUD_FIELDS),
    ~/map_mesh (visualization_msgs/Marker TRIANGLE_LIST, when ``publish_mesh``),
    ~/keyframe_path (nav_msgs/Path of the mapper's keyframes)
Services:
    ~/save_map (std_srvs/Trigger): writes the map as PLY to ``save_path``.

Every parameter is listed once in PARAMETER_SPECS (node options) or comes from
MapperConfig (mapper options, flattened as ``section.name``, e.g. ``fusion.max_weight``);
both are declared with descriptors and validated before the node starts.

Threads: the executor thread runs the callbacks, which only decode and queue messages.
A worker thread owns the mapper: it integrates the newest matched frame, applies
keyframe corrections and publishes the map when the publish timer fires. The mapping
kernels release the GIL, so a slow frame delays the map but not the message callbacks,
and matched frames that arrive while the mapper is busy are dropped and counted.

Spin the node with a SingleThreadedExecutor. rclpy's MultiThreadedExecutor polls its
pending callbacks in a loop that, with 30 Hz images, took a whole core and lost most
frames inside DDS (measured with reliable QoS on 2 cores: 1 to 2 frames per second
fused, against 27 to 28 with this design).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import rclpy
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Odometry
from nav_msgs.msg import Path as PathMsg
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_srvs.srv import Trigger
from visualization_msgs.msg import Marker

from surfel_mapping_node import ros_conversions as conv
from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.frame_sync import FrameSynchronizer, MatchedFrame
from surfel_mapping_node.mapper import SurfelCloud, SurfelMapper, compile_kernels
from surfel_mapping_node.node_parameters import (
    INPUT_TOPICS,
    MAPPER_SECTIONS_NOT_PARAMETERS,
    MILLIMETRES_PER_UNIT_DEFAULT,
    NODE_NAME,
    STATE_TOPICS,
    NodeParameterError,
    NodeSettings,
    ParamSpec,
    all_parameter_specs,
    parameter_help,
    settings_from_parameters,
)
from surfel_mapping_node.poses import InvalidPoseError, invert


def _descriptor(spec: ParamSpec) -> ParameterDescriptor:
    descriptor = ParameterDescriptor(description=spec.description, read_only=False)
    constraints = [f"allowed: {spec.allowed()}"]
    if not spec.runtime:
        constraints.append("read at start-up")
    descriptor.additional_constraints = "; ".join(constraints)
    if isinstance(spec.default, float) and spec.min_value is not None and spec.max_value is not None:
        descriptor.floating_point_range = [
            FloatingPointRange(from_value=float(spec.min_value), to_value=float(spec.max_value), step=0.0)
        ]
    elif (
        isinstance(spec.default, int)
        and not isinstance(spec.default, bool)
        and spec.min_value is not None
        and spec.max_value is not None
    ):
        descriptor.integer_range = [
            IntegerRange(from_value=int(spec.min_value), to_value=int(spec.max_value), step=1)
        ]
    return descriptor


def _qos(kind: str, depth: int) -> QoSProfile:
    if kind == "sensor_data":
        return qos_profile_sensor_data
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.VOLATILE,
    )


# Latched (transient local) so that RViz started later still gets the last map.
LATCHED_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


# Period of the check for inputs that stay silent while others arrive, s.
INPUT_CHECK_PERIOD_S = 5.0
# How long a matched frame waits for a camera_info that has not arrived yet, s.
CAMERA_INFO_WAIT_S = 0.5


class SaveResult(NamedTuple):
    """Outcome of a map save."""

    success: bool
    # The absolute path written, or why nothing was written.
    message: str


@dataclass
class _Keyframe:
    """A keyframe of the mapper as the node tracks it for pose corrections."""

    stamp_ns: int
    # Camera-to-map pose the keyframe was integrated with, and the current one.
    T_map_camera_integrated: np.ndarray
    T_map_camera: np.ndarray


@dataclass
class _Counters:
    frames_processed: int = 0
    # Matched frames replaced by a newer one before the mapper was free.
    frames_skipped_busy: int = 0
    # Reason -> messages or frames dropped by this node (not by the synchronizer).
    dropped: dict[str, int] = field(default_factory=dict)
    keyframe_updates: int = 0
    unknown_keyframe_stamps: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class SurfelMappingNode(Node):
    """The surfel mapping node; see the module docstring for topics and parameters.

    Raises (from the constructor):
        NodeParameterError: an invalid parameter value; the node must not start.
    """

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)

        # Step 1: declare and validate every parameter before creating anything.
        self._specs = all_parameter_specs()
        try:
            self.settings = self._declare_and_validate()
        except NodeParameterError:
            self.destroy_node()
            raise
        self._log_configuration()

        # Step 2: state shared by the callbacks and the worker, guarded by _lock, which
        # is held only briefly. The worker holds _mapper_lock while it uses the mapper,
        # and so does save_map.
        self._lock = threading.Lock()
        self._work_ready = threading.Condition(self._lock)
        self._mapper_lock = threading.Lock()
        self._publish_due = False
        self._stopping = False
        # Inputs without a message while others arrive, as of the last check.
        self._silent_inputs: list[str] = []
        self._kernels_ready = False
        self._warned: set[str] = set()
        self._counters = _Counters()
        self._stage_ms_sum: dict[str, float] = {}
        self._stage_frames = 0
        self._pending_frame: MatchedFrame | None = None
        self._pending_path: conv.PathPoses | None = None
        self._last_path_size = 0
        self._cameras: dict[str, PinholeCamera] = {}
        self._baseline_m: float | None = None
        self._mapper: SurfelMapper | None = None
        self._stereo_depth = None
        self._keyframes: dict[int, _Keyframe] = {}
        # Stamp -> camera-to-map pose each processed frame was integrated with.
        # NOTE: it grows by an estimated 300 bytes per frame (about 30 MB per hour at 30 Hz)
        # because a later keyframe path may name any processed frame.
        self._integrated_poses: dict[int, np.ndarray] = {}
        self._map_version = 0
        self._published_version = 0
        self._last_publish_stamp_ns: int | None = None

        # Step 3: synchronizer of the streams this input mode needs.
        s = self.settings
        image_streams = ["left", "right"] if s.input_mode == "stereo" else ["image", "depth"]
        queue_sizes = dict.fromkeys(image_streams, s.image_queue_size)
        queue_sizes["pose"] = s.pose_queue_size
        self._sync = FrameSynchronizer([*image_streams, "pose"], s.sync_tolerance_ns, queue_sizes)

        # Step 4: subscriptions (decode and queue only), outputs, the publish timer.
        self._input_group = MutuallyExclusiveCallbackGroup()
        self._create_subscriptions()
        self._map_pub = self.create_publisher(PointCloud2, "~/map", LATCHED_QOS)
        self._mesh_pub = self.create_publisher(Marker, "~/map_mesh", LATCHED_QOS)
        self._path_pub = self.create_publisher(PathMsg, "~/keyframe_path", LATCHED_QOS)
        self.create_service(Trigger, "~/save_map", self._on_save_map)
        self.create_timer(1.0 / s.publish_rate_hz, self._on_publish_timer)
        self.create_timer(INPUT_CHECK_PERIOD_S, self._check_inputs)
        self.add_on_set_parameters_callback(self._on_set_parameters)

        # Step 5: the worker, which sleeps until a frame, a keyframe path or a
        # publication is pending, so an idle node costs no CPU.
        self._worker = threading.Thread(target=self._run_worker, name="surfel_mapping_worker", daemon=True)
        self._worker.start()

    def destroy_node(self) -> None:
        """Stop the worker after the item it is working on, then destroy the node."""
        # A node whose parameters failed is destroyed before it made its worker.
        worker = getattr(self, "_worker", None)
        if worker is not None:
            with self._lock:
                self._stopping = True
                self._work_ready.notify()
            worker.join(timeout=30.0)
        super().destroy_node()

    # --- parameters ----------------------------------------------------------------

    def _declare_and_validate(self) -> NodeSettings:
        values = {}
        for name, spec in self._specs.items():
            try:
                values[name] = self.declare_parameter(name, spec.default, _descriptor(spec)).value
            except Exception as error:  # rclpy raises several types for a bad override.
                override = self._parameter_overrides.get(name)
                requested = override.value if override is not None else "?"
                raise NodeParameterError(
                    f"invalid parameter {name}={requested!r}: use {spec.allowed()} ({error})"
                ) from error

        # rclpy ignores overrides of undeclared names, so a misspelt option would
        # silently keep its default.
        unknown = sorted(
            name
            for name in self._parameter_overrides
            if not self.has_parameter(name) and not name.startswith("qos_overrides.")
        )
        if unknown:
            raise NodeParameterError(
                f"unknown parameter {unknown[0]!r}: check its spelling; "
                f"`{NODE_NAME} --help` lists the declared ones"
            )
        return settings_from_parameters(values)

    def _on_set_parameters(self, parameters: Sequence[Parameter]) -> SetParametersResult:
        for parameter in parameters:
            spec = self._specs.get(parameter.name)
            if spec is None:
                continue
            if not spec.runtime:
                return SetParametersResult(
                    successful=False,
                    reason=f"{parameter.name} is read at start-up: restart the node to change it",
                )
            try:
                spec.check(parameter.value)
            except NodeParameterError as error:
                return SetParametersResult(successful=False, reason=str(error))
        updates = {p.name: p.value for p in parameters if p.name in self._specs}
        with self._lock:
            self.settings = dataclasses.replace(self.settings, **updates)
            self._map_version += 1
        return SetParametersResult(successful=True)

    def _log_configuration(self) -> None:
        s = self.settings
        self.get_logger().info(
            f"input_mode={s.input_mode} pose_type={s.pose_type} map_frame={s.map_frame} "
            f"sync_tolerance={s.sync_tolerance_ns / 1e9:g} s queues: images {s.image_queue_size}, "
            f"poses {s.pose_queue_size}; QoS: images {s.image_qos}, poses {s.pose_qos}, outputs "
            f"reliable transient-local; publish_rate={s.publish_rate_hz:g} Hz "
            f"max_published_points={s.max_published_points} publish_mesh={s.publish_mesh} "
            f"save_path={s.save_path} save_on_shutdown={s.save_on_shutdown}"
        )
        if not np.allclose(s.T_body_camera, np.eye(4)):
            self.get_logger().info(f"T_body_camera=\n{np.array2string(s.T_body_camera, precision=4)}")
        self.get_logger().info(
            "mapper config: "
            + " ".join(
                f"{section}.{name}={value}"
                for section, options in s.mapper_config.to_dict().items()
                if section not in MAPPER_SECTIONS_NOT_PARAMETERS
                for name, value in options.items()
            )
        )

    # --- subscriptions -------------------------------------------------------------

    def _create_subscriptions(self) -> None:
        s = self.settings
        image_qos = _qos(s.image_qos, s.image_queue_size)
        pose_qos = _qos(s.pose_qos, max(10, min(s.pose_queue_size, 1000)))
        group = self._input_group

        if s.input_mode == "stereo":
            left_image, right_image, left_info, right_info = INPUT_TOPICS["stereo"]
            streams = [(left_image, "left"), (right_image, "right")]
            infos = [(left_info, "left"), (right_info, "right")]
        else:
            image, depth, info = INPUT_TOPICS[s.input_mode]
            streams = [(image, "image"), (depth, "depth")]
            infos = [(info, "image")]
        # Input name -> resolved topic, and camera_info input name -> its stream, for
        # the check of silent inputs.
        self._input_topics: dict[str, str] = {}
        self._camera_info_inputs: dict[str, str] = {}
        for topic, stream in streams:
            subscription = self.create_subscription(
                Image, topic, partial(self._on_image, stream), image_qos, callback_group=group
            )
            self._input_topics[stream] = subscription.topic_name
        for topic, stream in infos:
            subscription = self.create_subscription(
                CameraInfo, topic, partial(self._on_camera_info, stream), image_qos, callback_group=group
            )
            self._input_topics[f"{stream} camera_info"] = subscription.topic_name
            self._camera_info_inputs[f"{stream} camera_info"] = stream

        pose_msg_type = Odometry if s.pose_type == "odometry" else PoseStamped
        pose_topic, keyframes_topic = STATE_TOPICS
        subscription = self.create_subscription(
            pose_msg_type, pose_topic, self._on_pose, pose_qos, callback_group=group
        )
        self._input_topics["pose"] = subscription.topic_name
        self.create_subscription(PathMsg, keyframes_topic, self._on_keyframes, pose_qos, callback_group=group)
        self.get_logger().info(
            f"subscribed ({s.input_mode}): "
            + ", ".join(f"{sub.topic_name} [{sub.msg_type.__name__}]" for sub in self.subscriptions)
        )

    def _on_image(self, stream: str, msg: Image) -> None:
        # Decoding here keeps bad messages out of the queues; it is a copy, not a conversion.
        try:
            if stream == "depth":
                allowed = ("32FC1",) if self.settings.input_mode == "depth_only" else conv.DEPTH_ENCODINGS
                payload = (conv.image_to_numpy(msg, allowed), msg.encoding)
            else:
                payload = conv.image_to_rgb_or_mono(msg)
        except conv.ImageConversionError as error:
            self._drop(
                f"{stream}: {error}", f"bad_{stream}_message", once_key=f"encoding:{stream}:{msg.encoding}"
            )
            return
        self._add_to_sync(stream, conv.stamp_to_ns(msg.header.stamp), payload)

    def _on_camera_info(self, stream: str, msg: CameraInfo) -> None:
        try:
            camera = conv.camera_from_camera_info(msg)
            baseline_m = conv.stereo_baseline_m(msg) if stream == "right" else None
        except conv.CameraInfoError as error:
            self._drop(
                f"{stream} camera_info: {error}",
                f"bad_{stream}_camera_info",
                once_key=f"camera_info:{stream}",
            )
            return
        with self._lock:
            previous = self._cameras.get(stream)
            self._cameras[stream] = camera
            if baseline_m is not None:
                self._baseline_m = baseline_m
            self._work_ready.notify()
        if previous is not None and previous != camera:
            self._warn_once(
                f"camera_changed:{stream}",
                f"{stream} camera_info changed from {previous} to {camera}: the map keeps the first "
                "intrinsics and frames with other intrinsics are dropped",
            )

    def _on_pose(self, msg: Any) -> None:
        try:
            if isinstance(msg, Odometry):
                stamped = conv.odometry_to_matrix(msg)
            else:
                stamped = conv.pose_stamped_to_matrix(msg)
        except InvalidPoseError as error:
            self._drop(f"pose dropped: {error}", "invalid_pose", throttle=True)
            return
        if stamped.frame_id and stamped.frame_id != self.settings.map_frame:
            self._warn_once(
                f"pose_frame:{stamped.frame_id}",
                f"pose is in frame {stamped.frame_id!r}, not map_frame {self.settings.map_frame!r}: "
                "it is used as if it were in map_frame (set map_frame to match)",
            )
        T_map_camera = stamped.T @ self.settings.T_body_camera
        self._add_to_sync("pose", stamped.stamp_ns, T_map_camera)

    def _on_keyframes(self, msg: PathMsg) -> None:
        path = conv.path_to_poses(msg)
        for stamp_ns, reason in path.invalid:
            self._drop(
                f"keyframe at {stamp_ns} ns left out: {reason}", "invalid_keyframe_pose", throttle=True
            )
        size = len(path.poses)
        if size == 0:
            self.get_logger().info(
                "received an empty keyframe path: nothing to correct", throttle_duration_sec=10.0
            )
        elif size < self._last_path_size:
            self.get_logger().info(
                f"keyframe path shrank from {self._last_path_size} to {size} poses (keyframes culled): "
                "keyframes no longer in it keep their last pose"
            )
        self._last_path_size = size
        if size == 0:
            return
        with self._lock:
            self._pending_path = path
            self._work_ready.notify()

    def _check_inputs(self) -> None:
        """Warn once for each input that has had no message while other inputs arrive.

        A silent input usually means a wrong remapping or a QoS that does not match the
        publisher's, and without it no frame is ever matched.
        """
        with self._lock:
            received = dict(self._sync.stats.received)
            cameras = set(self._cameras)
        counts = {name: received.get(name, 0) for name in self._input_topics}
        for name, stream in self._camera_info_inputs.items():
            counts[name] = int(stream in cameras)
        arriving = [name for name, count in counts.items() if count > 0]
        silent = [name for name, count in counts.items() if count == 0] if arriving else []
        with self._lock:
            self._silent_inputs = silent
        for name in silent:
            self._warn_once(
                f"silent:{name}",
                f"no {name} message yet on {self._input_topics[name]} while {', '.join(arriving)} "
                "arrive: no frame can be matched without it; check the remapping and that the "
                f"publisher's QoS is compatible (image_qos={self.settings.image_qos}, "
                f"pose_qos={self.settings.pose_qos})",
            )

    def _add_to_sync(self, stream: str, stamp_ns: int, payload: Any) -> None:
        with self._lock:
            matched = self._sync.add(stream, stamp_ns, payload)
            if matched:
                if self._pending_frame is not None:
                    self._counters.frames_skipped_busy += 1
                self._counters.frames_skipped_busy += len(matched) - 1
                self._pending_frame = matched[-1]
                self._work_ready.notify()

    # --- work: integrate, correct, publish, save ------------------------------------

    def _run_worker(self) -> None:
        try:
            seconds = compile_kernels(self.settings.mapper_config)
            self.get_logger().info(f"mapping kernels ready ({seconds:.1f} s)")
        except Exception as error:  # The first frame compiles them instead.
            self.get_logger().error(f"mapping kernels not compiled at start: {error!r}")
        with self._lock:
            self._kernels_ready = True
        while True:
            with self._lock:
                self._work_ready.wait_for(self._has_work)
                if self._stopping:
                    return
                frame, self._pending_frame = self._pending_frame, None
                path, self._pending_path = self._pending_path, None
                publish, self._publish_due = self._publish_due, False
            with self._mapper_lock:
                self._work(frame, path, publish)

    def _has_work(self) -> bool:
        return (
            self._stopping
            or self._pending_frame is not None
            or self._pending_path is not None
            or self._publish_due
        )

    def _work(self, frame: MatchedFrame | None, path: conv.PathPoses | None, publish: bool) -> None:
        if path is not None:
            try:
                self._apply_keyframe_path(path)
            except Exception as error:  # A bad correction must not stop the mapping.
                self._drop(f"keyframe path not applied: {error!r}", "keyframe_path_failed", throttle=True)
        if frame is not None:
            try:
                self._process(frame)
            except Exception as error:  # One bad frame must not stop the node.
                self._drop(f"frame at {frame.stamp_ns} ns failed: {error!r}", "frame_failed", throttle=True)
        if publish:
            try:
                self._publish_map()
            except Exception as error:  # A failed publication must not stop the mapping.
                self.get_logger().error(f"map not published: {error!r}", throttle_duration_sec=5.0)

    def _process(self, frame: MatchedFrame) -> None:
        s = self.settings
        start = time.perf_counter()

        # Step 1: the camera, and the mapper once the camera is known. A publisher's
        # first camera_info can arrive just after its first images, so wait briefly.
        reference = "left" if s.input_mode == "stereo" else "image"
        needed = {"left", "right"} if s.input_mode == "stereo" else {"image"}
        with self._lock:
            self._work_ready.wait_for(
                lambda: needed <= self._cameras.keys() or self._stopping, timeout=CAMERA_INFO_WAIT_S
            )
            camera = self._cameras.get(reference)
            right_camera = self._cameras.get("right")
            baseline_m = self._baseline_m
        if camera is None or (s.input_mode == "stereo" and right_camera is None):
            missing = "left/camera_info and right/camera_info" if s.input_mode == "stereo" else "camera_info"
            self._drop(
                f"no {missing} received yet: frames are dropped until it arrives",
                "missing_camera_info",
                throttle=True,
            )
            return
        if self._mapper is None:
            self._mapper = SurfelMapper(s.mapper_config, camera)
            self.get_logger().info(f"mapper created for camera {camera}")
        if camera != self._mapper.camera:
            self._drop(
                f"{reference} intrinsics {camera} differ from the map's {self._mapper.camera}",
                "intrinsics_mismatch",
                once_key=f"intrinsics:{reference}",
            )
            return

        # Step 2: image and depth in metres, sizes checked against the camera.
        if s.input_mode == "stereo":
            image, right = frame.payloads["left"], frame.payloads["right"]
            if not self._sizes_match(camera, {"left": image, "right": right}):
                return
            if right_camera.shape != camera.shape or not math.isclose(
                right_camera.fx, camera.fx, rel_tol=1e-6
            ):
                self._drop(
                    f"right camera {right_camera} does not match the left {camera}: "
                    "pass the camera_info of the rectified pair",
                    "intrinsics_mismatch",
                    once_key="intrinsics:right",
                )
                return
            depth_m = self._stereo(camera, baseline_m).compute(image, right).depth_m
        else:
            image = frame.payloads["image"]
            depth_raw, encoding = frame.payloads["depth"]
            if s.input_mode == "depth_only" and depth_raw.shape[:2] == camera.shape:
                # A depth network's output is usually smaller than the camera image, and
                # its camera_info is scaled to the output: bring the image to that size.
                image = camera.resample_image(image)
            if not self._sizes_match(camera, {"image": image, "depth": depth_raw}):
                return
            depth_m = self._decode_depth(depth_raw, encoding)
        T_map_camera = frame.payloads["pose"]
        convert_ms = (time.perf_counter() - start) * 1e3

        # Step 3: integrate, and remember keyframes for later pose corrections.
        stats = self._mapper.integrate(image, depth_m, T_map_camera, frame.stamp_ns)
        if stats.skipped_reason is not None:
            self._drop(
                f"frame at {frame.stamp_ns} ns skipped by the mapper: {stats.skipped_reason}",
                "mapper_skipped",
                throttle=True,
            )
            return
        self._integrated_poses[frame.stamp_ns] = T_map_camera
        if stats.is_new_keyframe and stats.keyframe_id is not None:
            self._keyframes[stats.keyframe_id] = _Keyframe(frame.stamp_ns, T_map_camera, T_map_camera)
        self._map_version += 1
        self._counters.frames_processed += 1
        self._record_timing({"input_conversion": convert_ms, **stats.stages_ms}, stats.surfels_total)

    def _sizes_match(self, camera: PinholeCamera, images: dict[str, np.ndarray]) -> bool:
        for stream, pixels in images.items():
            if tuple(pixels.shape[:2]) != camera.shape:
                self._drop(
                    f"{stream} is {pixels.shape[1]}x{pixels.shape[0]} but camera_info says "
                    f"{camera.width}x{camera.height}: {stream} must be registered to the camera; "
                    "such frames are dropped",
                    "size_mismatch",
                    once_key=f"size:{stream}",
                )
                return False
        return True

    def _decode_depth(self, depth_raw: np.ndarray, encoding: str) -> np.ndarray:
        from surfel_mapping_node.depth import decode_depth

        depth_config = self.settings.mapper_config.depth
        if encoding == "32FC1":
            scale = 1.0
        else:
            scale = depth_config.depth_scale or MILLIMETRES_PER_UNIT_DEFAULT
        return decode_depth(depth_raw, scale, depth_config.min_depth_m, depth_config.max_depth_m)

    def _stereo(self, camera: PinholeCamera, baseline_m: float):
        if self._stereo_depth is None:
            from surfel_mapping_node.stereo import StereoDepthEstimator

            config = self.settings.mapper_config
            self._stereo_depth = StereoDepthEstimator(
                config.stereo,
                fx=camera.fx,
                baseline_m=baseline_m,
                min_depth_m=config.depth.min_depth_m,
                max_depth_m=config.depth.max_depth_m,
            )
            self.get_logger().info(f"stereo depth: fx={camera.fx:g} px, baseline={baseline_m:.4f} m")
        return self._stereo_depth

    def _apply_keyframe_path(self, path: conv.PathPoses) -> None:
        """Move the mapper's keyframes to follow the SLAM keyframe poses (loop closure).

        Each path pose whose stamp matches a processed frame (within sync_tolerance)
        gives a rigid correction T_new · T_integrated⁻¹. Each mapper keyframe takes the
        correction of the path pose nearest in time. So keyframes that the SLAM system
        and the mapper chose differently still follow their neighbourhood.
        """
        tolerance_ns = self.settings.sync_tolerance_ns
        integrated_stamps = np.array(sorted(self._integrated_poses), dtype=np.int64)

        # Step 1: corrections at path stamps that match processed frames.
        anchor_stamps, corrections = [], []
        unknown = 0
        for stamp_ns, T_map_body in sorted(path.poses.items()):
            nearest = _nearest_stamp(integrated_stamps, stamp_ns)
            if nearest is None or abs(nearest - stamp_ns) > tolerance_ns:
                unknown += 1
                continue
            T_new = T_map_body @ self.settings.T_body_camera
            anchor_stamps.append(stamp_ns)
            corrections.append(T_new @ invert(self._integrated_poses[nearest]))
        if unknown:
            self._counters.unknown_keyframe_stamps += unknown
            self.get_logger().info(
                f"{unknown} of {len(path.poses)} keyframe path stamps match no processed frame "
                "(within sync_tolerance): ignored",
                throttle_duration_sec=10.0,
            )
        if not anchor_stamps or self._mapper is None or not self._keyframes:
            return

        # Step 2: each keyframe takes the nearest anchor's correction.
        anchors = np.array(anchor_stamps, dtype=np.int64)
        updates = {}
        for keyframe_id, keyframe in self._keyframes.items():
            index = int(np.argmin(np.abs(anchors - keyframe.stamp_ns)))
            T_new = corrections[index] @ keyframe.T_map_camera_integrated
            if not np.allclose(T_new, keyframe.T_map_camera, rtol=0.0, atol=1e-9):
                updates[keyframe_id] = T_new
        if not updates:
            return
        moved = self._mapper.update_keyframe_poses(updates)
        for keyframe_id, T_new in updates.items():
            self._keyframes[keyframe_id].T_map_camera = T_new
        # The version first: a reader that sees the update count must not see a stale map.
        self._map_version += 1
        self._counters.keyframe_updates += 1
        self.get_logger().info(f"keyframe poses corrected: {moved} of {len(self._keyframes)} keyframes moved")

    def _on_publish_timer(self) -> None:
        with self._lock:
            self._publish_due = True
            self._work_ready.notify()

    def _publish_map(self) -> None:
        version = self._map_version
        if version == self._published_version:
            return
        s = self.settings
        stamp_ns = self.get_clock().now().nanoseconds
        cloud = self._cloud()
        self._map_pub.publish(
            conv.surfel_cloud_to_pointcloud2(cloud, s.map_frame, stamp_ns, s.max_published_points)
        )
        if s.publish_mesh:
            self._mesh_pub.publish(
                conv.surfels_to_marker(cloud, s.map_frame, stamp_ns, s.mesh_segments, s.mesh_max_surfels)
            )
        poses = {k.stamp_ns: k.T_map_camera for k in self._keyframes.values()}
        self._path_pub.publish(conv.poses_to_path(poses, s.map_frame, stamp_ns))
        with self._lock:
            self._published_version = version
            self._last_publish_stamp_ns = stamp_ns

    def _cloud(self) -> SurfelCloud:
        return self._mapper.cloud() if self._mapper is not None else conv.empty_surfel_cloud()

    def _on_save_map(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        response.success, response.message = self.save_map()
        return response

    def save_map(self, path: str | None = None) -> SaveResult:
        """Write the map (possibly empty) as PLY to ``path`` or ``save_path``, atomically.

        Missing parent folders are created. A failed write (OSError, ValueError) comes
        back as ``success=False`` with the reason instead of raising, and so does an
        empty map when the file exists: it is not overwritten.
        """
        target = Path(path or self.settings.save_path).expanduser()
        try:
            from surfel_mapping_node.ply_io import write_surfel_ply

            with self._mapper_lock:
                cloud = self._cloud()
            if len(cloud.position_m) == 0 and target.exists():
                # An empty map must not replace a map saved before, e.g. by an earlier run.
                message = (
                    f"the map is empty: {target} was not overwritten "
                    "(save to another path to write an empty map)"
                )
                self.get_logger().warning(message)
                return SaveResult(False, message)
            if target.parent.exists() and not target.parent.is_dir():
                raise NotADirectoryError(f"{target.parent} is a file, not a folder: choose another save_path")
            target.parent.mkdir(parents=True, exist_ok=True)
            write_surfel_ply(target, cloud)
        except ImportError as error:
            message = f"cannot save the map: the PLY writer is unavailable ({error})"
        except (OSError, ValueError) as error:
            message = f"cannot save the map to {target}: {error}"
        else:
            message = f"saved {len(cloud.position_m)} surfels to {target.resolve()}"
            self.get_logger().info(message)
            return SaveResult(True, str(target.resolve()))
        self.get_logger().error(message)
        return SaveResult(False, message)

    # --- logging -------------------------------------------------------------------

    def _record_timing(self, stages_ms: dict[str, float], surfels_total: int) -> None:
        for stage, ms in stages_ms.items():
            self._stage_ms_sum[stage] = self._stage_ms_sum.get(stage, 0.0) + ms
        self._stage_frames += 1
        every = self.settings.log_every_n_frames
        if every == 0 or self._stage_frames < every:
            return
        stages = ", ".join(f"{k} {v / self._stage_frames:.1f}" for k, v in self._stage_ms_sum.items())
        stats = self._sync.stats
        c = self._counters
        self.get_logger().info(
            f"{c.frames_processed} frames ({c.frames_skipped_busy} skipped while busy); mean ms over "
            f"the last {self._stage_frames}: {stages}; surfels {surfels_total}; dropped by sync: "
            f"late {sum(stats.dropped_late.values())}, out of order "
            f"{sum(stats.dropped_out_of_order.values())}, unmatched "
            f"{sum(stats.dropped_unmatched.values())}, overflow {sum(stats.dropped_overflow.values())}; "
            f"dropped here: {', '.join(f'{reason} {n}' for reason, n in c.dropped.items()) or 0}"
        )
        self._stage_ms_sum.clear()
        self._stage_frames = 0

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.get_logger().warning(message)

    def _drop(self, message: str, reason: str, once_key: str | None = None, throttle: bool = False) -> None:
        with self._lock:
            self._counters.drop(reason)
        if once_key is not None:
            self._warn_once(once_key, message)
        elif throttle:
            self.get_logger().warning(message, throttle_duration_sec=5.0)
        else:
            self.get_logger().warning(message)

    def log_totals(self) -> None:
        """Log what the node did since it started: frames fused, skipped and dropped."""
        totals = self.counters()
        sync_dropped = {kind: sum(streams.values()) for kind, streams in totals["sync_dropped"].items()}
        self.get_logger().info(
            f"totals: {totals['frames_processed']} frames fused, {totals['frames_skipped_busy']} "
            f"skipped while busy; messages received {totals['received']}; dropped by sync "
            f"{sync_dropped}; dropped here {totals['dropped'] or 'none'}; "
            f"{totals['keyframe_updates']} keyframe corrections"
        )

    def counters(self) -> dict[str, Any]:
        """Return a snapshot of what the node did (frames, drops, corrections), for tests and logs."""
        with self._lock:
            c = self._counters
            stats = self._sync.stats
            return {
                "frames_processed": c.frames_processed,
                "frames_skipped_busy": c.frames_skipped_busy,
                # Messages per input stream that reached the node (DDS losses happen before).
                "received": dict(stats.received),
                "dropped": dict(c.dropped),
                "keyframe_updates": c.keyframe_updates,
                "unknown_keyframe_stamps": c.unknown_keyframe_stamps,
                "keyframes": len(self._keyframes),
                "silent_inputs": list(self._silent_inputs),
                # Whether the worker finished compiling the mapping kernels at start.
                "kernels_ready": self._kernels_ready,
                # Whether ~/map shows the current map, and the stamp of its last publication.
                "map_published": self._published_version == self._map_version,
                "last_publish_stamp_ns": self._last_publish_stamp_ns,
                "sync_matched": stats.matched,
                "sync_dropped": {
                    "late": dict(stats.dropped_late),
                    "out_of_order": dict(stats.dropped_out_of_order),
                    "unmatched": dict(stats.dropped_unmatched),
                    "overflow": dict(stats.dropped_overflow),
                },
            }


def _nearest_stamp(sorted_stamps_ns: np.ndarray, stamp_ns: int) -> int | None:
    if sorted_stamps_ns.size == 0:
        return None
    index = int(np.searchsorted(sorted_stamps_ns, stamp_ns))
    candidates = sorted_stamps_ns[max(index - 1, 0) : index + 1]
    return int(candidates[np.argmin(np.abs(candidates - stamp_ns))])


def main(args: list[str] | None = None) -> int:
    """Run the node until Ctrl-C or SIGTERM; exit code 2 when a parameter is invalid."""
    command_line = sys.argv[1:] if args is None else args
    if "--ros-args" in command_line:
        command_line = command_line[: command_line.index("--ros-args")]
    if "-h" in command_line or "--help" in command_line:
        print(f"usage: {NODE_NAME} [--ros-args -r TOPIC:=NEW_TOPIC ... -p NAME:=VALUE ...]\n")
        print(__doc__)
        print("Parameters:")
        print(parameter_help())
        return 0

    # Without rclpy's signal handler Ctrl-C raises KeyboardInterrupt while the context is
    # still valid, so save_on_shutdown can still log. SIGTERM (how ros2 launch and
    # process managers stop nodes) does the same. SIGINT gets its handler back because
    # a command that a script starts in the background inherits SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    logger = get_logger(NODE_NAME)
    try:
        node = SurfelMappingNode()
    except NodeParameterError as error:
        logger.fatal(f"not starting: {error}")
        rclpy.try_shutdown()
        return 2
    except KeyboardInterrupt:
        rclpy.try_shutdown()
        return 0

    executor = SingleThreadedExecutor()
    try:
        executor.add_node(node)
        node.get_logger().info("started; Ctrl-C or SIGTERM stops the node")
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.log_totals()
        if node.settings.save_on_shutdown:
            node.save_map()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
