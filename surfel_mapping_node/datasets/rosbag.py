"""Read a ROS 2 bag (mcap or sqlite3) as a dataset of Frames: the ``--format bag`` reader.

Use :class:`BagDataset` to map a bag offline (``surfel-map run BAG --format bag``),
whether it was written by ``surfel-map convert`` or recorded with ``ros2 bag record``
from a camera and a SLAM system publishing the topics of
:mod:`surfel_mapping_node.topics`. rosbags does the reading, so no ROS install is needed.

A frame is one message of the image topic (``/camera/image`` for RGB-D,
``/stereo/left/image_rect`` for stereo) together with the depth (or right image) and
the SLAM pose whose header stamps lie within ``stamp_tolerance_ns`` of the image's.
Images without a matching depth or pose are skipped with one warning. Intrinsics come
from the first CameraInfo; the stereo baseline from the right camera's
P[0, 3] = -fx * baseline_m. A frame whose stamp matches a pose of the latest keyframe
Path gets that keyframe's stamp in ns as ``keyframe_id``, the id the mapper gives its
own keyframes. When ``surfel-map convert`` chose the keyframes by a rule, the mapper
decides instead, so a converted bag maps exactly like the dataset it came from.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.datasets.base import Frame
from surfel_mapping_node.depth import MILLIMETRES_SCALE
from surfel_mapping_node.image_encoding import (
    COLOR_ENCODINGS,
    DEPTH_ENCODINGS,
    IMAGE_ENCODINGS,
    ImageEncodingError,
    decode_pixels,
    to_rgb_or_gray,
)
from surfel_mapping_node.poses import pose_from_translation_quaternion
from surfel_mapping_node.topics import (
    CAMERA_INFO_TYPE,
    DEFAULT_TOPICS,
    IMAGE_TYPE,
    KEYFRAMES_FROM_DATASET,
    METADATA_KEYFRAMES,
    METADATA_SOURCE_FORMAT,
    ODOMETRY_TYPE,
    PATH_TYPE,
    POSE_TYPE,
    TopicNames,
)

logger = logging.getLogger(__name__)

# Depth and poses stamped within this of an image belong to it. Converted bags stamp
# them identically, and hardware-synchronized sensors usually agree to microseconds.
DEFAULT_STAMP_TOLERANCE_NS = 1_000_000

KEYFRAME_MODES = ("auto", "path", "none")


class BagFormatError(ValueError):
    """A bag that lacks the topics or messages a dataset needs, or contains unreadable ones."""


@dataclass(frozen=True)
class _MessageRef:
    """Location of one message in the bag: its connection, bag time and header stamp."""

    connection: Any
    bag_ns: int
    stamp_ns: int


class _Layout(NamedTuple):
    """The topics that make the frames of a bag."""

    # "rgbd" or "stereo".
    kind: str
    image_topic: str
    # The depth topic (RGB-D) or the right image topic (stereo).
    second_topic: str
    camera_info_topic: str


class _PoseTrack(NamedTuple):
    """All poses of the pose topic, sorted by stamp."""

    stamps_ns: np.ndarray  # (N,) int64
    T_world_camera: np.ndarray  # (N, 4, 4) float64


@dataclass(frozen=True)
class _FrameRefs:
    """The messages that make one frame."""

    image: _MessageRef
    # The depth image (RGB-D) or the right image (stereo).
    second: _MessageRef
    T_world_camera: np.ndarray
    keyframe_id: int | None


def decode_image(message: Any, allowed: tuple[str, ...] = tuple(IMAGE_ENCODINGS)) -> np.ndarray:
    """Return the pixels of a sensor_msgs/Image (rosbags message) as a (H, W[, 3]) array.

    :func:`surfel_mapping_node.image_encoding.decode_pixels` decodes it: row padding is
    skipped and big-endian data byte-swapped. Color comes back as RGB (BGR reordered,
    alpha dropped), gray and depth unchanged.

    Args:
        message: a deserialized sensor_msgs/msg/Image.
        allowed: the encodings the caller accepts.

    Raises:
        BagFormatError: an encoding outside ALLOWED, a zero size, a step shorter than a
            row, or data shorter than height × step.
    """
    try:
        return to_rgb_or_gray(decode_pixels(message, allowed), message.encoding)
    except ImageEncodingError as error:
        raise BagFormatError(str(error)) from error


def camera_from_info(message: Any) -> PinholeCamera:
    """Return the camera of a sensor_msgs/CameraInfo (P when set, as for rectified images, else K)."""
    return PinholeCamera.from_camera_info(
        int(message.width), int(message.height), np.asarray(message.k), np.asarray(message.p)
    )


def baseline_from_info(message: Any) -> float:
    """Return the stereo baseline in metres of a right camera's CameraInfo: -P[0, 3] / P[0, 0].

    Raises:
        BagFormatError: P[0, 3] is zero or positive (not the right camera of a rectified pair).
    """
    P = np.asarray(message.p, dtype=np.float64).reshape(3, 4)
    if not (P[0, 0] > 0 and P[0, 3] < 0):
        raise BagFormatError(
            f"right camera_info has P[0,0]={P[0, 0]}, P[0,3]={P[0, 3]}: a rectified right camera "
            "needs P[0,3] = -fx * baseline < 0 (REP 104); check the stereo calibration"
        )
    return float(-P[0, 3] / P[0, 0])


def stamp_ns_of(header: Any) -> int:
    """Return a std_msgs/Header stamp in integer nanoseconds."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def pose_from_message(pose: Any) -> np.ndarray:
    """Return the 4×4 matrix of a geometry_msgs/Pose."""
    position, orientation = pose.position, pose.orientation
    return pose_from_translation_quaternion(
        np.array([position.x, position.y, position.z]),
        np.array([orientation.x, orientation.y, orientation.z, orientation.w]),
    )


