"""ROS 2 bag → Frames: round trips of real data, stamp matching, keyframes, image decoding, bad bags."""

from __future__ import annotations

import types

import numpy as np
import pytest
from rosbags.rosbag2 import Writer
from rosbags.typesys import Stores, get_typestore

from surfel_mapping_node import topics
from surfel_mapping_node.bag_writer import KeyframeRule, write_bag
from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.config import MapperConfig
from surfel_mapping_node.datasets.base import Frame
from surfel_mapping_node.datasets.kitti import KittiOdometryDataset
from surfel_mapping_node.datasets.rosbag import BagDataset, BagFormatError, decode_image
from surfel_mapping_node.datasets.seven_scenes import SevenScenesDataset
from surfel_mapping_node.pipeline import run_pipeline

TYPESTORE = get_typestore(Stores.ROS2_JAZZY)
CAMERA = PinholeCamera(width=4, height=3, fx=500.0, fy=500.0, cx=1.5, cy=1.0)


def nearest_rigid(T: np.ndarray) -> np.ndarray:
    """T with its rotation replaced by the nearest rotation matrix (SVD, Frobenius norm)."""
    U, _, Vt = np.linalg.svd(T[:3, :3])
    result = T.copy()
    result[:3, :3] = U @ np.diag([1.0, 1.0, np.linalg.det(U @ Vt)]) @ Vt
    return result


def rgbd_frames(count: int, step_m: float = 0.05) -> list[Frame]:
    rng = np.random.default_rng(3)
    frames = []
    for i in range(count):
        T = np.eye(4)
        T[0, 3] = step_m * i
        frames.append(
            Frame(
                index=i,
                stamp_ns=5_000_000_000 + i * 100_000_000,
                image=rng.integers(0, 256, (3, 4, 3), dtype=np.uint8),
                camera=CAMERA,
                T_world_camera=T,
                depth_raw=rng.integers(0, 65536, (3, 4), dtype=np.uint16),
            )
        )
    return frames


def assert_same_frame(read: Frame, original: Frame) -> None:
    assert read.stamp_ns == original.stamp_ns
    assert read.camera == original.camera
    np.testing.assert_array_equal(read.image, original.image)
    assert read.image.dtype == original.image.dtype
    # Poses: a quaternion carries the nearest rotation of a not exactly orthonormal matrix.
    np.testing.assert_allclose(read.T_world_camera, nearest_rigid(original.T_world_camera), rtol=0, atol=1e-9)
    if original.depth_raw is not None:
        assert read.depth_raw.dtype == original.depth_raw.dtype
        np.testing.assert_array_equal(read.depth_raw, original.depth_raw)
        assert read.depth_scale == original.depth_scale
    else:
        np.testing.assert_array_equal(read.right_image, original.right_image)
        np.testing.assert_allclose(read.baseline_m, original.baseline_m, rtol=1e-12)


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_7scenes_round_trip_bit_exact(seven_scenes_dir, tmp_path, storage):
    source = SevenScenesDataset(seven_scenes_dir)
    originals = [source[i] for i in range(10)]

    write_bag(originals, tmp_path / "bag", storage=storage)
    with BagDataset(tmp_path / "bag") as bag:
        assert len(bag) == 10
        assert bag.camera == source.camera
        for i, original in enumerate(originals):
            read = bag[i]
            assert read.index == i
            assert_same_frame(read, original)
            # Keyframes the converter picked by the mapper's own rule are left to the mapper.
            assert read.keyframe_id is None
            # The rotations of the 7-Scenes text files are orthonormal to about 2e-4 only.
            np.testing.assert_allclose(read.T_world_camera, original.T_world_camera, atol=2e-4)


class FrameList:
    """The Dataset protocol over frames held in memory."""

    def __init__(self, frames: list[Frame]) -> None:
        self.frames = frames
        self.camera = frames[0].camera

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> Frame:
        return self.frames[index]

    def __iter__(self):
        return iter(self.frames)


