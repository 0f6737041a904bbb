"""Conversions between ROS 2 messages and the numpy arrays of the mapping core.

Images (sensor_msgs/Image) become (height, width[, channels]) arrays in the machine's
byte order, whatever the message's row step and endianness. The ROS-free
:mod:`surfel_mapping_node.image_encoding` decodes them. Intrinsics come from
sensor_msgs/CameraInfo. Poses (geometry_msgs/PoseStamped, nav_msgs/Odometry,
nav_msgs/Path) become 4×4 ``T_a_b`` matrices (poses.py conventions). The map goes out
as a sensor_msgs/PointCloud2 whose fields are laid out in ``SURFEL_CLOUD_FIELDS`` and
as a visualization_msgs/Marker TRIANGLE_LIST of discs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point, Pose, PoseStamped
from nav_msgs.msg import Odometry, Path
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker

from surfel_mapping_node.camera import PinholeCamera

# The encoding tables are re-exported for the node and older callers of this module.
from surfel_mapping_node.image_encoding import COLOR_ENCODINGS as COLOR_ENCODINGS
from surfel_mapping_node.image_encoding import DEPTH_ENCODINGS as DEPTH_ENCODINGS
from surfel_mapping_node.image_encoding import IMAGE_ENCODINGS as IMAGE_ENCODINGS
from surfel_mapping_node.image_encoding import (
    ImageEncodingError,
    decode_pixels,
    pixel_format,
    to_rgb_or_gray,
)
from surfel_mapping_node.mapper import SurfelCloud
from surfel_mapping_node.poses import (
    InvalidPoseError,
    check_pose,
    matrix_to_quaternion,
    pose_from_translation_quaternion,
)

logger = logging.getLogger(__name__)

# The old name of the image decoding error, kept for the node and older callers.
ImageConversionError = ImageEncodingError


class CameraInfoError(ValueError):
    """A sensor_msgs/CameraInfo that gives no usable intrinsics or baseline."""


# The PointCloud2 layout of a surfel map, spelled out once: (name, byte offset,
# PointField datatype, count). All are little-endian float32. ``rgb`` contains the
# bytes of a uint32 0x00RRGGBB read as float32, the PCL/RViz convention.
SURFEL_CLOUD_FIELDS: tuple[tuple[str, int, int, int], ...] = (
    ("x", 0, PointField.FLOAT32, 1),
    ("y", 4, PointField.FLOAT32, 1),
    ("z", 8, PointField.FLOAT32, 1),
    ("rgb", 12, PointField.FLOAT32, 1),
    ("normal_x", 16, PointField.FLOAT32, 1),
    ("normal_y", 20, PointField.FLOAT32, 1),
    ("normal_z", 24, PointField.FLOAT32, 1),
    ("radius", 28, PointField.FLOAT32, 1),
    ("confidence", 32, PointField.FLOAT32, 1),
)
SURFEL_POINT_STEP = 36
SURFEL_POINT_DTYPE = np.dtype(
    {
        "names": [name for name, _, _, _ in SURFEL_CLOUD_FIELDS],
        "formats": ["<f4"] * len(SURFEL_CLOUD_FIELDS),
        "offsets": [offset for _, offset, _, _ in SURFEL_CLOUD_FIELDS],
        "itemsize": SURFEL_POINT_STEP,
    }
)

# PointField datatype -> numpy type character, for reading any cloud's fields.
_POINT_FIELD_TYPES = {
    PointField.INT8: "i1",
    PointField.UINT8: "u1",
    PointField.INT16: "i2",
    PointField.UINT16: "u2",
    PointField.INT32: "i4",
    PointField.UINT32: "u4",
    PointField.FLOAT32: "f4",
    PointField.FLOAT64: "f8",
}


# --- stamps ------------------------------------------------------------------------


def stamp_to_ns(stamp: Time) -> int:
    """Return a builtin_interfaces/Time as integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(stamp_ns: int) -> Time:
    """Return integer nanoseconds (>= 0) as a builtin_interfaces/Time."""
    if stamp_ns < 0:
        raise ValueError(f"invalid stamp {stamp_ns} ns: ROS time stamps must be >= 0")
    return Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000))


def make_header(stamp_ns: int, frame_id: str) -> Header:
    """Return a std_msgs/Header."""
    return Header(stamp=ns_to_stamp(stamp_ns), frame_id=frame_id)


# --- images ------------------------------------------------------------------------