class BagDataset:
    """The frames of a ROS 2 bag, with random access; implements the Dataset protocol.

    The bag stays open while the dataset lives; use it as a context manager or call
    :meth:`close`. ``Frame.index`` is the frame's position in this dataset.

    Args:
        path: the bag directory (with metadata.yaml), or a bare .mcap or .db3 file.
        topics: topic names to read, the defaults of :mod:`surfel_mapping_node.topics`
            unless given.
        stamp_tolerance_ns: the largest stamp difference between an image and its depth,
            right image or pose.
        keyframes: ``"path"`` takes keyframe ids from the latest keyframe Path,
            ``"none"`` leaves ``keyframe_id`` None so the mapper picks keyframes itself,
            ``"auto"`` (default) is ``"path"`` unless the bag's metadata records that
            ``surfel-map convert`` chose the keyframes by a rule rather than taking
            them from the dataset.

    Raises:
        FileNotFoundError: PATH does not exist.
        ValueError: an unknown keyframes mode or a negative tolerance.
        BagFormatError: PATH is not a readable bag, the bag lacks the topics of an
            RGB-D or stereo recording or a pose topic (the message names the topics
            found and those expected), or no image has both its depth and pose.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        topics: TopicNames = DEFAULT_TOPICS,
        stamp_tolerance_ns: int = DEFAULT_STAMP_TOLERANCE_NS,
        keyframes: str = "auto",
    ) -> None:
        from rosbags.rosbag2 import Reader
        from rosbags.typesys import Stores, get_typestore

        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"bag not found: {path}; pass the bag directory (the folder holding metadata.yaml)"
            )
        if stamp_tolerance_ns < 0:
            raise ValueError(f"invalid stamp tolerance {stamp_tolerance_ns} ns: use a value >= 0")
        if keyframes not in KEYFRAME_MODES:
            raise ValueError(f"unknown keyframes mode {keyframes!r}: use one of {', '.join(KEYFRAME_MODES)}")
        self.path = path
        self.topics = topics
        self.stamp_tolerance_ns = int(stamp_tolerance_ns)
        self.keyframes_mode = keyframes
        self.custom_data = _read_custom_data(path)
        # The dataset format a converted bag came from (e.g. "kitti"), for its sensor
        # preset; None for bags recorded otherwise.
        self.source_format: str | None = self.custom_data.get(METADATA_SOURCE_FORMAT)
        if keyframes == "auto":
            chosen_by = self.custom_data.get(METADATA_KEYFRAMES, KEYFRAMES_FROM_DATASET)
            self.keyframes_mode = "path" if chosen_by == KEYFRAMES_FROM_DATASET else "none"
        self._typestore = get_typestore(Stores.ROS2_JAZZY)

        try:
            self._reader = Reader(path)
            self._reader.open()
        except Exception as error:  # rosbags raises several unrelated types for unreadable bags
            raise BagFormatError(f"cannot open bag {path}: {error}") from error
        try:
            self._index()
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, index: int) -> Frame:
        if not -len(self) <= index < len(self):
            raise IndexError(f"frame index {index} out of range: the bag has {len(self)} frames")
        index = index % len(self)
        refs = self._frames[index]

        image_message, second_message = self._read(refs.image, refs.second)
        image = decode_image(image_message, COLOR_ENCODINGS)
        self.camera.check_image_shape(image.shape, f"image of frame {index}")
        frame = Frame(
            index=index,
            stamp_ns=refs.image.stamp_ns,
            image=image,
            camera=self.camera,
            T_world_camera=refs.T_world_camera.copy(),
            keyframe_id=refs.keyframe_id,
        )
        if self.kind == "rgbd":
            frame.depth_raw = decode_image(second_message, DEPTH_ENCODINGS)
            # REP 118: 16-bit depth is millimetres, float depth metres.
            frame.depth_scale = 1.0 if second_message.encoding == "32FC1" else MILLIMETRES_SCALE
            self.camera.check_image_shape(frame.depth_raw.shape, f"depth of frame {index}")
        else:
            frame.right_image = decode_image(second_message, COLOR_ENCODINGS)
            frame.baseline_m = self.baseline_m
            self.camera.check_image_shape(frame.right_image.shape, f"right image of frame {index}")
        return frame

    def __iter__(self) -> Iterator[Frame]:
        for index in range(len(self)):
            yield self[index]

    def __enter__(self) -> BagDataset:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the bag; the dataset cannot read frames afterwards."""
        reader, self._reader = getattr(self, "_reader", None), None
        if reader is not None and reader.is_open:
            reader.close()

    def keyframe_poses(self) -> dict[int, np.ndarray]:
        """Return the poses of the latest keyframe Path: keyframe stamp in ns -> 4×4 T_world_keyframe.

        After a loop closure these are the corrected poses, to hand to
        ``SurfelMapper.update_keyframe_poses``.
        """
        return {stamp_ns: T.copy() for stamp_ns, T in self._keyframe_poses.items()}

    def _index(self) -> None:
        # A topic may have several connections (several recorded publishers or files).
        connections: dict[str, list[Any]] = {}
        for connection in self._reader.connections:
            connections.setdefault(connection.topic, []).append(connection)
        layout = self._choose_layout(connections)
        self.kind, info_topic = layout.kind, layout.camera_info_topic
        topics = self.topics
        if topics.pose not in connections:
            raise BagFormatError(self._missing_message(connections, [topics.pose]))
        expected_types = {
            layout.image_topic: (IMAGE_TYPE,),
            layout.second_topic: (IMAGE_TYPE,),
            info_topic: (CAMERA_INFO_TYPE,),
            topics.pose: (POSE_TYPE, ODOMETRY_TYPE),
            topics.keyframes: (PATH_TYPE,),
        }
        if self.kind == "stereo":
            expected_types[topics.right_camera_info] = (CAMERA_INFO_TYPE,)
        self._check_types(connections, expected_types)

        image_refs = self._scan_stamps(connections[layout.image_topic])
        second_refs = self._scan_stamps(connections[layout.second_topic])
        info = self._first_message(connections[info_topic])
        self.camera = camera_from_info(info)
        if np.any(np.asarray(info.d)):
            logger.warning(
                "bag %s: camera_info on %s has non-zero distortion %s; it is ignored, so the images "
                "must be rectified", self.path, info_topic, list(np.asarray(info.d)),
            )
        self.baseline_m: float | None = None
        if self.kind == "stereo":
            self.baseline_m = baseline_from_info(self._first_message(connections[topics.right_camera_info]))

        poses = self._scan_poses(connections[topics.pose])
        self._keyframe_poses: dict[int, np.ndarray] = {}
        if topics.keyframes in connections:
            self._keyframe_poses = self._latest_path(connections[topics.keyframes])
        else:
            logger.info("bag %s has no %s: the mapper picks keyframes", self.path, topics.keyframes)

        self._frames = self._match(image_refs, second_refs, poses)
        logger.info("bag %s: %d %s frames", self.path, len(self._frames), self.kind)

    def _choose_layout(self, connections: dict[str, Any]) -> _Layout:
        topics = self.topics
        rgbd = [topics.image, topics.depth, topics.camera_info]
        stereo = [topics.left_image, topics.right_image, topics.left_camera_info, topics.right_camera_info]
        if all(t in connections for t in rgbd):
            return _Layout("rgbd", topics.image, topics.depth, topics.camera_info)
        if all(t in connections for t in stereo):
            return _Layout("stereo", topics.left_image, topics.right_image, topics.left_camera_info)
        # Name the missing topics of the layout the bag is closest to.
        rgbd_found = sum(t in connections for t in rgbd) / len(rgbd)
        stereo_found = sum(t in connections for t in stereo) / len(stereo)
        expected = rgbd if rgbd_found >= stereo_found else stereo
        raise BagFormatError(self._missing_message(connections, expected))

    def _check_types(
        self, connections: dict[str, list[Any]], expected_types: dict[str, tuple[str, ...]]
    ) -> None:
        for topic, types in expected_types.items():
            for connection in connections.get(topic, []):
                if connection.msgtype not in types:
                    raise BagFormatError(
                        f"bag {self.path}: topic {topic} has type {connection.msgtype}, expected "
                        f"{' or '.join(types)}; pass the right topic names with TopicNames"
                    )

    def _missing_message(self, connections: dict[str, list[Any]], expected: list[str]) -> str:
        missing = [t for t in expected if t not in connections]
        topics = self.topics
        found = ", ".join(f"{topic} ({group[0].msgtype})" for topic, group in connections.items()) or "none"
        return (
            f"bag {self.path} lacks the topics {', '.join(missing)}. Topics found: {found}. "
            f"Expected RGB-D: {', '.join([topics.image, topics.depth, topics.camera_info])}, "
            f"or stereo: {', '.join([topics.left_image, topics.right_image, topics.left_camera_info])}, "
            f"{topics.right_camera_info}; plus {topics.pose} (and optionally {topics.keyframes}). "
            "Pass other topic names with TopicNames, or convert the dataset with surfel-map convert"
        )

    def _scan_stamps(self, connections: list[Any]) -> list[_MessageRef]:
        refs = []
        for connection, bag_ns, raw in self._reader.messages(connections):
            refs.append(_MessageRef(connection, bag_ns, _cdr_header_stamp_ns(raw, connection.topic)))
        refs.sort(key=lambda ref: ref.stamp_ns)
        return refs

    def _first_message(self, connections: list[Any]) -> Any:
        for connection, _, raw in self._reader.messages(connections):
            return self._typestore.deserialize_cdr(raw, connection.msgtype)
        raise BagFormatError(f"bag {self.path} has no message on {connections[0].topic}")

    def _scan_poses(self, connections: list[Any]) -> _PoseTrack:
        stamps, poses = [], []
        frame_ids = set()
        for connection, _, raw in self._reader.messages(connections):
            message = self._typestore.deserialize_cdr(raw, connection.msgtype)
            # nav_msgs/Odometry nests the pose with its covariance.
            pose = message.pose.pose if connection.msgtype == ODOMETRY_TYPE else message.pose
            stamps.append(stamp_ns_of(message.header))
            poses.append(pose_from_message(pose))
            frame_ids.add(message.header.frame_id)
        topic = connections[0].topic
        if not stamps:
            raise BagFormatError(f"bag {self.path} has no message on the pose topic {topic}")
        if len(frame_ids) > 1:
            logger.warning("bag %s: poses on %s mix frames %s", self.path, topic, sorted(frame_ids))
        order = np.argsort(stamps, kind="stable")
        return _PoseTrack(np.asarray(stamps, dtype=np.int64)[order], np.asarray(poses)[order])

    def _latest_path(self, connections: list[Any]) -> dict[int, np.ndarray]:
        latest = None
        for connection, _, raw in self._reader.messages(connections):
            latest = (connection, raw)
        if latest is None:
            return {}
        connection, raw = latest
        path = self._typestore.deserialize_cdr(raw, connection.msgtype)
        return {stamp_ns_of(p.header): pose_from_message(p.pose) for p in path.poses}

    def _match(
        self,
        image_refs: list[_MessageRef],
        second_refs: list[_MessageRef],
        poses: _PoseTrack,
    ) -> list[_FrameRefs]:
        image_stamps = np.array([r.stamp_ns for r in image_refs], dtype=np.int64)
        second_stamps = np.array([r.stamp_ns for r in second_refs], dtype=np.int64)
        second_match = _match_stamps(image_stamps, second_stamps, self.stamp_tolerance_ns)
        pose_match = _match_stamps(image_stamps, poses.stamps_ns, self.stamp_tolerance_ns)
        keyframe_ids = self._keyframe_ids(image_stamps) if self.keyframes_mode == "path" else {}

        frames = []
        for i, ref in enumerate(image_refs):
            if second_match[i] < 0 or pose_match[i] < 0:
                continue
            T_world_camera = poses.T_world_camera[pose_match[i]]
            frames.append(_FrameRefs(ref, second_refs[second_match[i]], T_world_camera, keyframe_ids.get(i)))

        skipped = len(image_refs) - len(frames)
        second = "depth" if self.kind == "rgbd" else "right image"
        if not frames:
            raise BagFormatError(
                f"bag {self.path}: none of its {len(image_refs)} images has a {second} and a pose within "
                f"{self.stamp_tolerance_ns} ns; check the stamps or raise the stamp tolerance"
            )
        if skipped:
            logger.warning(
                "bag %s: skipped %d of %d images without a %s or pose within %d ns",
                self.path, skipped, len(image_refs), second, self.stamp_tolerance_ns,
            )
        return frames

    def _keyframe_ids(self, image_stamps: np.ndarray) -> dict[int, int]:
        if not self._keyframe_poses:
            return {}
        keyframe_stamps = np.array(sorted(self._keyframe_poses), dtype=np.int64)
        image_of_keyframe = _match_stamps(keyframe_stamps, image_stamps, self.stamp_tolerance_ns)
        return {int(i): int(s) for s, i in zip(keyframe_stamps, image_of_keyframe, strict=True) if i >= 0}

    def _read(self, *refs: _MessageRef) -> list[Any]:
        """Return the messages REFS point to, in order, read in one pass over their time span."""
        if self._reader is None:
            raise ValueError(f"bag {self.path} is closed: open a new BagDataset to read frames")
        wanted = {(ref.connection.id, ref.bag_ns, ref.stamp_ns): i for i, ref in enumerate(refs)}
        found: list[Any] = [None] * len(refs)
        start = min(ref.bag_ns for ref in refs)
        stop = max(ref.bag_ns for ref in refs) + 1
        connections = list({ref.connection.id: ref.connection for ref in refs}.values())

        for connection, bag_ns, raw in self._reader.messages(connections, start=start, stop=stop):
            i = wanted.get((connection.id, bag_ns, _cdr_header_stamp_ns(raw, connection.topic)))
            if i is not None and found[i] is None:
                found[i] = self._typestore.deserialize_cdr(raw, connection.msgtype)

        for ref, message in zip(refs, found, strict=True):
            if message is None:
                raise BagFormatError(
                    f"bag {self.path}: no message stamped {ref.stamp_ns} ns at {ref.bag_ns} ns "
                    f"on {ref.connection.topic}; was the bag modified while open?"
                )
        return found