def test_bag_maps_like_its_source(seven_scenes_dir, tmp_path):
    # Rigid poses, as a SLAM system reports them: then the bag carries them exactly.
    frames = [SevenScenesDataset(seven_scenes_dir)[i] for i in range(5)]
    for frame in frames:
        frame.T_world_camera = nearest_rigid(frame.T_world_camera)
    config = MapperConfig()

    write_bag(frames, tmp_path / "bag")
    source_cloud = run_pipeline(FrameList(frames), config, range(5)).mapper.cloud()
    with BagDataset(tmp_path / "bag") as bag:
        bag_cloud = run_pipeline(bag, config, range(5)).mapper.cloud()

    assert len(source_cloud.position_m) > 1000
    for field in ("position_m", "normal", "color_rgb", "radius_m", "confidence", "keyframe_id"):
        np.testing.assert_array_equal(getattr(bag_cloud, field), getattr(source_cloud, field), err_msg=field)


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_kitti_round_trip_bit_exact(kitti_dir, tmp_path, storage):
    source = KittiOdometryDataset(kitti_dir, "00")
    originals = [source[i] for i in range(5)]

    write_bag(originals, tmp_path / "bag", storage=storage)
    with BagDataset(tmp_path / "bag") as bag:
        assert bag.kind == "stereo"
        assert len(bag) == 5
        np.testing.assert_allclose(bag.baseline_m, source.baseline_m, rtol=1e-12)
        for i, original in enumerate(originals):
            assert_same_frame(bag[i], original)
        assert [f.stamp_ns for f in bag] == [0, 100_000_000, 200_000_000, 300_000_000, 400_000_000]


def test_keyframe_ids_from_latest_path(tmp_path):
    frames = rgbd_frames(6, step_m=0.06)  # keyframes at 0, 0.12, 0.24 m: frames 0, 2, 4

    write_bag(frames, tmp_path / "bag")
    with BagDataset(tmp_path / "bag", keyframes="path") as bag:
        ids = [f.keyframe_id for f in bag]
        keyframe_poses = bag.keyframe_poses()

    expected = {i: frames[i].stamp_ns for i in (0, 2, 4)}
    assert ids == [expected.get(i) for i in range(6)]
    assert sorted(keyframe_poses) == sorted(expected.values())
    np.testing.assert_allclose(keyframe_poses[frames[4].stamp_ns], frames[4].T_world_camera, atol=1e-12)


def test_dataset_keyframes_kept_by_default(tmp_path):
    frames = rgbd_frames(4)
    frames[1].keyframe_id = 7
    frames[3].keyframe_id = 8

    write_bag(frames, tmp_path / "bag", keyframes=KeyframeRule(from_dataset=True))
    with BagDataset(tmp_path / "bag") as bag:
        ids = [f.keyframe_id for f in bag]
    with BagDataset(tmp_path / "bag", keyframes="none") as bag:
        no_ids = [f.keyframe_id for f in bag]

    # The bag identifies keyframes by stamp, so the id is the keyframe's stamp in ns.
    assert ids == [None, frames[1].stamp_ns, None, frames[3].stamp_ns]
    assert no_ids == [None] * 4


def test_tum_depth_reads_back_as_metres(tmp_path):
    frames = rgbd_frames(2)
    for frame in frames:
        frame.depth_scale = 1.0 / 5000.0
        frame.depth_raw[0, 0] = 0

    write_bag(frames, tmp_path / "bag")
    with BagDataset(tmp_path / "bag") as bag:
        read = bag[1]

    assert read.depth_raw.dtype == np.float32 and read.depth_scale == 1.0
    assert np.isnan(read.depth_raw[0, 0])
    expected_m = frames[1].depth_raw.astype(np.float64) / 5000.0
    np.testing.assert_allclose(read.depth_raw.ravel()[1:], expected_m.ravel()[1:], rtol=0, atol=1e-6)