def image_to_numpy(msg: Image, allowed_encodings: tuple[str, ...] | None = None) -> np.ndarray:
    """Return the pixels of a sensor_msgs/Image as a native-endian array.

    See :func:`surfel_mapping_node.image_encoding.decode_pixels`: (H, W) or (H, W, C)
    in the message's channel order, row padding skipped, big-endian data byte-swapped.

    Args:
        msg: the image message.
        allowed_encodings: encodings the caller accepts; default all of IMAGE_ENCODINGS.

    Raises:
        ImageConversionError: an unsupported encoding, a zero size, a step shorter than
            a row or data shorter than step × height.
    """
    return decode_pixels(msg, allowed_encodings)


def image_to_rgb_or_mono(msg: Image) -> np.ndarray:
    """Return a color or gray image as the mapper wants it: (H, W) uint8 or (H, W, 3) RGB.

    Raises:
        ImageConversionError: an encoding outside COLOR_ENCODINGS, or a bad layout.
    """
    return to_rgb_or_gray(decode_pixels(msg, COLOR_ENCODINGS), msg.encoding)


def numpy_to_image(array: np.ndarray, encoding: str, stamp_ns: int, frame_id: str) -> Image:
    """Return a little-endian, unpadded sensor_msgs/Image of ``array``.

    Raises:
        ImageConversionError: an unsupported encoding, or an array whose dtype or
            channel count does not fit it.
    """
    pixel = pixel_format(encoding)
    dtype, channels = pixel.dtype, pixel.channels
    array = np.asarray(array)
    expected_ndim = 2 if channels == 1 else 3
    if array.dtype != dtype or array.ndim != expected_ndim or (channels > 1 and array.shape[2] != channels):
        raise ImageConversionError(
            f"array {array.dtype} {array.shape} does not fit encoding {encoding!r}: "
            f"expected {dtype} with {channels} channel(s)"
        )
    height, width = array.shape[:2]
    data = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
    return Image(
        header=make_header(stamp_ns, frame_id),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=width * channels * dtype.itemsize,
        data=data,
    )


# --- camera info -------------------------------------------------------------------


def camera_from_camera_info(msg: CameraInfo) -> PinholeCamera:
    """Return the pinhole camera of a sensor_msgs/CameraInfo.

    The projection matrix P is used when it is set (rectified images, REP 104),
    otherwise K. Distortion coefficients are not applied: the images must be
    undistorted or rectified.

    Raises:
        CameraInfoError: zero size or intrinsics that are all zero or invalid.
    """
    if not np.any(np.asarray(msg.k, dtype=np.float64)) and not np.any(np.asarray(msg.p, dtype=np.float64)):
        raise CameraInfoError(
            f"camera_info of frame {msg.header.frame_id!r} has K and P all zero: the camera is not calibrated"
        )
    try:
        return PinholeCamera.from_camera_info(int(msg.width), int(msg.height), list(msg.k), list(msg.p))
    except ValueError as error:
        raise CameraInfoError(f"camera_info of frame {msg.header.frame_id!r}: {error}") from error


def stereo_baseline_m(right_info: CameraInfo) -> float:
    """Return the stereo baseline in metres from the right camera's P (−P[0,3] / P[0,0]).

    Raises:
        CameraInfoError: P[0,0] is zero or the baseline is not positive (the right
            camera's P carries no translation: pass the rectified right camera_info).
    """
    P = np.asarray(right_info.p, dtype=np.float64).reshape(3, 4)
    if P[0, 0] == 0:
        raise CameraInfoError("right camera_info has P[0,0] = 0: it carries no rectified projection")
    baseline_m = -P[0, 3] / P[0, 0]
    if not np.isfinite(baseline_m) or baseline_m <= 0:
        raise CameraInfoError(
            f"right camera_info gives baseline {baseline_m} m (P[0,3] = {P[0, 3]}): "
            "expected P[0,3] = -fx * baseline < 0 of the rectified right camera"
        )
    return float(baseline_m)


# --- poses -------------------------------------------------------------------------


def pose_to_matrix(pose: Pose, name: str = "pose") -> np.ndarray:
    """Return a geometry_msgs/Pose as a 4×4 matrix (the child-to-parent transform).

    Raises:
        InvalidPoseError: NaN or infinite values or a zero quaternion.
    """
    p, q = pose.position, pose.orientation
    try:
        return pose_from_translation_quaternion(np.array([p.x, p.y, p.z]), np.array([q.x, q.y, q.z, q.w]))
    except InvalidPoseError as error:
        raise InvalidPoseError(f"{name}: {error}") from error


