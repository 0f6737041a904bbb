"""surfel_mapping_node fed real 7-Scenes RGB-D at 30 Hz over DDS: does it keep up?

The node runs in its own process (as ``ros2 run`` would start it) with the
SingleThreadedExecutor of ``surfel_mapping_node.node.main``. This
process preloads the frames as messages and publishes image, depth, camera_info and
the true camera pose on a fixed 30 Hz schedule, each stamped with the wall clock when
it is sent. It measures:
  - frames published, fused by the node, and dropped, by reason: the node's
    counters(), which a probe node in the node's process serves over a service;
  - latency from an image's stamp to the receipt of the first ``~/keyframe_path`` that
    lists it. The node publishes that path together with ``~/map`` from the map it
    has at that moment, so this is the delay until the map update that contains the frame.
    Only keyframes appear in the path, so the latency is sampled at keyframes;
  - the node process's resident memory (VmRSS) and CPU time, from /proc every 0.1 s;
  - the offline SurfelMapper's time per frame on the same frames, in the same run.

Results go to docs/benchmarks.md (section "node_throughput").

  python -m benchmarks.bench_node_throughput [--data ../shared/data] [--seconds 10] [--rate 30]

The node process is this module run as
``python -m benchmarks.bench_node_throughput serve-node --ros-args ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from benchmarks.report import write_section

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
SEVEN_SCENES_FOLDER = "7scenes_redkitchen"
NODE_NAME = "surfel_mapping_node"
# The node process's second node, which serves the node's counters.
PROBE_NODE_NAME = "node_throughput_probe"
# Maximum wait for the fate of a frame sent before the measured ones, s.
PRIME_PERIOD_S = 4.0
# A counters response slower than this means that the node's executor was blocked, s.
PROMPT_RESPONSE_S = 0.25
# The node counts as idle when its counters stayed the same this long, s. This is longer
# than Fast DDS's default heartbeat period (3 s). A reliable writer resends what a
# reader missed after a heartbeat, so a repaired frame can arrive that late.
IDLE_STEADY_S = 4.0
CAMERA_FRAME = "camera_color_optical_frame"
# The profile that the package's launch files give Fast DDS.
PACKAGE_FASTDDS_PROFILE = REPO_ROOT / "config" / "fastdds_large_frames.xml"
FASTDDS_PROFILE_VARIABLE = "FASTRTPS_DEFAULT_PROFILES_FILE"
# Frame-level drop reasons of the node's counters: each loses one matched frame. The
# other reasons count messages (depth, pose, camera_info, keyframe path).
FRAME_DROP_REASONS = (
    "missing_camera_info",
    "intrinsics_mismatch",
    "size_mismatch",
    "mapper_skipped",
    "frame_failed",
)
# A bad image message loses its frame before it reaches the synchronizer.
IMAGE_MESSAGE_DROP_REASON = "bad_image_message"
SAMPLE_PERIOD_S = 0.1
# How long the node has to start and fuse its first frame (numba kernels compile
# then unless they are cached).
NODE_START_TIMEOUT_S = 300.0
NODE_STOP_TIMEOUT_S = 30.0

logger = logging.getLogger(__name__)


class NodeRunError(RuntimeError):
    """The node process did not start, respond or stop in time; the message ends with its log."""


@dataclass(frozen=True)
class ThroughputConfig:
    """One throughput run.

    Args:
        seconds: how long frames are published, s.
        rate_hz: frame rate of the publisher, Hz (7-Scenes was recorded at 30 Hz).
        first_frame: index of the first 7-Scenes frame published.
        image_qos: the node's ``image_qos`` parameter, "sensor_data" (its default,
            best effort) or "reliable".
        image_queue_size: the node's ``image_queue_size`` parameter; with reliable
            image QoS it is also the depth of the node's DDS reader queue.
        publish_rate_hz: the node's ``publish_rate`` parameter, Hz: how often it
            publishes ``~/map`` and ``~/keyframe_path`` when the map changed.
        idle_s: how long the subscribed node waits before the first frame, s; its
            CPU use then is what it costs while no frames come.
        fastdds_profile: Fast DDS XML profile of both processes
            (FASTRTPS_DEFAULT_PROFILES_FILE), or None for Fast DDS's defaults. Fast DDS
            reads it when a process creates its first participant, so in a process
            that already used rclpy only the node process gets it.

    Raises:
        ValueError: a non-positive or non-finite duration or rate, a negative first
            frame, an unknown QoS name or a queue size below 1.
    """

    seconds: float = 10.0
    rate_hz: float = 30.0
    first_frame: int = 0
    image_qos: str = "sensor_data"
    image_queue_size: int = 10
    publish_rate_hz: float = 1.0
    idle_s: float = 2.0
    fastdds_profile: Path | None = None

    def __post_init__(self) -> None:
        for name in ("seconds", "rate_hz", "publish_rate_hz", "idle_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"invalid {name}={value}: use a finite number > 0")
        if self.first_frame < 0:
            raise ValueError(f"invalid first_frame={self.first_frame}: use a frame index >= 0")
        if self.image_qos not in ("sensor_data", "reliable"):
            raise ValueError(f"invalid image_qos={self.image_qos!r}: use 'sensor_data' or 'reliable'")
        if self.image_queue_size < 1:
            raise ValueError(f"invalid image_queue_size={self.image_queue_size}: use 1 or more")
        if self.fastdds_profile is not None and not Path(self.fastdds_profile).is_file():
            raise ValueError(
                f"Fast DDS profile {self.fastdds_profile} does not exist: pass an XML file, or none"
            )

    @property
    def frame_count(self) -> int:
        """Number of frames published."""
        return round(self.seconds * self.rate_hz)


@dataclass
class FrameMessages:
    """The messages of one frame, built before publishing; stamps are set when sent."""

    image: Any  # sensor_msgs/Image, rgb8
    depth: Any  # sensor_msgs/Image, 16UC1 millimetres
    camera_info: Any  # sensor_msgs/CameraInfo
    pose: Any  # geometry_msgs/PoseStamped, camera-to-map


class LoadedFrames(NamedTuple):
    """Frames read for a run."""

    messages: list[FrameMessages]
    # The dataset frames (image, raw depth, pose), for the offline peer.
    frames: list[Any]


class PublishedFrames(NamedTuple):
    """The stamps and timing of the frames the publisher sent."""

    stamps_ns: list[int]
    # The worst lateness against the schedule, s.
    max_lateness_s: float


@dataclass
class OfflineTiming:
    """SurfelMapper.integrate (depth decoding included) per frame, without ROS."""

    wall_ms: list[float]
    # CPU time of this process (all threads) per frame, ms.
    cpu_ms: list[float]


@dataclass
class MapReceipt:
    """One ``~/map`` message as this process received it."""

    received_ns: int  # wall clock
    stamp_ns: int  # header stamp: when the node published it (node clock = wall clock)
    width: int  # surfels in the cloud


@dataclass
class PathReceipt:
    """One ``~/keyframe_path`` message as this process received it."""

    received_ns: int
    keyframe_stamps_ns: list[int]


@dataclass
class ThroughputResult:
    """Measurements of one run. Counts are frames unless named otherwise."""

    config: ThroughputConfig
    published: int
    # Wall-clock stamps of the published frames, in order.
    published_stamps_ns: list[int]
    # Stamps of the first frame sent before them, until the node had fused one.
    priming_stamps_ns: list[int]
    publish_duration_s: float
    # The publisher's lateness against its schedule, s (worst frame).
    publish_max_lateness_s: float
    # Bytes of one frame's image and depth data.
    frame_bytes: int
    # The node's counters() over the published frames (what the priming frames added is
    # subtracted), and as they were at the end.
    counters: dict[str, Any]
    final_counters: dict[str, Any]
    maps: list[MapReceipt]
    paths: list[PathReceipt]
    # Surfels in the PLY that ~/save_map wrote after the node had gone idle.
    saved_surfels: int | None
    # Memory and CPU of the node process, every SAMPLE_PERIOD_S.
    samples: list[ProcessSample]
    # Seconds since the node process started: when it was idle after the priming frames,
    # when publishing began and ended, and when the node was idle again.
    subscribed_s: float
    publish_start_s: float
    publish_end_s: float
    quiet_s: float
    node_exit_code: int | None
    node_log: str = ""
    # Set by the caller: the offline mapper on the same frames.
    offline: OfflineTiming | None = None

    @property
    def fused(self) -> int:
        return int(self.counters["frames_processed"])

    @property
    def skipped_busy(self) -> int:
        """Matched frames replaced by a newer one while the mapper was busy."""
        return int(self.counters["frames_skipped_busy"])

    @property
    def frame_drops_in_node(self) -> dict[str, int]:
        """Matched frames the node dropped after matching, by reason."""
        dropped = self.counters["dropped"]
        return {reason: int(dropped[reason]) for reason in FRAME_DROP_REASONS if dropped.get(reason)}

    @property
    def image_drops_in_sync(self) -> dict[str, int]:
        """Image messages the synchronizer dropped (each a lost frame), by reason."""
        drops = {
            reason: int(by_stream.get("image", 0))
            for reason, by_stream in self.counters["sync_dropped"].items()
        }
        bad_images = int(self.counters["dropped"].get(IMAGE_MESSAGE_DROP_REASON, 0))
        if bad_images:
            drops["bad_image_message"] = bad_images
        return {reason: count for reason, count in drops.items() if count}

    @property
    def matched(self) -> int:
        return int(self.counters["sync_matched"])

    @property
    def dropped(self) -> int:
        """Frames the node counted as dropped: skipped while busy, by the synchronizer, or after matching."""
        return (
            self.skipped_busy
            + sum(self.frame_drops_in_node.values())
            + sum(self.image_drops_in_sync.values())
        )

    @property
    def unaccounted(self) -> int:
        """Published frames the node neither fused nor counted: lost in DDS before the
        node's callbacks saw them."""
        return self.published - self.fused - self.dropped

    def keyframe_latencies_s(self) -> dict[int, float]:
        """Image stamp -> seconds until the first received ``~/keyframe_path`` that lists
        it, for the keyframes among the published frames."""
        published = set(self.published_stamps_ns)
        first_seen: dict[int, int] = {}
        for receipt in self.paths:
            for stamp_ns in receipt.keyframe_stamps_ns:
                if stamp_ns in published:
                    first_seen.setdefault(stamp_ns, receipt.received_ns)
        return {stamp_ns: (received_ns - stamp_ns) / 1e9 for stamp_ns, received_ns in first_seen.items()}

    def map_transport_latencies_s(self) -> list[float]:
        """Seconds from each ``~/map`` header stamp (its publication) to its receipt here."""
        return [(m.received_ns - m.stamp_ns) / 1e9 for m in self.maps]

    def sample_at(self, seconds: float) -> ProcessSample:
        """Return the last sample of the node process at or before SECONDS (node time).

        Raises:
            ValueError: no sample was taken by then.
        """
        earlier = [sample for sample in self.samples if sample.t_s <= seconds]
        if not earlier:
            raise ValueError(f"no sample of the node process at or before {seconds:.2f} s")
        return earlier[-1]

    def cpu_share(self, start_s: float, end_s: float) -> float:
        """Return the node's CPU time between two instants over their distance (1.0 = one core)."""
        first, last = self.sample_at(start_s), self.sample_at(end_s)
        return (last.cpu_s - first.cpu_s) / max(last.t_s - first.t_s, 1e-9)


