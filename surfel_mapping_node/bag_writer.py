"""Write recorded frames (7-Scenes, KITTI, TUM, ...) into a ROS 2 bag the mapping node can play.

Use :func:`write_bag` to turn any sequence of :class:`~surfel_mapping_node.datasets.base.Frame`
into a rosbag2 directory: mcap or sqlite3 storage, metadata version 9 as ROS 2 Jazzy
writes it, and a ``metadata.yaml``. Where rosbag2 is installed, ``ros2 bag info`` and
``ros2 bag play`` read it; elsewhere :mod:`surfel_mapping_node.bag_replay` plays it.
No ROS install is needed, because rosbags serializes the messages.

Messages written per frame, with the topics and frames of :mod:`surfel_mapping_node.topics`:

- RGB-D: the image (``rgb8`` for color, ``mono8`` for intensity), the registered depth
  and one CameraInfo, all in the color optical frame. Depth follows REP 118: uint16
  millimetres (``depth_scale`` 0.001, 7-Scenes) are written verbatim as ``16UC1``,
  invalid values (0, and 65535 in 7-Scenes) included; uint16 depth in any other unit
  (TUM's factor 5000) becomes ``32FC1`` metres with NaN for 0, which keeps TUM's
  0.2 mm steps (float32 resolves 1 µm up to TUM's 13.1 m) where millimetres would
  round them away; float32 depth (metres) is written verbatim as ``32FC1``.
- Stereo: the rectified left and right ``mono8``/``rgb8`` images and a CameraInfo per
  camera; the right camera's P has P[0, 3] = -fx * baseline_m (REP 104).
- The ground-truth pose as the SLAM pose: PoseStamped, camera-to-map, frame_id ``map``.
- At each keyframe, the keyframe Path: the poses of all keyframes so far, each pose
  stamped with its keyframe's image stamp.

Every message is stamped with the frame's ``stamp_ns`` (header and bag time alike).
CameraInfo carries the ``plumb_bob`` model with zero distortion, since every supported
dataset ships undistorted or rectified images.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.config import KeyframeConfig
from surfel_mapping_node.datasets.base import Frame
from surfel_mapping_node.depth import MILLIMETRES_SCALE
from surfel_mapping_node.poses import check_pose, matrix_to_quaternion, quaternion_to_matrix, relative_motion
from surfel_mapping_node.topics import (
    CAMERA_INFO_TYPE,
    COLOR_OPTICAL_FRAME,
    DEFAULT_TOPICS,
    DEPTH_OPTICAL_FRAME,
    IMAGE_TYPE,
    KEYFRAMES_FROM_DATASET,
    LEFT_OPTICAL_FRAME,
    MAP_FRAME,
    METADATA_KEYFRAMES,
    PATH_TYPE,
    POSE_TYPE,
    RIGHT_OPTICAL_FRAME,
    TopicNames,
)

logger = logging.getLogger(__name__)

# rosbag2 metadata version written by ROS 2 Jazzy.
BAG_VERSION = 9
# History depth recorded as the publishers' offered QoS (reliable, volatile, keep last).
OFFERED_QOS_DEPTH = 10
# Files a bag directory written by rosbag2 or rosbags may contain; --overwrite deletes
# only directories made of these, never an arbitrary folder given by mistake.
BAG_FILE_SUFFIXES = (".mcap", ".db3", ".db3-shm", ".db3-wal", ".zstd", ".yaml")


class BagStorage(str, Enum):
    """rosbag2 storage plugin of a written bag."""

    MCAP = "mcap"
    SQLITE3 = "sqlite3"


class BagOutputError(ValueError):
    """The bag cannot be written where it was asked for."""


class FrameEncodingError(ValueError):
    """A frame whose data has no ROS message encoding in this converter."""


@dataclass(frozen=True)
class KeyframeRule:
    """How the converter picks the keyframes it publishes in the keyframe Path.

    By default a frame is a keyframe when it moved or turned more than the mapper's
    keyframe thresholds (config ``keyframes``) since the last keyframe. The mapper
    applies the same rule itself, so a node fed the Path makes the keyframes it would
    make alone. The first written frame is always a keyframe. The rule is recorded in
    the bag's metadata (custom_data ``surfel_perception.keyframes``).
    """

    # Every N-th written frame is a keyframe; 0 selects by motion instead.
    every_n_frames: int = 0
    min_translation_m: float = KeyframeConfig.min_translation_m
    min_rotation_deg: float = KeyframeConfig.min_rotation_deg
    # Take exactly the frames the dataset marks (Frame.keyframe_id set) instead.
    from_dataset: bool = False

    def __post_init__(self) -> None:
        if self.every_n_frames < 0:
            raise ValueError(
                f"invalid keyframe interval {self.every_n_frames}: "
                "use N >= 1 frames, or 0 to select by motion"
            )
        if not (self.min_translation_m >= 0 and self.min_rotation_deg >= 0):
            raise ValueError(
                f"invalid keyframe motion thresholds {self.min_translation_m} m, "
                f"{self.min_rotation_deg} deg: use values >= 0"
            )

    def is_keyframe(self, frame: Frame, position: int, T_world_last_keyframe: np.ndarray | None) -> bool:
        """Return whether FRAME, the POSITION-th written frame, becomes a keyframe."""
        if self.from_dataset:
            return frame.keyframe_id is not None
        if T_world_last_keyframe is None:
            return True
        if self.every_n_frames:
            return position % self.every_n_frames == 0
        translation_m, rotation_rad = relative_motion(T_world_last_keyframe, frame.T_world_camera)
        return translation_m > self.min_translation_m or math.degrees(rotation_rad) > self.min_rotation_deg

    @classmethod
    def from_config(cls, config: KeyframeConfig, every_n_frames: int = 0) -> KeyframeRule:
        """Return the rule with the motion thresholds of a mapper config's ``keyframes`` section."""
        return cls(every_n_frames, config.min_translation_m, config.min_rotation_deg)

    def describe(self) -> str:
        """Return the rule as recorded in the bag metadata: "dataset", "every_n" or "motion"."""
        if self.from_dataset:
            return KEYFRAMES_FROM_DATASET
        return "every_n" if self.every_n_frames else "motion"