def matrix_to_pose(T: np.ndarray) -> Pose:
    """Return a 4×4 rigid transform as a geometry_msgs/Pose.

    Raises:
        InvalidPoseError: T is not a finite rigid transform.
    """
    T = check_pose(T)
    q = matrix_to_quaternion(T[:3, :3])
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = (float(v) for v in T[:3, 3])
    pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = (float(v) for v in q)
    return pose


class StampedPose(NamedTuple):
    """A pose with its header stamp and frame."""

    stamp_ns: int
    frame_id: str
    # 4×4 child-to-frame_id transform.
    T: np.ndarray


def pose_stamped_to_matrix(msg: PoseStamped) -> StampedPose:
    """Return the pose of a geometry_msgs/PoseStamped.

    Raises:
        InvalidPoseError: NaN or infinite values or a zero quaternion.
    """
    stamp_ns = stamp_to_ns(msg.header.stamp)
    return StampedPose(stamp_ns, msg.header.frame_id, pose_to_matrix(msg.pose, f"pose at {stamp_ns} ns"))


def odometry_to_matrix(msg: Odometry) -> StampedPose:
    """Return the pose of a nav_msgs/Odometry: child_frame_id in header.frame_id.

    Raises:
        InvalidPoseError: NaN or infinite values or a zero quaternion.
    """
    stamp_ns = stamp_to_ns(msg.header.stamp)
    return StampedPose(
        stamp_ns, msg.header.frame_id, pose_to_matrix(msg.pose.pose, f"odometry at {stamp_ns} ns")
    )


@dataclass
class PathPoses:
    """The poses of a nav_msgs/Path keyed by header stamp."""

    # stamp_ns -> 4×4 pose; for a keyframe path, T_map_keyframe.
    poses: dict[int, np.ndarray] = field(default_factory=dict)
    # Poses left out: (stamp_ns, reason).
    invalid: list[tuple[int, str]] = field(default_factory=list)
    # Stamps that appeared more than once; the last pose wins.
    duplicate_stamps_ns: list[int] = field(default_factory=list)


def path_to_poses(msg: Path) -> PathPoses:
    """Return the poses of a nav_msgs/Path keyed by their own header stamps (ns).

    Invalid poses (NaN, zero quaternion) are left out and listed in ``invalid``
    rather than raising, so that one bad keyframe does not discard the whole path.
    """
    result = PathPoses()
    for index, stamped in enumerate(msg.poses):
        stamp_ns = stamp_to_ns(stamped.header.stamp)
        try:
            T = pose_to_matrix(stamped.pose, f"path pose {index} at {stamp_ns} ns")
        except InvalidPoseError as error:
            result.invalid.append((stamp_ns, str(error)))
            continue
        if stamp_ns in result.poses:
            result.duplicate_stamps_ns.append(stamp_ns)
        result.poses[stamp_ns] = T
    return result


def poses_to_path(T_by_stamp_ns: dict[int, np.ndarray], frame_id: str, stamp_ns: int) -> Path:
    """Return a nav_msgs/Path of poses keyed by stamp (ns), in stamp order."""
    path = Path(header=make_header(stamp_ns, frame_id))
    for pose_stamp_ns in sorted(T_by_stamp_ns):
        path.poses.append(
            PoseStamped(
                header=make_header(pose_stamp_ns, frame_id),
                pose=matrix_to_pose(T_by_stamp_ns[pose_stamp_ns]),
            )
        )
    return path


# --- point clouds ------------------------------------------------------------------


def pack_rgb(color_rgb: np.ndarray) -> np.ndarray:
    """Return (N, 3) uint8 RGB as (N,) float32 holding the bits of uint32 0x00RRGGBB."""
    color_rgb = np.asarray(color_rgb, dtype=np.uint32)
    packed = (color_rgb[:, 0] << 16) | (color_rgb[:, 1] << 8) | color_rgb[:, 2]
    return packed.astype("<u4").view("<f4")