# --- messages ------------------------------------------------------------------------


def load_frame_messages(seven_scenes_dir: Path, first: int, count: int) -> LoadedFrames:
    """Read COUNT 7-Scenes frames from FIRST and build their messages.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: the folder contains fewer than first + count frames.
    """
    from geometry_msgs.msg import PoseStamped
    from sensor_msgs.msg import CameraInfo

    from surfel_mapping_node import ros_conversions as conv
    from surfel_mapping_node.datasets.seven_scenes import SevenScenesDataset

    dataset = SevenScenesDataset(seven_scenes_dir)
    if first + count > len(dataset):
        raise ValueError(
            f"{count} frames from frame {first} need {first + count} frames but {seven_scenes_dir} has "
            f"{len(dataset)}: shorten --seconds or lower --rate"
        )
    camera = dataset.camera
    frames = [dataset[index] for index in range(first, first + count)]

    messages = []
    for frame in frames:
        info = CameraInfo(width=camera.width, height=camera.height, distortion_model="plumb_bob")
        info.header.frame_id = CAMERA_FRAME
        info.d = [0.0] * 5
        info.k = [camera.fx, 0.0, camera.cx, 0.0, camera.fy, camera.cy, 0.0, 0.0, 1.0]
        info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        info.p = [camera.fx, 0.0, camera.cx, 0.0, 0.0, camera.fy, camera.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
        pose = PoseStamped()
        pose.header.frame_id = "map"
        pose.pose = conv.matrix_to_pose(frame.T_world_camera)
        messages.append(
            FrameMessages(
                image=conv.numpy_to_image(frame.image, "rgb8", 0, CAMERA_FRAME),
                depth=conv.numpy_to_image(frame.depth_raw, "16UC1", 0, CAMERA_FRAME),
                camera_info=info,
                pose=pose,
            )
        )
    return LoadedFrames(messages, frames)


# --- the node process ----------------------------------------------------------------


def ros_environment(domain_id: int) -> dict[str, str]:
    """Return the environment variables that keep DDS traffic on this host and domain."""
    return {
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "ROS_DOMAIN_ID": str(domain_id),
        "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
    }


def node_parameters(config: ThroughputConfig, save_path: Path) -> dict[str, Any]:
    """Return the node parameters of a run (the rest keep their defaults)."""
    return {
        "image_qos": config.image_qos,
        "image_queue_size": config.image_queue_size,
        "publish_rate": config.publish_rate_hz,
        "save_path": str(save_path),
    }


def _ros_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


def start_node_process(
    namespace: str, parameters: dict[str, Any], log_path: Path, environment: dict[str, str]
) -> subprocess.Popen:
    """Start the node in its own process, in NAMESPACE, writing its output to LOG_PATH."""
    command = [sys.executable, "-m", "benchmarks.bench_node_throughput", "serve-node"]
    command += ["--ros-args", "-r", f"__ns:={namespace}"]
    for name, value in parameters.items():
        command += ["-p", f"{name}:={_ros_value(value)}"]
    env = {**os.environ, **environment}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    with log_path.open("wb") as log:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def serve_node(ros_args: list[str]) -> int:
    """Entry of the node process: run the node until SIGINT, as surfel_mapping_node.node.main does.

    Beside it, a probe node serves ``node_throughput_probe/counters`` (std_srvs/Trigger),
    which returns the node's counters() as JSON, so the benchmark can read
    them while the node runs. The node publishes no statistics of its own.
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.logging import get_logger
    from rclpy.signals import SignalHandlerOptions
    from std_srvs.srv import Trigger

    from surfel_mapping_node.node import NodeParameterError, SurfelMappingNode

    rclpy.init(args=["serve-node", *ros_args], signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = SurfelMappingNode()
    except NodeParameterError as error:
        get_logger(NODE_NAME).fatal(f"not starting: {error}")
        rclpy.try_shutdown()
        return 2

    def serve_counters(request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        response.success, response.message = True, json.dumps(node.counters())
        return response

    probe = rclpy.create_node(PROBE_NODE_NAME)
    probe.create_service(Trigger, f"{PROBE_NODE_NAME}/counters", serve_counters)
    # The executor of surfel_mapping_node.node.main.
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    executor.add_node(probe)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        probe.destroy_node()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


class ProcessSample(NamedTuple):
    """One sample of the node process."""

    t_s: float  # seconds since the node process started
    rss_bytes: int  # VmRSS
    cpu_s: float  # user + system CPU time of all its threads so far


def sample_process(pid: int, t_s: float) -> ProcessSample | None:
    """Return the memory and CPU time of process PID, or None when it has exited.

    Args:
        pid: the process.
        t_s: the time to record in the sample, s.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    rss_kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
    if rss_kib is None:  # A zombie has no memory left.
        return None
    cpu_s = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return ProcessSample(t_s, rss_kib * 1024, cpu_s)


class _ProcessSampler(threading.Thread):
    def __init__(self, pid: int, started: float) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.started = started
        self.samples: list[ProcessSample] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(SAMPLE_PERIOD_S):
            sample = sample_process(self.pid, time.monotonic() - self.started)
            if sample is None:
                return
            self.samples.append(sample)


def _log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- the run -------------------------------------------------------------------------


def run_throughput(
    messages: list[FrameMessages],
    config: ThroughputConfig,
    work_dir: Path,
    domain_id: int | None = None,
) -> ThroughputResult:
    """Start the node, publish MESSAGES on the config's schedule, and measure what it does.

    Before the measured frames, the first frame is sent, one at a time, until the node
    has fused one. That proves every input reaches it and loads its numba kernels. On
    a loaded machine a DDS reader matched its writer up to about 2 s after the writer
    had matched the reader, and missed what came before. The counters of the result
    cover the measured frames.

    Args:
        messages: config.frame_count frames, from load_frame_messages.
        config: duration, rates and the node's queue and QoS parameters.
        work_dir: folder for the node's log and the saved map.
        domain_id: ROS domain; by default 1 + pid % 100. The node's topics are also
            put in a namespace named after this process, so runs on one domain do
            not see each other.

    Raises:
        ValueError: fewer messages than config.frame_count.
        ImportError: rclpy or a message package is missing.
        NodeRunError: the node did not start, fuse the first frame, respond to a service
            or go idle in time.
    """
    if len(messages) < config.frame_count:
        raise ValueError(
            f"{len(messages)} frames of messages given but the run publishes {config.frame_count} "
            f"({config.seconds:g} s at {config.rate_hz:g} Hz): load more frames"
        )
    domain_id = 1 + os.getpid() % 100 if domain_id is None else domain_id
    environment = ros_environment(domain_id)
    # rmw reads the discovery range when the context starts, and Fast DDS its profile.
    os.environ.update(environment)
    if config.fastdds_profile is None:
        os.environ.pop(FASTDDS_PROFILE_VARIABLE, None)
    else:
        environment[FASTDDS_PROFILE_VARIABLE] = str(Path(config.fastdds_profile).resolve())
        os.environ.update(environment)
    import rclpy

    namespace = f"/node_throughput_{os.getpid()}"
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / "node.log"
    save_path = work_dir / "map.ply"

    # Step 1: the node process, sampled from now on.
    started = time.monotonic()
    process = start_node_process(namespace, node_parameters(config, save_path), log_path, environment)
    sampler = _ProcessSampler(process.pid, started)
    sampler.start()

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    client = _Client(rclpy, context, namespace, config, process, log_path)
    try:
        # Step 2: the node subscribed, fused the first frame, and went idle.
        client.wait_for_node()
        priming_stamps_ns = client.prime(messages[0])
        baseline = client.wait_until_idle()
        subscribed_s = time.monotonic() - started
        time.sleep(config.idle_s)

        # Step 3: publish on schedule.
        publish_start_s = time.monotonic() - started
        sent = client.publish(messages[: config.frame_count], config.rate_hz)
        publish_end_s = time.monotonic() - started

        # Step 4: let the node finish its last frame and publish the map, then save it.
        final = client.wait_until_idle()
        quiet_s = time.monotonic() - started
        saved_surfels = client.save_map()
    finally:
        exit_code = _stop_node(process)
        sampler.stop_event.set()
        sampler.join()
        client.close()
        rclpy.shutdown(context=context)

    return ThroughputResult(
        config=config,
        published=len(sent.stamps_ns),
        published_stamps_ns=sent.stamps_ns,
        priming_stamps_ns=priming_stamps_ns,
        publish_duration_s=publish_end_s - publish_start_s,
        publish_max_lateness_s=sent.max_lateness_s,
        frame_bytes=len(messages[0].image.data) + len(messages[0].depth.data),
        counters=counters_difference(final, baseline),
        final_counters=final,
        maps=list(client.maps),
        paths=list(client.paths),
        saved_surfels=saved_surfels,
        samples=list(sampler.samples),
        subscribed_s=subscribed_s,
        publish_start_s=publish_start_s,
        publish_end_s=publish_end_s,
        quiet_s=quiet_s,
        node_exit_code=exit_code,
        node_log=log_path.read_text(errors="replace") if log_path.exists() else "",
    )


def _frames_seen(counters: dict[str, Any]) -> int:
    """Return the image messages the node's synchronizer matched or dropped."""
    dropped = sum(by_stream.get("image", 0) for by_stream in counters["sync_dropped"].values())
    return counters["sync_matched"] + dropped


def counters_difference(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Return AFTER − BEFORE for every count of the node's counters (nested dicts included).

    Entries that are not counts (flags, stamps) keep their AFTER value.
    """
    difference: dict[str, Any] = {}
    for key, value in after.items():
        previous = before.get(key)
        if isinstance(value, dict):
            difference[key] = counters_difference(value, previous if isinstance(previous, dict) else {})
        elif isinstance(value, int) and not isinstance(value, bool) and not key.endswith("_ns"):
            difference[key] = value - (previous if isinstance(previous, int) else 0)
        else:
            difference[key] = value
    return difference


def _stop_node(process: subprocess.Popen) -> int | None:
    """Stop the node as Ctrl-C would; return its exit code (None if it had to be killed)."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            return process.wait(timeout=NODE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.error("the node process ignored SIGINT for %.0f s: killing it", NODE_STOP_TIMEOUT_S)
            process.kill()
            process.wait()
            return None
    return process.returncode


class _Client:
    """This process's side of the run: publishers of the inputs, subscribers of the outputs."""

    def __init__(
        self,
        rclpy: Any,
        context: Any,
        namespace: str,
        config: ThroughputConfig,
        process: subprocess.Popen,
        log_path: Path,
    ) -> None:
        from geometry_msgs.msg import PoseStamped
        from nav_msgs.msg import Path as PathMsg
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2
        from std_srvs.srv import Trigger

        self._trigger = Trigger
        self._process = process
        self._log_path = log_path
        self._publish_rate_hz = config.publish_rate_hz
        self.node = rclpy.create_node("node_throughput_client", namespace=namespace, context=context)
        # Reliable publishers match both of the node's image QoS choices; deep enough
        # that this side never discards a frame the node could still take.
        inputs = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=max(config.image_queue_size, 10),
            reliability=ReliabilityPolicy.RELIABLE,
        )
        self.image_pub = self.node.create_publisher(Image, "image", inputs)
        self.depth_pub = self.node.create_publisher(Image, "depth", inputs)
        self.info_pub = self.node.create_publisher(CameraInfo, "camera_info", inputs)
        self.pose_pub = self.node.create_publisher(PoseStamped, "pose", inputs)

        outputs = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=10,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
        self.maps: list[MapReceipt] = []
        self.paths: list[PathReceipt] = []
        self.node.create_subscription(PointCloud2, f"{NODE_NAME}/map", self._on_map, outputs)
        self.node.create_subscription(PathMsg, f"{NODE_NAME}/keyframe_path", self._on_path, outputs)
        self.save_client = self.node.create_client(Trigger, f"{NODE_NAME}/save_map")
        self.counters_client = self.node.create_client(Trigger, f"{PROBE_NODE_NAME}/counters")

        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_map(self, msg: Any) -> None:
        from surfel_mapping_node.ros_conversions import stamp_to_ns

        self.maps.append(MapReceipt(time.time_ns(), stamp_to_ns(msg.header.stamp), int(msg.width)))

    def _on_path(self, msg: Any) -> None:
        from surfel_mapping_node.ros_conversions import stamp_to_ns

        stamps = [stamp_to_ns(pose.header.stamp) for pose in msg.poses]
        self.paths.append(PathReceipt(time.time_ns(), stamps))

    def _fail(self, what: str) -> NodeRunError:
        state = "running" if self._process.poll() is None else f"exited with code {self._process.returncode}"
        return NodeRunError(f"{what} (node process {state}); its log ends:\n{_log_tail(self._log_path)}")

    def wait_for_node(self) -> None:
        """Wait until the node subscribed to every input and its counters service responds.

        Raises:
            NodeRunError: the node process exited or took longer than NODE_START_TIMEOUT_S.
        """
        publishers = (self.image_pub, self.depth_pub, self.info_pub, self.pose_pub)
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise self._fail(
                    f"the node process exited with code {self._process.returncode} before subscribing"
                )
            if (
                all(p.get_subscription_count() > 0 for p in publishers)
                and self.counters_client.service_is_ready()
            ):
                return
            time.sleep(0.05)
        raise self._fail(f"the node did not subscribe within {NODE_START_TIMEOUT_S:.0f} s")

    def _call(self, client: Any, timeout_s: float) -> Any:
        future = client.call_async(self._trigger.Request())
        deadline = time.monotonic() + timeout_s
        while not future.done() and time.monotonic() < deadline and self._process.poll() is None:
            time.sleep(0.02)
        if not future.done():
            raise self._fail(f"{client.srv_name} timed out after {timeout_s:.0f} s")
        return future.result()

    def counters(self) -> dict[str, Any]:
        """Return the node's counters() now."""
        return json.loads(self._call(self.counters_client, 30.0).message)

    def prime(self, frame: FrameMessages) -> list[int]:
        """Send FRAME until the node has fused one; return the stamps sent.

        A frame goes out only when the previous one was matched or dropped by the
        synchronizer, or after PRIME_PERIOD_S (a frame sent before the node's reader
        had matched this writer never arrives), so at most one is in flight.

        Raises:
            NodeRunError: no frame fused within NODE_START_TIMEOUT_S.
        """
        stamps_ns = []
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            before = _frames_seen(self.counters())
            stamps_ns.append(self._send(frame))
            sent = time.monotonic()
            while True:
                counters = self.counters()
                if counters["frames_processed"] > 0:
                    return stamps_ns
                if _frames_seen(counters) > before or time.monotonic() - sent > PRIME_PERIOD_S:
                    break
                time.sleep(0.05)
        raise self._fail(
            f"the node fused none of {len(stamps_ns)} frames sent over {NODE_START_TIMEOUT_S:.0f} s"
        )

    def wait_until_idle(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until the node has handled every matched frame, its counters stopped
        changing and its last map publication arrived here; return its counters.

        The counters must stay the same over IDLE_STEADY_S (or two publish periods) and
        three responses that each came within PROMPT_RESPONSE_S. A slow response means
        that the node's executor was blocked, so messages may still wait in its DDS queues.

        Raises:
            NodeRunError: not idle within TIMEOUT_S.
        """
        steady_s = max(IDLE_STEADY_S, 2.0 / self._publish_rate_hz)
        deadline = time.monotonic() + timeout_s
        previous, steady_since, prompt_responses = None, time.monotonic(), 0
        while time.monotonic() < deadline:
            requested = time.monotonic()
            counters = self.counters()
            prompt = time.monotonic() - requested <= PROMPT_RESPONSE_S
            if counters != previous or not prompt:
                previous, steady_since, prompt_responses = counters, time.monotonic(), 0
            else:
                prompt_responses += 1
                steady = time.monotonic() - steady_since >= steady_s and prompt_responses >= 3
                if steady and self._is_idle(counters):
                    return counters
            time.sleep(0.2)
        raise self._fail(f"the node did not go idle within {timeout_s:.0f} s: {previous}")

    def _is_idle(self, counters: dict[str, Any]) -> bool:
        handled = (
            counters["frames_processed"]
            + counters["frames_skipped_busy"]
            + sum(counters["dropped"].get(reason, 0) for reason in FRAME_DROP_REASONS)
        )
        last_map_here = bool(self.maps) and self.maps[-1].stamp_ns == counters["last_publish_stamp_ns"]
        return handled == counters["sync_matched"] and counters["map_published"] and last_map_here

    def _send(self, frame: FrameMessages) -> int:
        from surfel_mapping_node.ros_conversions import ns_to_stamp

        stamp_ns = time.time_ns()
        stamp = ns_to_stamp(stamp_ns)
        for msg in (frame.camera_info, frame.image, frame.depth, frame.pose):
            msg.header.stamp = stamp
        self.info_pub.publish(frame.camera_info)
        self.image_pub.publish(frame.image)
        self.depth_pub.publish(frame.depth)
        self.pose_pub.publish(frame.pose)
        return stamp_ns

    def publish(self, messages: list[FrameMessages], rate_hz: float) -> PublishedFrames:
        """Publish one frame per period on an absolute schedule.

        Each frame is stamped with the wall clock when it is sent, as a driver would
        stamp it at capture, so stamps compare with receipt times in other processes.
        """
        period_s = 1.0 / rate_hz
        start = time.monotonic() + period_s
        stamps_ns = []
        worst_lateness_s = 0.0
        for index, frame in enumerate(messages):
            due = start + index * period_s
            remaining = due - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)
            worst_lateness_s = max(worst_lateness_s, time.monotonic() - due)
            stamps_ns.append(self._send(frame))
        return PublishedFrames(stamps_ns, worst_lateness_s)

    def save_map(self) -> int | None:
        """Call ~/save_map; return the number of surfels in the written PLY (None if it failed).

        Raises:
            NodeRunError: the service did not respond within 60 s.
        """
        from surfel_mapping_node.ply_io import read_surfel_ply

        response = self._call(self.save_client, 60.0)
        if not response.success:
            logger.error("~/save_map failed: %s", response.message)
            return None
        return len(read_surfel_ply(response.message))

    def close(self) -> None:
        self.executor.shutdown()
        self.thread.join(timeout=10.0)
        self.node.destroy_node()


# --- the offline peer ----------------------------------------------------------------


def time_offline_mapper(frames: list) -> OfflineTiming:
    """Time SurfelMapper (depth decoding included) on FRAMES in order.

    The first frame is integrated once before timing, in a mapper of its own, so
    that the numba kernels are loaded.
    """
    from surfel_mapping_node.config import MapperConfig
    from surfel_mapping_node.depth import decode_depth
    from surfel_mapping_node.mapper import SurfelMapper

    config = MapperConfig()

    def integrate(mapper: SurfelMapper, frame: Any) -> None:
        depth_m = decode_depth(
            frame.depth_raw, frame.depth_scale, config.depth.min_depth_m, config.depth.max_depth_m
        )
        mapper.integrate(frame.image, depth_m, frame.T_world_camera, frame.stamp_ns)

    integrate(SurfelMapper(config, frames[0].camera), frames[0])
    mapper = SurfelMapper(config, frames[0].camera)
    timing = OfflineTiming(wall_ms=[], cpu_ms=[])
    for frame in frames:
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        integrate(mapper, frame)
        timing.wall_ms.append((time.perf_counter() - wall_start) * 1e3)
        timing.cpu_ms.append((time.process_time() - cpu_start) * 1e3)
    return timing


# --- report --------------------------------------------------------------------------


def _mib(size_bytes: float) -> str:
    return f"{size_bytes / 2**20:.0f} MiB"


def _percentiles(values: list[float]) -> str:
    if not values:
        return "none measured"
    p50, p90 = np.percentile(values, [50, 90])
    return f"p50 {p50 * 1e3:.0f} ms, p90 {p90 * 1e3:.0f} ms (n = {len(values)})"


def _result_rows(result: ThroughputResult, offline: OfflineTiming | None) -> dict[str, str]:
    """Return the report's rows (measure -> value) of one run."""
    published = result.published
    drops_sync = ", ".join(f"{k} {v}" for k, v in result.image_drops_in_sync.items()) or "none"
    drops_node = ", ".join(f"{k} {v}" for k, v in result.frame_drops_in_node.items()) or "none"
    latencies = list(result.keyframe_latencies_s().values())
    last_map_width = result.maps[-1].width if result.maps else 0
    not_fused = result.dropped + result.unaccounted

    # Memory and CPU of the node process.
    rss_idle = result.sample_at(result.publish_start_s).rss_bytes
    rss_end = result.sample_at(result.publish_end_s).rss_bytes
    rss_quiet = result.sample_at(result.quiet_s).rss_bytes
    rss_peak = max(sample.rss_bytes for sample in result.samples)
    growth_per_published = (rss_end - rss_idle) / (published * result.frame_bytes)
    idle_share = result.cpu_share(result.subscribed_s, result.publish_start_s)
    busy_share = result.cpu_share(result.publish_start_s, result.publish_end_s)
    cpu_run_s = result.sample_at(result.quiet_s).cpu_s - result.sample_at(result.publish_start_s).cpu_s
    node_cpu_ms = 1e3 * cpu_run_s / max(result.fused, 1)
    node_wall_ms = 1e3 * result.publish_duration_s / max(result.fused, 1)

    rows = {
        "frames published": f"{published} in {result.publish_duration_s:.2f} s "
        f"(publisher at most {result.publish_max_lateness_s * 1e3:.0f} ms late)",
        "frames fused": f"{result.fused} ({result.fused / result.publish_duration_s:.1f} Hz)",
        "frames not fused (target: at most 5 %)": f"{not_fused} ({100 * not_fused / published:.1f} %)",
        "— counted by the node": f"{result.dropped} ({100 * result.dropped / published:.1f} %)",
        "—— skipped while the mapper was busy": str(result.skipped_busy),
        "—— dropped by the synchronizer (image stream)": drops_sync,
        "—— dropped after matching": drops_node,
        "— lost before the node's callbacks, not counted (published − fused − counted)": (
            f"{result.unaccounted} ({100 * result.unaccounted / published:.1f} %)"
        ),
        "latency, image stamp → receipt of the first map update holding it (keyframes)": _percentiles(
            latencies
        ),
        "~/map publication → receipt": _percentiles(result.map_transport_latencies_s()),
        "map updates received; surfels in the last one; in the PLY saved at the end": (
            f"{len(result.maps)}; {last_map_width}; {result.saved_surfels}"
        ),
        "node RSS idle / end of publishing / after the last map / peak": (
            f"{_mib(rss_idle)} / {_mib(rss_end)} / {_mib(rss_quiet)} / {_mib(rss_peak)}"
        ),
        "node RSS growth while publishing, per byte of frames published": f"{growth_per_published:.3f}",
        "node CPU idle (subscribed, no frames) / while publishing, share of one core": (
            f"{100 * idle_share:.0f} % / {100 * busy_share:.0f} %"
        ),
        "node CPU per fused frame": f"{node_cpu_ms:.0f} ms",
        "node wall time per fused frame (publishing time / fused)": f"{node_wall_ms:.0f} ms",
    }
    if offline is not None:
        offline_wall = float(np.median(offline.wall_ms))
        offline_cpu = float(np.median(offline.cpu_ms))
        rows["node CPU per fused frame / offline CPU per frame"] = f"{node_cpu_ms / offline_cpu:.2f}×"
        rows["node wall time per fused frame / offline wall time per frame"] = (
            f"{node_wall_ms / offline_wall:.2f}×"
        )
    return rows


def report_markdown(results: list[ThroughputResult], offline: OfflineTiming | None) -> str:
    """Return the benchmark's section of docs/benchmarks.md: one column per run."""
    first = results[0].config
    columns = [
        f"image_qos={r.config.image_qos}, image_queue_size={r.config.image_queue_size}" for r in results
    ]
    rows = [_result_rows(result, offline) for result in results]
    table = [
        "| measure | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(f"| {name} | " + " | ".join(r[name] for r in rows) + " |" for name in rows[0]),
    ]
    verdicts = []
    for column, result in zip(columns, results, strict=True):
        not_fused = result.dropped + result.unaccounted
        share = 100 * not_fused / result.published
        verdicts.append(f"{column}: {'met' if share <= 5 else 'missed'} ({share:.0f} % not fused)")

    lines = [
        f"The node runs in its own process (rclpy, Fast DDS, loopback only). It gets {results[0].published} "
        f"real 7-Scenes frames at {first.rate_hz:g} Hz for {first.seconds:g} s: 640×480 rgb8, 16UC1 depth "
        "in mm, camera_info and the true PoseStamped, preloaded and stamped with the wall clock when sent. "
        f"The node runs with publish_rate={first.publish_rate_hz:g} Hz and its other parameters at their "
        "defaults. Before the measured frames, the first frame was sent, one at a time, until the node had "
        "fused one, so that its inputs are matched and its kernels loaded; the counts below leave those "
        "out. One run per column, one after the other.",
        "",
        _transport_sentence(first.fastdds_profile),
        "",
        *table,
        "",
    ]
    if offline is not None:
        lines += [
            f"Offline peer, same frames, same run: SurfelMapper (depth decoding included) takes median "
            f"{np.median(offline.wall_ms):.0f} ms wall and {np.median(offline.cpu_ms):.0f} ms CPU per frame "
            f"over all {len(offline.wall_ms)} frames in order ({1e3 / np.median(offline.wall_ms):.1f} Hz).",
            "",
        ]
    lines += [
        f"Target, at most 5 % of the frames not fused at {first.rate_hz:g} Hz: " + "; ".join(verdicts) + ".",
        "",
        "- The node integrates the newest matched frame and skips (and counts) those that arrive while it "
        "is busy, so it fuses at about 1 / (its time per frame), and its memory stays flat.",
        "- Frames lost before the node's callbacks are missing from its counters. They are lost inside DDS: "
        "a KEEP_LAST reader queue overwrites frames that the callbacks have not taken yet, and best effort "
        "does not resend lost fragments of messages too large for the shared-memory segment.",
        "- The latency is sampled at keyframes, the only frames whose stamps a subscriber can see "
        "(in ~/keyframe_path). It includes the wait for the next publication (period "
        f"{1e3 / first.publish_rate_hz:.0f} ms).",
        "- The node's CPU per fused frame includes receiving and decoding every published frame, so when "
        "it skips frames, their reception is charged to the frames it fused.",
        "- The publisher of this benchmark is a Python process that serializes about 90 MB/s of images; "
        "it and the DDS transport share the two cores with the node. The node's CPU per fused frame "
        "beyond the offline peer's is what receiving, deserializing and decoding the messages costs.",
        "- Other jobs shared the CPU cores, so wall times are noisy; CPU times vary less.",
    ]
    return "\n".join(lines)


def _transport_sentence(fastdds_profile: Path | None) -> str:
    if fastdds_profile is None:
        return (
            "Transport: Fast DDS with its defaults in both processes (shared memory in 512 KiB "
            "segments, so each image travels in fragments)."
        )
    name = Path(fastdds_profile).resolve()
    display_path = name.relative_to(REPO_ROOT) if name.is_relative_to(REPO_ROOT) else name
    return (
        f"Transport: Fast DDS with the profile {display_path} in both processes "
        "(FASTRTPS_DEFAULT_PROFILES_FILE, as the package's launch files set it)."
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-node"]:
        return serve_node(argv[1:])

    parser = argparse.ArgumentParser(
        description="Throughput of surfel_mapping_node at 30 Hz RGB-D over DDS (writes docs/benchmarks.md).",
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA_DIR, help="folder that contains 7scenes_redkitchen/"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to publish, s (default 10)")
    parser.add_argument("--rate", type=float, default=30.0, help="frame rate, Hz (default 30)")
    parser.add_argument(
        "--image-qos",
        choices=("sensor_data", "reliable"),
        nargs="+",
        default=["sensor_data", "reliable"],
        help="the node's image_qos, one run each (default: both, its default sensor_data first)",
    )
    parser.add_argument(
        "--image-queue-size", type=int, default=10, help="the node's image_queue_size (default 10)"
    )
    parser.add_argument(
        "--publish-rate", type=float, default=1.0, help="the node's publish_rate, Hz (default 1)"
    )
    parser.add_argument(
        "--fastdds-profile",
        default=str(PACKAGE_FASTDDS_PROFILE.relative_to(REPO_ROOT)),
        help="Fast DDS XML profile of both processes, or 'none' for Fast DDS's defaults "
        "(default: the one the launch files use)",
    )
    parser.add_argument(
        "--no-report", action="store_true", help="print the results; leave docs/benchmarks.md"
    )
    args = parser.parse_args(argv)
    fastdds_profile = None if args.fastdds_profile == "none" else Path(args.fastdds_profile)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        configs = [
            ThroughputConfig(
                seconds=args.seconds,
                rate_hz=args.rate,
                image_qos=image_qos,
                image_queue_size=args.image_queue_size,
                publish_rate_hz=args.publish_rate,
                fastdds_profile=fastdds_profile,
            )
            for image_qos in args.image_qos
        ]
        seven_scenes_dir = args.data / SEVEN_SCENES_FOLDER
        print(f"loading {configs[0].frame_count} frames from {seven_scenes_dir} ...")
        messages, frames = load_frame_messages(
            seven_scenes_dir, configs[0].first_frame, configs[0].frame_count
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        print(
            f"error: rclpy or a ROS 2 message package is missing ({error}); "
            "install them with: pip install -r requirements/ros.txt",
            file=sys.stderr,
        )
        return 2

    results = []
    for config in configs:
        print(f"running the node ({config.image_qos}) for {config.seconds:g} s at {config.rate_hz:g} Hz ...")
        with tempfile.TemporaryDirectory(prefix="node_throughput_") as work_dir:
            try:
                results.append(run_throughput(messages, config, Path(work_dir)))
            except NodeRunError as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
    del messages
    print(f"timing the offline mapper on the same {len(frames)} frames ...")
    offline = time_offline_mapper(frames)

    markdown = report_markdown(results, offline)
    print(markdown)
    if not args.no_report:
        if fastdds_profile is None:
            path = write_section(
                "node_throughput_fastdds_defaults",
                "surfel_mapping_node at 30 Hz RGB-D, Fast DDS defaults",
                markdown,
            )
        else:
            path = write_section("node_throughput", "surfel_mapping_node at 30 Hz RGB-D", markdown)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
