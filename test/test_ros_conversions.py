"""Tests of the message <-> numpy conversions, against hand-laid byte buffers."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy and the ROS 2 message packages are not installed")

from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose, PoseStamped
from nav_msgs.msg import Odometry, Path
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from visualization_msgs.msg import Marker

from surfel_mapping_node import ros_conversions as conv
from surfel_mapping_node.mapper import SurfelCloud
from surfel_mapping_node.poses import InvalidPoseError

pytestmark = pytest.mark.ros


def make_image(
    encoding: str, width: int, height: int, step: int, data: bytes, big_endian: bool = False
) -> Image:
    return Image(
        height=height, width=width, encoding=encoding, is_bigendian=int(big_endian), step=step, data=data
    )


# --- images ------------------------------------------------------------------------


def test_mono8_with_row_padding_skips_the_padding():
    # 3×2 image, rows padded to 4 bytes; padding bytes are 0xEE.
    data = bytes([1, 2, 3, 0xEE, 4, 5, 6, 0xEE])
    pixels = conv.image_to_numpy(make_image("mono8", 3, 2, 4, data))

    np.testing.assert_array_equal(pixels, np.array([[1, 2, 3], [4, 5, 6]], np.uint8))
    assert pixels.flags.c_contiguous


def test_bgr8_becomes_rgb_and_rgb8_stays():
    # One row of two pixels: (B, G, R) = (10, 20, 30), (40, 50, 60).
    data = bytes([10, 20, 30, 40, 50, 60])
    bgr = conv.image_to_rgb_or_mono(make_image("bgr8", 2, 1, 6, data))
    rgb = conv.image_to_rgb_or_mono(make_image("rgb8", 2, 1, 6, data))

    np.testing.assert_array_equal(bgr, [[[30, 20, 10], [60, 50, 40]]])
    np.testing.assert_array_equal(rgb, [[[10, 20, 30], [40, 50, 60]]])


@pytest.mark.parametrize("encoding", ["16UC1", "mono16"])
@pytest.mark.parametrize("big_endian", [False, True])
def test_16_bit_depth_in_either_byte_order(encoding, big_endian):
    values = [0, 1000, 65535, 4242]
    order = ">" if big_endian else "<"
    # 2×2 image, each row padded with two bytes.
    data = (
        struct.pack(f"{order}2H", *values[:2])
        + b"\xab\xcd"
        + struct.pack(f"{order}2H", *values[2:])
        + b"\xab\xcd"
    )
    pixels = conv.image_to_numpy(make_image(encoding, 2, 2, 6, data, big_endian))

    assert pixels.dtype == np.uint16
    assert pixels.dtype.byteorder in ("=", "<", "|") or pixels.dtype.isnative
    np.testing.assert_array_equal(pixels, np.array(values, np.uint16).reshape(2, 2))


def test_32fc1_big_endian_keeps_nan():
    values = [1.5, float("nan"), 0.25]
    data = struct.pack(">3f", *values)
    pixels = conv.image_to_numpy(make_image("32FC1", 3, 1, 12, data, big_endian=True))

    assert pixels.dtype == np.float32
    assert pixels.dtype.isnative
    np.testing.assert_allclose(pixels, [values], rtol=0, atol=0, equal_nan=True)


def test_numpy_to_image_round_trip():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    depth = rng.integers(0, 5000, (4, 5), dtype=np.uint16)

    rgb_msg = conv.numpy_to_image(rgb, "rgb8", 1_500_000_123, "cam")
    depth_msg = conv.numpy_to_image(depth, "16UC1", 7, "cam")

    assert (rgb_msg.step, rgb_msg.header.stamp.sec, rgb_msg.header.stamp.nanosec) == (15, 1, 500_000_123)
    assert depth_msg.step == 10
    assert not depth_msg.is_bigendian
    np.testing.assert_array_equal(conv.image_to_numpy(rgb_msg), rgb)
    np.testing.assert_array_equal(conv.image_to_numpy(depth_msg), depth)


@pytest.mark.parametrize(
    ("msg", "allowed", "match"),
    [
        (make_image("yuv422", 2, 1, 4, bytes(4)), None, "unsupported image encoding 'yuv422'"),
        (
            make_image("16UC1", 2, 1, 4, bytes(4)),
            conv.COLOR_ENCODINGS,
            "unsupported image encoding '16UC1': use one of mono8",
        ),
        (make_image("mono8", 4, 2, 3, bytes(8)), None, "invalid step 3 .* a row needs at least 4 bytes"),
        (make_image("mono16", 2, 2, 4, bytes(6)), None, "has 6 bytes of data: expected 8"),
        (make_image("mono8", 0, 0, 0, b""), None, "empty mono8 image 0x0"),
    ],
)
def test_unreadable_images_raise(msg, allowed, match):
    with pytest.raises(conv.ImageConversionError, match=match):
        conv.image_to_numpy(msg, allowed)


def test_numpy_to_image_rejects_a_mismatched_array():
    with pytest.raises(conv.ImageConversionError, match="does not fit encoding '16UC1'"):
        conv.numpy_to_image(np.zeros((2, 2), np.float32), "16UC1", 0, "cam")
    with pytest.raises(conv.ImageConversionError, match="unsupported image encoding 'bayer'"):
        conv.numpy_to_image(np.zeros((2, 2), np.uint8), "bayer", 0, "cam")


# --- stamps, camera info, poses -----------------------------------------------------


def test_stamp_conversions():
    assert conv.stamp_to_ns(Time(sec=3, nanosec=5)) == 3_000_000_005
    stamp = conv.ns_to_stamp(12_999_999_999)
    assert (stamp.sec, stamp.nanosec) == (12, 999_999_999)
    with pytest.raises(ValueError, match="invalid stamp -1 ns"):
        conv.ns_to_stamp(-1)


def test_camera_info_prefers_p_over_k():
    info = CameraInfo(width=640, height=480)
    info.k = [585.0, 0.0, 320.0, 0.0, 586.0, 240.0, 0.0, 0.0, 1.0]
    camera_k = conv.camera_from_camera_info(info)
    info.p = [500.0, 0.0, 300.0, 0.0, 0.0, 501.0, 200.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    camera_p = conv.camera_from_camera_info(info)

    assert (camera_k.width, camera_k.height, camera_k.fx, camera_k.fy, camera_k.cx, camera_k.cy) == (
        640,
        480,
        585.0,
        586.0,
        320.0,
        240.0,
    )
    assert (camera_p.fx, camera_p.fy, camera_p.cx, camera_p.cy) == (500.0, 501.0, 300.0, 200.0)


def test_uncalibrated_or_invalid_camera_info_raises():
    with pytest.raises(conv.CameraInfoError, match="K and P all zero"):
        conv.camera_from_camera_info(CameraInfo(width=640, height=480))
    info = CameraInfo(width=0, height=480)
    info.k = [585.0, 0.0, 320.0, 0.0, 585.0, 240.0, 0.0, 0.0, 1.0]
    with pytest.raises(conv.CameraInfoError, match="invalid camera size 0x480"):
        conv.camera_from_camera_info(info)


def test_stereo_baseline_from_kitti_right_projection():
    # KITTI sequence 00, P1: fx = 718.856, P1[0,3] = -386.1448 (baseline 0.537 m).
    info = CameraInfo(width=1241, height=376)
    info.p = [718.856, 0.0, 607.1928, -386.1448, 0.0, 718.856, 185.2157, 0.0, 0.0, 0.0, 1.0, 0.0]

    np.testing.assert_allclose(conv.stereo_baseline_m(info), 386.1448 / 718.856, rtol=1e-12)


def test_stereo_baseline_without_translation_raises():
    info = CameraInfo(width=10, height=10)
    with pytest.raises(conv.CameraInfoError, match=r"P\[0,0\] = 0"):
        conv.stereo_baseline_m(info)
    info.p = [700.0, 0.0, 5.0, 0.0, 0.0, 700.0, 5.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    with pytest.raises(conv.CameraInfoError, match=r"gives baseline -?0\.0 m"):
        conv.stereo_baseline_m(info)


def make_pose(xyz, quaternion_xyzw) -> Pose:
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = xyz
    pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = quaternion_xyzw
    return pose


def test_pose_stamped_and_odometry_to_matrix():
    # 90° about z: x -> y, y -> -x.
    s = math.sqrt(0.5)
    expected = np.array(
        [[0.0, -1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 3.0], [0.0, 0.0, 0.0, 1.0]]
    )
    stamped = PoseStamped(pose=make_pose((1.0, 2.0, 3.0), (0.0, 0.0, s, s)))
    stamped.header.stamp = Time(sec=2, nanosec=10)
    stamped.header.frame_id = "map"
    odometry = Odometry(child_frame_id="base_link")
    odometry.header = stamped.header
    odometry.pose.pose = stamped.pose

    from_pose = conv.pose_stamped_to_matrix(stamped)
    from_odometry = conv.odometry_to_matrix(odometry)

    assert (from_pose.stamp_ns, from_pose.frame_id) == (2_000_000_010, "map")
    np.testing.assert_allclose(from_pose.T, expected, atol=1e-12)
    np.testing.assert_allclose(from_odometry.T, expected, atol=1e-12)
    back = conv.matrix_to_pose(expected)
    np.testing.assert_allclose(
        [back.orientation.x, back.orientation.y, back.orientation.z, back.orientation.w],
        [0, 0, s, s],
        atol=1e-12,
    )


@pytest.mark.parametrize(
    ("xyz", "q", "match"),
    [
        ((float("nan"), 0.0, 0.0), (0.0, 0.0, 0.0, 1.0), "NaN or infinite"),
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0), "invalid quaternion"),
        ((0.0, 0.0, 0.0), (float("nan"), 0.0, 0.0, 1.0), "invalid quaternion"),
    ],
)
def test_invalid_poses_raise(xyz, q, match):
    with pytest.raises(InvalidPoseError, match=match):
        conv.pose_stamped_to_matrix(PoseStamped(pose=make_pose(xyz, q)))


def test_path_to_poses_invalid_and_duplicates():
    path = Path()
    for sec, x, w in [(1, 0.5, 1.0), (2, float("nan"), 1.0), (3, 1.5, 1.0), (3, 2.5, 1.0)]:
        stamped = PoseStamped(pose=make_pose((x, 0.0, 0.0), (0.0, 0.0, 0.0, w)))
        stamped.header.stamp = Time(sec=sec)
        path.poses.append(stamped)

    result = conv.path_to_poses(path)

    assert sorted(result.poses) == [1_000_000_000, 3_000_000_000]
    np.testing.assert_allclose(result.poses[3_000_000_000][:3, 3], [2.5, 0.0, 0.0])
    assert [stamp for stamp, _ in result.invalid] == [2_000_000_000]
    assert "NaN" in result.invalid[0][1]
    assert result.duplicate_stamps_ns == [3_000_000_000]


def test_poses_to_path_round_trip():
    rng = np.random.default_rng(5)
    poses = {}
    for stamp_ns in (30, 10, 20):
        q = rng.normal(size=4)
        poses[stamp_ns] = conv.pose_to_matrix(
            make_pose(tuple(rng.normal(size=3)), tuple(q / np.linalg.norm(q)))
        )

    path = conv.poses_to_path(poses, "map", 99)
    back = conv.path_to_poses(path)

    assert [conv.stamp_to_ns(p.header.stamp) for p in path.poses] == [10, 20, 30]
    assert path.header.frame_id == "map"
    for stamp_ns, T in poses.items():
        np.testing.assert_allclose(back.poses[stamp_ns], T, atol=1e-9)


# --- point clouds and markers -------------------------------------------------------


def make_cloud() -> SurfelCloud:
    return SurfelCloud(
        position_m=np.array([[1.0, 2.0, 3.0], [-0.5, 0.25, 4.0], [0.0, 0.0, 1.0]], np.float32),
        normal=np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32),
        color_rgb=np.array([[255, 128, 1], [0, 0, 0], [10, 20, 30]], np.uint8),
        radius_m=np.array([0.01, 0.02, 0.03], np.float32),
        confidence=np.array([1.0, 20.0, 3.5], np.float32),
        keyframe_id=np.array([0, 0, 1], np.int64),
    )


def packed_rgb_float(r: int, g: int, b: int) -> float:
    """The PCL convention: the bytes of uint32 0x00RRGGBB read as a float32."""
    return struct.unpack("<f", struct.pack("<I", (r << 16) | (g << 8) | b))[0]


def test_surfel_pointcloud2_hand_laid_bytes():
    cloud = make_cloud()
    msg = conv.surfel_cloud_to_pointcloud2(cloud, "map", 5_000_000_001, max_points=0)

    expected = b"".join(
        struct.pack(
            "<9f",
            *cloud.position_m[i],
            packed_rgb_float(*(int(c) for c in cloud.color_rgb[i])),
            *cloud.normal[i],
            cloud.radius_m[i],
            cloud.confidence[i],
        )
        for i in range(3)
    )
    assert bytes(msg.data) == expected
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        ("x", 0, PointField.FLOAT32, 1),
        ("y", 4, PointField.FLOAT32, 1),
        ("z", 8, PointField.FLOAT32, 1),
        ("rgb", 12, PointField.FLOAT32, 1),
        ("normal_x", 16, PointField.FLOAT32, 1),
        ("normal_y", 20, PointField.FLOAT32, 1),
        ("normal_z", 24, PointField.FLOAT32, 1),
        ("radius", 28, PointField.FLOAT32, 1),
        ("confidence", 32, PointField.FLOAT32, 1),
    ]
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 3, 36, 108)
    assert not msg.is_bigendian
    assert msg.is_dense
    assert (msg.header.frame_id, msg.header.stamp.sec, msg.header.stamp.nanosec) == ("map", 5, 1)


def test_packed_rgb_round_trips():
    colors = np.array([[255, 128, 1], [0, 0, 0], [1, 2, 3]], np.uint8)
    np.testing.assert_array_equal(conv.unpack_rgb(conv.pack_rgb(colors)), colors)


def test_large_cloud_is_decimated_evenly():
    n = 1001
    rng = np.random.default_rng(11)
    cloud = SurfelCloud(
        position_m=rng.normal(size=(n, 3)).astype(np.float32),
        normal=np.tile(np.array([[0, 0, 1]], np.float32), (n, 1)),
        color_rgb=np.zeros((n, 3), np.uint8),
        radius_m=np.arange(n, dtype=np.float32),
        confidence=np.ones(n, np.float32),
        keyframe_id=np.zeros(n, np.int64),
    )

    msg = conv.surfel_cloud_to_pointcloud2(cloud, "map", 0, max_points=11)
    fields = conv.pointcloud2_to_arrays(msg, ("radius",))

    assert msg.width == 11
    np.testing.assert_array_equal(fields["radius"], np.arange(0, 1001, 100, dtype=np.float32))


def test_pointcloud2_reader_handles_organized_padded_big_endian_clouds():
    # 2 rows × 2 points; each point: x, y, z float32 big-endian + 4 pad bytes; each row
    # padded by 8 bytes. Row-major order: row 0 then row 1.
    points = [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0), (7.0, 8.0, 9.0), (10.0, 11.0, 12.0)]
    rows = []
    for row in range(2):
        rows.append(
            b"".join(struct.pack(">3f", *p) + b"PADS" for p in points[2 * row : 2 * row + 2]) + b"ROWPAD!!"
        )
    msg = PointCloud2(
        height=2,
        width=2,
        fields=[
            PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
            for i, n in enumerate("xyz")
        ],
        is_bigendian=True,
        point_step=16,
        row_step=40,
        data=b"".join(rows),
    )

    np.testing.assert_allclose(conv.pointcloud2_to_xyz(msg), np.array(points), rtol=0, atol=0)
    with pytest.raises(ValueError, match="has no field 'rgb'"):
        conv.pointcloud2_to_arrays(msg, ("rgb",))
    msg.data = msg.data[:50]
    with pytest.raises(ValueError, match="data has 50 bytes"):
        conv.pointcloud2_to_xyz(msg)


def test_disc_triangles_geometry():
    rng = np.random.default_rng(2)
    position = rng.normal(size=(5, 3))
    normal = rng.normal(size=(5, 3))
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    radius = rng.uniform(0.01, 0.1, 5)

    vertices = conv.disc_triangles(position, normal, radius, segments=8).reshape(5, 8, 3, 3)

    np.testing.assert_allclose(vertices[:, :, 0], np.repeat(position[:, None], 8, axis=1), atol=1e-6)
    offsets = vertices[:, :, 1:] - position[:, None, None, :]
    np.testing.assert_allclose(
        np.linalg.norm(offsets, axis=-1), np.broadcast_to(radius[:, None, None], (5, 8, 2)), rtol=1e-5
    )
    np.testing.assert_allclose(np.einsum("nsvk,nk->nsv", offsets, normal), 0.0, atol=1e-6)
    # Consecutive triangles share an edge: the fan closes around the centre.
    np.testing.assert_allclose(vertices[:, 1:, 1], vertices[:, :-1, 2], atol=1e-6)
    np.testing.assert_allclose(vertices[:, 0, 1], vertices[:, -1, 2], atol=1e-6)


def test_disc_triangles_reject_bad_input():
    with pytest.raises(ValueError, match="invalid segments=2"):
        conv.disc_triangles(np.zeros((1, 3)), np.array([[0, 0, 1.0]]), np.ones(1), segments=2)
    with pytest.raises(ValueError, match="2 positions, 1 normals, 2 radii"):
        conv.disc_triangles(np.zeros((2, 3)), np.array([[0, 0, 1.0]]), np.ones(2))


def test_surfels_to_marker_is_a_colored_triangle_list():
    cloud = make_cloud()
    marker = conv.surfels_to_marker(cloud, "map", 0, segments=4)

    assert marker.type == Marker.TRIANGLE_LIST
    assert marker.header.frame_id == "map"
    assert len(marker.points) == len(marker.colors) == 3 * 4 * 3
    np.testing.assert_allclose(
        [marker.colors[0].r, marker.colors[0].g, marker.colors[0].b], np.array([255, 128, 1]) / 255, rtol=1e-6
    )
    np.testing.assert_allclose([marker.points[0].x, marker.points[0].y, marker.points[0].z], [1.0, 2.0, 3.0])


def test_empty_cloud_converts():
    msg = conv.surfel_cloud_to_pointcloud2(conv.empty_surfel_cloud(), "map", 0)
    marker = conv.surfels_to_marker(conv.empty_surfel_cloud(), "map", 0)
    assert (msg.width, len(msg.data), len(marker.points)) == (0, 0, 0)