def unpack_rgb(rgb: np.ndarray) -> np.ndarray:
    """Return (N,) float32 packed colors (see pack_rgb) as (N, 3) uint8 RGB."""
    packed = np.ascontiguousarray(rgb, dtype="<f4").view("<u4")
    return np.stack([(packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF], axis=1).astype(np.uint8)


def decimation_indices(count: int, max_points: int) -> np.ndarray:
    """Return at most ``max_points`` indices spread evenly over range(count).

    Args:
        count: number of points (>= 0).
        max_points: maximum number of indices; 0 keeps all.
    """
    if max_points <= 0 or count <= max_points:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, max_points).round().astype(np.int64))


def surfel_cloud_to_pointcloud2(
    cloud: SurfelCloud, frame_id: str, stamp_ns: int, max_points: int = 0
) -> PointCloud2:
    """Return the map as an unorganized PointCloud2 with the SURFEL_CLOUD_FIELDS layout.

    Args:
        cloud: the surfels, world (map) frame.
        frame_id: the frame the positions are in (the map frame).
        stamp_ns: header stamp, ns.
        max_points: decimate evenly to at most this many points; 0 keeps all.
    """
    keep = decimation_indices(len(cloud.position_m), max_points)
    points = np.zeros(len(keep), dtype=SURFEL_POINT_DTYPE)
    position = np.asarray(cloud.position_m, dtype=np.float32)[keep]
    normal = np.asarray(cloud.normal, dtype=np.float32)[keep]
    points["x"], points["y"], points["z"] = position[:, 0], position[:, 1], position[:, 2]
    points["rgb"] = pack_rgb(np.asarray(cloud.color_rgb)[keep].reshape(-1, 3))
    points["normal_x"], points["normal_y"], points["normal_z"] = normal[:, 0], normal[:, 1], normal[:, 2]
    points["radius"] = np.asarray(cloud.radius_m, dtype=np.float32)[keep]
    points["confidence"] = np.asarray(cloud.confidence, dtype=np.float32)[keep]

    return PointCloud2(
        header=make_header(stamp_ns, frame_id),
        height=1,
        width=len(points),
        fields=[
            PointField(name=name, offset=offset, datatype=datatype, count=count)
            for name, offset, datatype, count in SURFEL_CLOUD_FIELDS
        ],
        is_bigendian=False,
        point_step=SURFEL_POINT_STEP,
        row_step=SURFEL_POINT_STEP * len(points),
        data=points.tobytes(),
        is_dense=bool(np.all(np.isfinite(position))),
    )