def source_format_of_bag(path: str | Path) -> str | None:
    """Return the dataset format a bag was converted from ("7scenes", "kitti", "tum"), else None.

    Reads only metadata.yaml, so a caller can pick the format's sensor preset (e.g.
    ``config.preset_for_format``) before opening the bag. Bags that ``surfel-map
    convert`` did not write give None.

    Raises:
        BagFormatError: metadata.yaml exists but cannot be parsed.
    """
    return _read_custom_data(Path(path).expanduser()).get(METADATA_SOURCE_FORMAT)


def _read_custom_data(path: Path) -> dict[str, str]:
    """Return the custom_data of a bag directory's metadata.yaml ({} when there is none)."""
    metadata_path = path / "metadata.yaml"
    if not metadata_path.is_file():
        return {}
    try:
        metadata = yaml.safe_load(metadata_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise BagFormatError(f"cannot read bag metadata {metadata_path}: {error}") from error
    custom = (metadata.get("rosbag2_bagfile_information") or {}).get("custom_data") or {}
    return {str(k): str(v) for k, v in custom.items()}


def _cdr_header_stamp_ns(raw: bytes | memoryview, topic: str) -> int:
    """Return the header stamp of a CDR message that starts with a std_msgs/Header.

    Reading 12 bytes avoids deserializing whole images while indexing the bag.
    """
    buffer = memoryview(raw)
    if len(buffer) < 12 or buffer[0] != 0 or buffer[1] not in (0, 1):
        raise BagFormatError(f"message on {topic} is not CDR with a header ({len(buffer)} bytes)")
    byte_order = "<" if buffer[1] == 1 else ">"
    sec = int(np.frombuffer(buffer[4:8], dtype=f"{byte_order}i4")[0])
    nanosec = int(np.frombuffer(buffer[8:12], dtype=f"{byte_order}u4")[0])
    return sec * 1_000_000_000 + nanosec


def _match_stamps(query_ns: np.ndarray, reference_ns: np.ndarray, tolerance_ns: int) -> np.ndarray:
    """Return for each query stamp the index of the nearest reference stamp, -1 if none is within tolerance.

    reference_ns must be sorted.
    """
    if reference_ns.size == 0:
        return np.full(query_ns.shape, -1, dtype=np.int64)
    right = np.clip(np.searchsorted(reference_ns, query_ns), 0, reference_ns.size - 1)
    left = np.clip(right - 1, 0, reference_ns.size - 1)
    left_closer = np.abs(query_ns - reference_ns[left]) <= np.abs(reference_ns[right] - query_ns)
    nearest = np.where(left_closer, left, right)
    return np.where(np.abs(reference_ns[nearest] - query_ns) <= tolerance_ns, nearest, -1)