def write_raw_bag(path, messages: dict[str, tuple[str, list[tuple[int, object]]]]) -> None:
    """Write MESSAGES {topic: (type, [(bag time ns, message)])} with rosbags directly."""
    with Writer(path, version=9) as writer:
        for topic, (msgtype, items) in messages.items():
            connection = writer.add_connection(topic, msgtype, typestore=TYPESTORE)
            for bag_ns, message in items:
                writer.write(connection, bag_ns, TYPESTORE.serialize_cdr(message, msgtype))


def header(stamp_ns: int, frame_id: str):
    t = TYPESTORE.types
    sec, nanosec = divmod(stamp_ns, 1_000_000_000)
    return t["std_msgs/msg/Header"](
        stamp=t["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec), frame_id=frame_id
    )


def image_message(stamp_ns: int, encoding: str, data: bytes, width: int, height: int, step: int, bigendian=0):
    return TYPESTORE.types["sensor_msgs/msg/Image"](
        header=header(stamp_ns, "cam"),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=bigendian,
        step=step,
        data=np.frombuffer(data, dtype=np.uint8),
    )


def camera_info_message(stamp_ns: int):
    t = TYPESTORE.types
    roi = t["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    K = np.array([500.0, 0, 1.5, 0, 500.0, 1.0, 0, 0, 1])
    return t["sensor_msgs/msg/CameraInfo"](
        header=header(stamp_ns, "cam"),
        height=3,
        width=4,
        distortion_model="plumb_bob",
        d=np.zeros(5),
        k=K,
        r=np.eye(3).ravel(),
        p=np.zeros(12),
        binning_x=0,
        binning_y=0,
        roi=roi,
    )


def pose_message(stamp_ns: int, x_m: float):
    t = TYPESTORE.types
    pose = t["geometry_msgs/msg/Pose"](
        position=t["geometry_msgs/msg/Point"](x=x_m, y=0.0, z=0.0),
        orientation=t["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0),
    )
    return t["geometry_msgs/msg/PoseStamped"](header=header(stamp_ns, "map"), pose=pose)


def recorded_bag(path, pose_offset_ns: int, depth_stamps_ns=(0, 100_000_000, 200_000_000)):
    """A bag as a live recording makes it: bgr8 images, depth, poses off by POSE_OFFSET_NS."""
    image_stamps = [0, 100_000_000, 200_000_000]
    bgr = bytes(range(36))
    depth = np.arange(12, dtype="<u2").tobytes()
    write_raw_bag(
        path,
        {
            topics.IMAGE_TOPIC: (
                "sensor_msgs/msg/Image",
                [(s + 5, image_message(s, "bgr8", bgr, 4, 3, 12)) for s in image_stamps],
            ),
            topics.DEPTH_TOPIC: (
                "sensor_msgs/msg/Image",
                [(s + 7, image_message(s, "16UC1", depth, 4, 3, 8)) for s in depth_stamps_ns],
            ),
            topics.CAMERA_INFO_TOPIC: ("sensor_msgs/msg/CameraInfo", [(0, camera_info_message(0))]),
            topics.POSE_TOPIC: (
                "geometry_msgs/msg/PoseStamped",
                [(s + pose_offset_ns, pose_message(s + pose_offset_ns, s * 1e-9)) for s in image_stamps],
            ),
        },
    )


def test_stamp_matching_within_tolerance(tmp_path):
    recorded_bag(tmp_path / "bag", pose_offset_ns=400_000)

    with BagDataset(tmp_path / "bag", stamp_tolerance_ns=500_000) as bag:
        frames = list(bag)

    assert [f.stamp_ns for f in frames] == [0, 100_000_000, 200_000_000]
    # Header stamps, not bag times (which are 5 ns later), identify the frames.
    np.testing.assert_allclose([f.T_world_camera[0, 3] for f in frames], [0.0, 0.1, 0.2], atol=1e-15)
    # bgr8 comes back as RGB; the camera from K since P is all zero.
    np.testing.assert_array_equal(frames[0].image[0, 0], [2, 1, 0])
    assert frames[0].camera == CAMERA
    np.testing.assert_array_equal(frames[0].depth_raw, np.arange(12, dtype=np.uint16).reshape(3, 4))
    # No keyframe topic: the mapper decides.
    assert frames[0].keyframe_id is None


def test_unmatched_images_skipped(tmp_path):
    recorded_bag(tmp_path / "partial", pose_offset_ns=0, depth_stamps_ns=(0, 200_000_000))
    recorded_bag(tmp_path / "late", pose_offset_ns=2_000_000)

    with BagDataset(tmp_path / "partial") as bag:
        assert [f.stamp_ns for f in bag] == [0, 200_000_000]
    with pytest.raises(BagFormatError, match="none of its 3 images has a depth and a pose within 1000000 ns"):
        BagDataset(tmp_path / "late")


def test_missing_topics_error_lists_topics(tmp_path):
    write_raw_bag(
        tmp_path / "bag",
        {
            "/camera/color/image_raw": (
                "sensor_msgs/msg/Image",
                [(0, image_message(0, "rgb8", bytes(36), 4, 3, 12))],
            ),
            topics.DEPTH_TOPIC: (
                "sensor_msgs/msg/Image",
                [(0, image_message(0, "16UC1", bytes(24), 4, 3, 8))],
            ),
        },
    )

    with pytest.raises(BagFormatError) as error:
        BagDataset(tmp_path / "bag")

    message = str(error.value)
    assert "lacks the topics /camera/image, /camera/camera_info" in message
    assert "Topics found: /camera/color/image_raw (sensor_msgs/msg/Image), /camera/depth" in message
    assert "Expected RGB-D: /camera/image, /camera/depth, /camera/camera_info" in message
    assert "/stereo/left/image_rect" in message


def test_bag_without_poses_rejected(tmp_path):
    write_bag(rgbd_frames(2), tmp_path / "bag")
    write_raw_bag(
        tmp_path / "no_pose",
        {
            topics.IMAGE_TOPIC: (
                "sensor_msgs/msg/Image",
                [(0, image_message(0, "rgb8", bytes(36), 4, 3, 12))],
            ),
            topics.DEPTH_TOPIC: (
                "sensor_msgs/msg/Image",
                [(0, image_message(0, "16UC1", bytes(24), 4, 3, 8))],
            ),
            topics.CAMERA_INFO_TOPIC: ("sensor_msgs/msg/CameraInfo", [(0, camera_info_message(0))]),
        },
    )

    with pytest.raises(BagFormatError, match="lacks the topics /slam/pose"):
        BagDataset(tmp_path / "no_pose")


def test_custom_topic_names(tmp_path):
    renamed = topics.TopicNames(image="/rgb", depth="/d", camera_info="/info", pose="/vins/pose")
    write_bag(rgbd_frames(2), tmp_path / "bag", topics=renamed)

    with pytest.raises(BagFormatError, match="lacks the topics /camera/image"):
        BagDataset(tmp_path / "bag")
    with BagDataset(tmp_path / "bag", topics=renamed) as bag:
        assert len(bag) == 2


def test_bad_arguments_and_indices(tmp_path):
    write_bag(rgbd_frames(2), tmp_path / "bag")

    with pytest.raises(FileNotFoundError, match="bag not found"):
        BagDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown keyframes mode 'slam': use one of auto, path, none"):
        BagDataset(tmp_path / "bag", keyframes="slam")
    with pytest.raises(ValueError, match="invalid stamp tolerance -1 ns"):
        BagDataset(tmp_path / "bag", stamp_tolerance_ns=-1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BagFormatError, match="cannot open bag"):
        BagDataset(tmp_path / "empty")
    bag = BagDataset(tmp_path / "bag")
    assert bag[-1].stamp_ns == bag[1].stamp_ns
    with pytest.raises(IndexError, match="frame index 2 out of range: the bag has 2 frames"):
        bag[2]
    bag.close()
    with pytest.raises(ValueError, match="is closed"):
        bag[0]


def test_decode_image_padding_byte_order():
    # 2×3 mono16 rows padded to 8 bytes, big-endian: 0x0102 = 258 first.
    rows = [b"\x01\x02\x00\x03\x00\x04\xff\xff", b"\x00\x05\x00\x06\x00\x07\xff\xff"]
    message = types.SimpleNamespace(
        encoding="16UC1", height=2, width=3, step=8, is_bigendian=1, data=b"".join(rows)
    )

    pixels = decode_image(message)

    np.testing.assert_array_equal(pixels, [[258, 3, 4], [5, 6, 7]])
    assert pixels.dtype == np.uint16


def test_decode_image_bgra_to_rgb():
    message = types.SimpleNamespace(
        encoding="bgra8", height=1, width=2, step=8, is_bigendian=0, data=bytes([1, 2, 3, 4, 5, 6, 7, 8])
    )

    np.testing.assert_array_equal(decode_image(message), [[[3, 2, 1], [7, 6, 5]]])


def test_decode_image_bad_encoding_size():
    short = types.SimpleNamespace(encoding="mono8", height=2, width=3, step=3, is_bigendian=0, data=bytes(5))
    jpeg = types.SimpleNamespace(encoding="jpeg", height=2, width=3, step=3, is_bigendian=0, data=bytes(6))

    with pytest.raises(BagFormatError, match="mono8 image 3x2 with step 3 has 5 bytes of data: expected 6"):
        decode_image(short)
    with pytest.raises(BagFormatError, match="unsupported image encoding 'jpeg'"):
        decode_image(jpeg)


def test_wrong_topic_type_rejected(tmp_path):
    recorded_bag(tmp_path / "bag", pose_offset_ns=0)
    renamed = topics.TopicNames(pose=topics.CAMERA_INFO_TOPIC)

    with pytest.raises(BagFormatError, match="topic /camera/camera_info has type sensor_msgs/msg/CameraInfo"):
        BagDataset(tmp_path / "bag", topics=renamed)


def test_odometry_poses_accepted(tmp_path):
    t = TYPESTORE.types
    stamps = [0, 100_000_000]
    odometry = []
    for s in stamps:
        pose = pose_message(s, s * 1e-9).pose
        covariance = t["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36))
        twist = t["geometry_msgs/msg/TwistWithCovariance"](
            twist=t["geometry_msgs/msg/Twist"](
                linear=t["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0),
                angular=t["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0),
            ),
            covariance=np.zeros(36),
        )
        message = t["nav_msgs/msg/Odometry"](
            header=header(s, "map"), child_frame_id="cam", pose=covariance, twist=twist
        )
        odometry.append((s, message))
    write_raw_bag(
        tmp_path / "bag",
        {
            topics.IMAGE_TOPIC: (
                "sensor_msgs/msg/Image",
                [(s, image_message(s, "mono8", bytes(12), 4, 3, 4)) for s in stamps],
            ),
            topics.DEPTH_TOPIC: (
                "sensor_msgs/msg/Image",
                [(s, image_message(s, "32FC1", bytes(48), 4, 3, 16)) for s in stamps],
            ),
            topics.CAMERA_INFO_TOPIC: ("sensor_msgs/msg/CameraInfo", [(0, camera_info_message(0))]),
            topics.POSE_TOPIC: ("nav_msgs/msg/Odometry", odometry),
        },
    )

    with BagDataset(tmp_path / "bag") as bag:
        frames = list(bag)

    np.testing.assert_allclose([f.T_world_camera[0, 3] for f in frames], [0.0, 0.1], atol=1e-15)
    assert frames[1].depth_raw.dtype == np.float32
    assert frames[1].depth_scale == 1.0