def pointcloud2_to_arrays(msg: PointCloud2, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Return the named fields of a PointCloud2 as flat native-endian arrays.

    Organized clouds are read row-major (height × width) and flattened. Fields with
    count > 1 come back as (N, count).

    Args:
        msg: the cloud.
        names: fields to read; default all.

    Raises:
        ValueError: a requested field is absent, a datatype unknown, or the data too
            short for height × row_step.
    """
    available = {f.name: f for f in msg.fields}
    names = names or tuple(available)
    missing = [name for name in names if name not in available]
    if missing:
        raise ValueError(f"PointCloud2 has no field {missing[0]!r}: its fields are {sorted(available)}")
    if len(msg.data) < msg.height * msg.row_step:
        raise ValueError(
            f"PointCloud2 data has {len(msg.data)} bytes: expected height {msg.height} × "
            f"row_step {msg.row_step}"
        )

    byte_order = ">" if msg.is_bigendian else "<"
    formats = []
    for name in names:
        point_field = available[name]
        if point_field.datatype not in _POINT_FIELD_TYPES:
            raise ValueError(f"PointCloud2 field {name!r} has unknown datatype {point_field.datatype}")
        base = byte_order + _POINT_FIELD_TYPES[point_field.datatype]
        formats.append(base if point_field.count <= 1 else (base, (point_field.count,)))
    dtype = np.dtype(
        {
            "names": list(names),
            "formats": formats,
            "offsets": [available[name].offset for name in names],
            "itemsize": msg.point_step,
        }
    )
    data = np.frombuffer(memoryview(msg.data).cast("B"), dtype=np.uint8)
    rows = data[: msg.height * msg.row_step].reshape(msg.height, msg.row_step)
    rows = np.ascontiguousarray(rows[:, : msg.width * msg.point_step])
    points = rows.view(dtype).reshape(-1)
    return {name: points[name].astype(points[name].dtype.newbyteorder("=")) for name in names}


def pointcloud2_to_xyz(msg: PointCloud2) -> np.ndarray:
    """Return the x, y, z fields of a PointCloud2 as (N, 3) float64."""
    fields = pointcloud2_to_arrays(msg, ("x", "y", "z"))
    return np.stack([fields["x"], fields["y"], fields["z"]], axis=1).astype(np.float64)


# --- disc mesh ---------------------------------------------------------------------


def disc_triangles(
    position_m: np.ndarray, normal: np.ndarray, radius_m: np.ndarray, segments: int = 6
) -> np.ndarray:
    """Return the triangle fans of discs as (N × segments × 3, 3) float32 vertices.

    Each disc is a regular polygon of ``segments`` sides around its centre, in the plane
    orthogonal to its normal, with its corners at ``radius_m`` from the centre.

    Args:
        position_m: (N, 3) disc centres.
        normal: (N, 3) unit normals.
        radius_m: (N,) radii, metres.
        segments: triangles per disc (>= 3).

    Raises:
        ValueError: segments < 3 or arrays of different lengths.
    """
    if segments < 3:
        raise ValueError(f"invalid segments={segments}: a disc needs at least 3 triangles")
    position_m = np.asarray(position_m, dtype=np.float64).reshape(-1, 3)
    normal = np.asarray(normal, dtype=np.float64).reshape(-1, 3)
    radius_m = np.asarray(radius_m, dtype=np.float64).reshape(-1)
    if not len(position_m) == len(normal) == len(radius_m):
        raise ValueError(
            f"disc arrays differ in length: {len(position_m)} positions, {len(normal)} normals, "
            f"{len(radius_m)} radii"
        )

    # An in-plane axis: the normal crossed with the world axis it is least aligned with.
    helper = np.zeros_like(normal)
    helper[np.arange(len(normal)), np.argmin(np.abs(normal), axis=1)] = 1.0
    u = np.cross(normal, helper)
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    v = np.cross(normal, u)

    angles = np.linspace(0.0, 2.0 * np.pi, segments + 1)
    ring = (
        np.cos(angles)[None, :, None] * u[:, None, :] + np.sin(angles)[None, :, None] * v[:, None, :]
    ) * radius_m[:, None, None] + position_m[:, None, :]
    centre = np.broadcast_to(position_m[:, None, :], (len(position_m), segments, 3))
    triangles = np.stack([centre, ring[:, :-1], ring[:, 1:]], axis=2)
    return triangles.reshape(-1, 3).astype(np.float32)


def surfels_to_marker(
    cloud: SurfelCloud,
    frame_id: str,
    stamp_ns: int,
    segments: int = 6,
    max_surfels: int = 0,
    namespace: str = "surfels",
) -> Marker:
    """Return the surfels as one Marker TRIANGLE_LIST of colored discs (map frame).

    Args:
        cloud: the surfels, world (map) frame.
        frame_id: the map frame.
        stamp_ns: header stamp, ns.
        segments: triangles per disc.
        max_surfels: decimate evenly to at most this many discs; 0 keeps all.
        namespace: the marker namespace.
    """
    keep = decimation_indices(len(cloud.position_m), max_surfels)
    vertices = disc_triangles(cloud.position_m[keep], cloud.normal[keep], cloud.radius_m[keep], segments)
    colors = np.repeat(np.asarray(cloud.color_rgb)[keep].reshape(-1, 3), segments * 3, axis=0) / 255.0

    # NOTE: rclpy needs one Python object per vertex and per color, about 8 µs each
    # (5.5 s for 20,000 discs of 6 triangles on 2 cores), so callers should cap max_surfels.
    marker = Marker(header=make_header(stamp_ns, frame_id), ns=namespace, id=0)
    marker.type = Marker.TRIANGLE_LIST
    marker.action = Marker.ADD
    marker.pose.orientation.w = 1.0
    marker.scale.x = marker.scale.y = marker.scale.z = 1.0
    marker.color = ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0)
    marker.points = [Point(x=float(x), y=float(y), z=float(z)) for x, y, z in vertices.tolist()]
    marker.colors = [ColorRGBA(r=r, g=g, b=b, a=1.0) for r, g, b in colors.tolist()]
    return marker


def empty_surfel_cloud() -> SurfelCloud:
    """Return a SurfelCloud with no surfels (the map before the first frame)."""
    return SurfelCloud(
        position_m=np.zeros((0, 3), np.float32),
        normal=np.zeros((0, 3), np.float32),
        color_rgb=np.zeros((0, 3), np.uint8),
        radius_m=np.zeros(0, np.float32),
        confidence=np.zeros(0, np.float32),
        keyframe_id=np.zeros(0, np.int64),
    )