class EncodedImage(NamedTuple):
    """Pixels ready for a sensor_msgs/Image, and the encoding that names them."""

    encoding: str
    # C-contiguous (H, W) or (H, W, C) array.
    pixels: np.ndarray


@dataclass
class BagSummary:
    """Counts and time span of a bag written by :func:`write_bag`."""

    path: Path
    storage: BagStorage
    # "rgbd" or "stereo".
    kind: str
    frames: int
    keyframes: int
    message_counts: dict[str, int] = field(default_factory=dict)
    start_ns: int = 0
    end_ns: int = 0
    # Largest change of a rotation-matrix entry when poses became quaternions: nonzero
    # when the dataset's rotations are not exactly orthonormal.
    max_rotation_change: float = 0.0


def check_output_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Check that a bag can be created at OUT_DIR before any work starts; return it absolute.

    Raises:
        BagOutputError: OUT_DIR exists (and ``overwrite`` is false, or it is not a bag
            directory), or the folder it would be created in is not writable.
    """
    out_dir = Path(out_dir).expanduser().absolute()

    if out_dir.exists():
        if not overwrite:
            raise BagOutputError(
                f"output bag {out_dir} exists already: choose another --out or pass --overwrite to replace it"
            )
        _check_replaceable_bag(out_dir)

    # Missing parent folders are created later, so the first existing one must be writable.
    ancestor = out_dir.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BagOutputError(f"cannot write bag {out_dir}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise BagOutputError(
            f"cannot write bag {out_dir}: folder {ancestor} is not writable; "
            "choose an --out in a writable folder"
        )
    return out_dir


def write_bag(
    frames: Iterable[Frame],
    out_dir: str | Path,
    *,
    storage: BagStorage | str = BagStorage.MCAP,
    keyframes: KeyframeRule | None = None,
    topics: TopicNames = DEFAULT_TOPICS,
    overwrite: bool = False,
    custom_data: Mapping[str, str] | None = None,
) -> BagSummary:
    """Write FRAMES into a new rosbag2 directory OUT_DIR; return what was written.

    The bag is built in a hidden folder next to OUT_DIR and moved into place when
    complete, so an interrupted conversion leaves no half-written bag behind.

    Args:
        frames: frames in time order (strictly increasing ``stamp_ns``), all RGB-D
            (``depth_raw`` set) or all stereo (``right_image`` and ``baseline_m`` set).
        out_dir: the bag directory to create; missing parent folders are created.
        storage: ``"mcap"`` (the Jazzy default) or ``"sqlite3"``.
        keyframes: how keyframes are picked; defaults to the mapper's motion thresholds.
        topics: topic names, the defaults of :mod:`surfel_mapping_node.topics` unless given.
        overwrite: replace an existing bag directory at OUT_DIR.
        custom_data: strings stored in ``metadata.yaml`` under ``custom_data`` (provenance).

    Raises:
        BagOutputError: OUT_DIR cannot be written (see :func:`check_output_dir`).
        FrameEncodingError: a frame has an unsupported image or depth type, mixes RGB-D
            and stereo, or its stamp does not increase.
        ValueError: an invalid storage name; InvalidPoseError for a non-rigid pose.
    """
    from rosbags.rosbag2 import Writer

    storage = _parse_storage(storage)
    keyframes = keyframes or KeyframeRule()
    out_dir = check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    staging_root = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    staging = staging_root / out_dir.name
    try:
        writer = Writer(staging, version=BAG_VERSION, storage_plugin=_plugin(storage))
        for key, value in (custom_data or {}).items():
            writer.set_custom_data(key, str(value))
        writer.set_custom_data(METADATA_KEYFRAMES, keyframes.describe())
        with writer:
            encoder = _BagEncoder(writer, topics, keyframes)
            for frame in frames:
                encoder.write_frame(frame)
            if encoder.frames == 0:
                raise FrameEncodingError(
                    "no frames to write: the dataset selection is empty; check --first and --max-frames"
                )
        summary = encoder.summary(out_dir, storage)

        if out_dir.exists():
            _check_replaceable_bag(out_dir)
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)

    logger.info(
        "wrote %s bag %s: %d frames, %d keyframes, %d messages",
        storage.value, out_dir, summary.frames, summary.keyframes, sum(summary.message_counts.values()),
    )
    if summary.max_rotation_change > 1e-9:
        logger.info(
            "pose rotations were not exactly orthonormal: the bag contains their nearest rotations "
            "(largest matrix entry change %.2g)", summary.max_rotation_change,
        )
    return summary


def encode_image(image: np.ndarray, what: str = "image") -> EncodedImage:
    """Return the sensor_msgs/Image encoding and the C-contiguous pixels of an 8-bit image.

    Args:
        image: (H, W) uint8 intensity (``mono8``) or (H, W, 3) uint8 RGB (``rgb8``).

    Raises:
        FrameEncodingError: for any other dtype or shape.
    """
    image = np.asarray(image)
    if image.dtype == np.uint8 and image.ndim == 2:
        return EncodedImage("mono8", np.ascontiguousarray(image))
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return EncodedImage("rgb8", np.ascontiguousarray(image))
    raise FrameEncodingError(
        f"unsupported {what}: dtype {image.dtype}, shape {image.shape}; "
        "expected (H, W) uint8 intensity or (H, W, 3) uint8 RGB"
    )


def encode_depth(depth_raw: np.ndarray, depth_scale: float) -> EncodedImage:
    """Return the REP 118 encoding and pixels of a stored depth image.

    Args:
        depth_raw: (H, W) uint16 depth in units of ``depth_scale`` metres, or float32 metres.
        depth_scale: metres per unit of uint16 depth.

    Returns:
        ``16UC1`` uint16 millimetres as stored when the scale is 0.001 m; otherwise
        ``32FC1`` float32 metres, with NaN where uint16 depth is 0 (no measurement).

    Raises:
        FrameEncodingError: another dtype or shape, or a non-positive scale.
    """
    depth_raw = np.asarray(depth_raw)
    if depth_raw.ndim != 2:
        raise FrameEncodingError(f"unsupported depth shape {depth_raw.shape}: expected (H, W)")

    if depth_raw.dtype == np.float32:
        return EncodedImage("32FC1", np.ascontiguousarray(depth_raw))
    if depth_raw.dtype != np.uint16:
        raise FrameEncodingError(
            f"unsupported depth dtype {depth_raw.dtype}: "
            "expected uint16 (units of depth_scale) or float32 metres"
        )
    if not (math.isfinite(depth_scale) and depth_scale > 0):
        raise FrameEncodingError(
            f"invalid depth_scale {depth_scale}: use metres per unit > 0 (0.001 for millimetres)"
        )

    # REP 118 millimetres are kept as stored.
    if math.isclose(depth_scale, MILLIMETRES_SCALE, rel_tol=1e-9):
        return EncodedImage("16UC1", np.ascontiguousarray(depth_raw))
    depth_m = (depth_raw.astype(np.float64) * depth_scale).astype(np.float32)
    depth_m[depth_raw == 0] = np.nan
    return EncodedImage("32FC1", depth_m)


class _BagEncoder:
    """Serializes frames into an open rosbags Writer, one connection per topic."""

    def __init__(self, writer: Any, topics: TopicNames, keyframes: KeyframeRule) -> None:
        from rosbags.typesys import Stores, get_typestore

        self.writer = writer
        self.topics = topics
        self.keyframe_rule = keyframes
        self.typestore = get_typestore(Stores.ROS2_JAZZY)
        self.types = self.typestore.types
        self.connections: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.kind: str | None = None
        self.camera: PinholeCamera | None = None
        self.frames = 0
        self.keyframe_poses: list[Any] = []
        self.T_world_last_keyframe: np.ndarray | None = None
        self.first_stamp_ns: int | None = None
        self.last_stamp_ns: int | None = None
        self.max_rotation_change = 0.0

    def write_frame(self, frame: Frame) -> None:
        # Validate the whole frame before writing any of its messages.
        kind = self._frame_kind(frame)
        stamp_ns = self._check_stamp(frame)
        T_world_camera = check_pose(frame.T_world_camera, f"pose of frame {frame.index}")
        image = encode_image(frame.image)
        frame.camera.check_image_shape(image.pixels.shape, "image")
        if kind == "rgbd":
            frame.camera.check_image_shape(frame.depth_raw.shape, "depth image")
            depth = encode_depth(frame.depth_raw, frame.depth_scale)
        else:
            frame.camera.check_image_shape(frame.right_image.shape, "right image")
            right = encode_image(frame.right_image, "right image")
            if not (math.isfinite(frame.baseline_m) and frame.baseline_m > 0):
                raise FrameEncodingError(
                    f"invalid stereo baseline {frame.baseline_m} m in frame {frame.index}: it must be > 0"
                )
        if self.camera is not None and frame.camera != self.camera:
            logger.warning("frame %d: camera intrinsics changed to %s", frame.index, frame.camera)
        self.camera = frame.camera

        # Sensor messages, then the pose, then the keyframe Path: a subscriber that
        # matches by stamp has everything when the pose of the frame arrives.
        topics = self.topics
        if kind == "rgbd":
            header = self._header(stamp_ns, COLOR_OPTICAL_FRAME)
            depth_header = self._header(stamp_ns, DEPTH_OPTICAL_FRAME)
            messages = [
                (topics.image, IMAGE_TYPE, self._image(header, image)),
                (topics.depth, IMAGE_TYPE, self._image(depth_header, depth)),
                (topics.camera_info, CAMERA_INFO_TYPE, self._camera_info(header, frame.camera)),
            ]
        else:
            left_header = self._header(stamp_ns, LEFT_OPTICAL_FRAME)
            right_header = self._header(stamp_ns, RIGHT_OPTICAL_FRAME)
            messages = [
                (topics.left_image, IMAGE_TYPE, self._image(left_header, image)),
                (topics.right_image, IMAGE_TYPE, self._image(right_header, right)),
                (topics.left_camera_info, CAMERA_INFO_TYPE, self._camera_info(left_header, frame.camera)),
                (
                    topics.right_camera_info,
                    CAMERA_INFO_TYPE,
                    self._camera_info(right_header, frame.camera, float(frame.baseline_m)),
                ),
            ]
        for topic, msgtype, message in messages:
            self._write(topic, msgtype, stamp_ns, message)

        pose = self._pose_stamped(stamp_ns, T_world_camera)
        self._write(topics.pose, POSE_TYPE, stamp_ns, pose)

        if self.keyframe_rule.is_keyframe(frame, self.frames, self.T_world_last_keyframe):
            self.keyframe_poses.append(pose)
            self.T_world_last_keyframe = T_world_camera
            path_header = self._header(stamp_ns, MAP_FRAME)
            path = self.types[PATH_TYPE](header=path_header, poses=list(self.keyframe_poses))
            self._write(topics.keyframes, PATH_TYPE, stamp_ns, path)

        self.frames += 1

    def summary(self, path: Path, storage: BagStorage) -> BagSummary:
        return BagSummary(
            path=path,
            storage=storage,
            kind=self.kind or "",
            frames=self.frames,
            keyframes=len(self.keyframe_poses),
            message_counts=dict(self.counts),
            start_ns=self.first_stamp_ns or 0,
            end_ns=self.last_stamp_ns or 0,
            max_rotation_change=self.max_rotation_change,
        )

    def _frame_kind(self, frame: Frame) -> str:
        if frame.depth_raw is not None:
            kind = "rgbd"
        elif frame.right_image is not None and frame.baseline_m is not None:
            kind = "stereo"
        else:
            raise FrameEncodingError(
                f"frame {frame.index} has neither depth_raw nor right_image with baseline_m: "
                "a bag needs RGB-D or stereo frames"
            )
        if self.kind is None:
            self.kind = kind
        elif kind != self.kind:
            raise FrameEncodingError(
                f"frame {frame.index} is {kind} but the bag started as {self.kind}: "
                "one bag holds one kind of sensor"
            )
        return kind

    def _check_stamp(self, frame: Frame) -> int:
        stamp_ns = int(frame.stamp_ns)
        if stamp_ns < 0:
            raise FrameEncodingError(
                f"invalid stamp {stamp_ns} ns in frame {frame.index}: stamps must be >= 0"
            )
        if self.last_stamp_ns is not None and stamp_ns <= self.last_stamp_ns:
            raise FrameEncodingError(
                f"stamp {stamp_ns} ns of frame {frame.index} does not increase "
                f"(previous {self.last_stamp_ns} ns): frames are matched by stamp, so each needs a later one"
            )
        if self.first_stamp_ns is None:
            self.first_stamp_ns = stamp_ns
        self.last_stamp_ns = stamp_ns
        return stamp_ns

    def _write(self, topic: str, msgtype: str, stamp_ns: int, message: Any) -> None:
        connection = self.connections.get(topic)
        if connection is None:
            connection = self.writer.add_connection(
                topic, msgtype, typestore=self.typestore, offered_qos_profiles=[_offered_qos()]
            )
            self.connections[topic] = connection
            self.counts[topic] = 0
        self.writer.write(connection, stamp_ns, self.typestore.serialize_cdr(message, msgtype))
        self.counts[topic] += 1

    def _header(self, stamp_ns: int, frame_id: str) -> Any:
        sec, nanosec = divmod(stamp_ns, 1_000_000_000)
        stamp = self.types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec)
        return self.types["std_msgs/msg/Header"](stamp=stamp, frame_id=frame_id)

    def _image(self, header: Any, image: EncodedImage) -> Any:
        height, width = image.pixels.shape[:2]
        # Little-endian bytes whatever the host, as is_bigendian=0 declares.
        pixels = np.ascontiguousarray(image.pixels, dtype=image.pixels.dtype.newbyteorder("<"))
        return self.types[IMAGE_TYPE](
            header=header,
            height=height,
            width=width,
            encoding=image.encoding,
            is_bigendian=0,
            step=pixels.strides[0],
            data=pixels.reshape(-1).view(np.uint8),
        )

    def _camera_info(self, header: Any, camera: PinholeCamera, baseline_m: float | None = None) -> Any:
        K = camera.K
        P = np.zeros((3, 4))
        P[:, :3] = K
        if baseline_m is not None:
            P[0, 3] = -camera.fx * baseline_m
        roi = self.types["sensor_msgs/msg/RegionOfInterest"](
            x_offset=0, y_offset=0, height=0, width=0, do_rectify=False
        )
        return self.types[CAMERA_INFO_TYPE](
            header=header,
            height=camera.height,
            width=camera.width,
            distortion_model="plumb_bob",
            d=np.zeros(5),
            k=K.reshape(-1),
            r=np.eye(3).reshape(-1),
            p=P.reshape(-1),
            binning_x=0,
            binning_y=0,
            roi=roi,
        )

    def _pose_stamped(self, stamp_ns: int, T_world_camera: np.ndarray) -> Any:
        x, y, z, w = matrix_to_quaternion(T_world_camera[:3, :3])
        # A quaternion holds only rigid rotations: a rotation that is not exactly
        # orthonormal (poses stored as rounded text) arrives as its nearest rotation.
        change = float(np.abs(quaternion_to_matrix(x, y, z, w) - T_world_camera[:3, :3]).max())
        self.max_rotation_change = max(self.max_rotation_change, change)
        tx, ty, tz = (float(v) for v in T_world_camera[:3, 3])
        geometry = "geometry_msgs/msg/"
        pose = self.types[geometry + "Pose"](
            position=self.types[geometry + "Point"](x=tx, y=ty, z=tz),
            orientation=self.types[geometry + "Quaternion"](x=float(x), y=float(y), z=float(z), w=float(w)),
        )
        return self.types[POSE_TYPE](header=self._header(stamp_ns, MAP_FRAME), pose=pose)


def _offered_qos() -> Any:
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    # Zero durations mean "the RMW default", as rosbag2 records them.
    unset = QosTime(0, 0)
    return Qos(
        QosHistory.KEEP_LAST,
        OFFERED_QOS_DEPTH,
        QosReliability.RELIABLE,
        QosDurability.VOLATILE,
        unset,
        unset,
        QosLiveliness.AUTOMATIC,
        unset,
        False,
    )


def _parse_storage(storage: BagStorage | str) -> BagStorage:
    try:
        return BagStorage(storage)
    except ValueError:
        choices = ", ".join(s.value for s in BagStorage)
        raise ValueError(f"unknown bag storage {storage!r}: use one of {choices}") from None


def _plugin(storage: BagStorage) -> Any:
    from rosbags.rosbag2 import StoragePlugin

    return StoragePlugin.MCAP if storage is BagStorage.MCAP else StoragePlugin.SQLITE3


def _check_replaceable_bag(path: Path) -> None:
    if not path.is_dir():
        raise BagOutputError(
            f"cannot overwrite {path}: it is a file, not a bag directory; remove it or choose another --out"
        )
    entries = list(path.iterdir())
    if entries and not (path / "metadata.yaml").is_file():
        raise BagOutputError(
            f"cannot overwrite {path}: it is not a bag directory (no metadata.yaml); "
            "remove it yourself or choose another --out"
        )
    foreign = [e.name for e in entries if not (e.is_file() and e.name.endswith(BAG_FILE_SUFFIXES))]
    if foreign:
        raise BagOutputError(
            f"cannot overwrite {path}: it contains files that are not part of a bag "
            f"({', '.join(sorted(foreign)[:5])}); "
            "remove them yourself or choose another --out"
        )
