"""Dataset → ROS 2 bag: message fields against the ROS specs, keyframe Path, metadata, bad input."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from rosbags.rosbag2 import Reader
from rosbags.typesys import Stores, get_typestore

from surfel_mapping_node import topics
from surfel_mapping_node.bag_cli import main as bag_main
from surfel_mapping_node.bag_writer import (
    BagOutputError,
    FrameEncodingError,
    KeyframeRule,
    check_output_dir,
    encode_depth,
    write_bag,
)
from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.datasets.base import Frame
from surfel_mapping_node.datasets.rosbag import BagDataset, source_format_of_bag

TYPESTORE = get_typestore(Stores.ROS2_JAZZY)
CAMERA = PinholeCamera(width=4, height=3, fx=500.0, fy=501.0, cx=1.5, cy=1.25)


def pose_x(x_m: float, yaw_deg: float = 0.0) -> np.ndarray:
    """Camera-to-world pose translated along x and turned about the optical axis z."""
    c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    T = np.eye(4)
    T[:3, :3] = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
    T[0, 3] = x_m
    return T


def rgbd_frames(count: int = 3, xs_m: list[float] | None = None, depth_scale: float = 0.001) -> list[Frame]:
    rng = np.random.default_rng(7)
    xs_m = xs_m if xs_m is not None else [0.05 * i for i in range(count)]
    return [
        Frame(
            index=i,
            stamp_ns=1_000_000_000 + i * 33_333_333,
            image=rng.integers(0, 256, (3, 4, 3), dtype=np.uint8),
            camera=CAMERA,
            T_world_camera=pose_x(x),
            depth_raw=rng.integers(0, 65536, (3, 4), dtype=np.uint16),
            depth_scale=depth_scale,
        )
        for i, x in enumerate(xs_m)
    ]


def stereo_frames(count: int = 2) -> list[Frame]:
    rng = np.random.default_rng(8)
    return [
        Frame(
            index=i,
            stamp_ns=i * 100_000_000,
            image=rng.integers(0, 256, (3, 4), dtype=np.uint8),
            camera=CAMERA,
            T_world_camera=pose_x(0.8 * i),
            right_image=rng.integers(0, 256, (3, 4), dtype=np.uint8),
            baseline_m=0.537,
        )
        for i in range(count)
    ]


def read_messages(bag: Path) -> dict[str, list[tuple[int, object]]]:
    """Every message of the bag by topic: (bag time ns, deserialized message)."""
    messages: dict[str, list[tuple[int, object]]] = {}
    with Reader(bag) as reader:
        for connection, bag_ns, raw in reader.messages():
            message = TYPESTORE.deserialize_cdr(raw, connection.msgtype)
            messages.setdefault(connection.topic, []).append((bag_ns, message))
    return messages


def stamp_ns(header) -> int:
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_rgbd_message_fields_match_spec(tmp_path, storage):
    frames = rgbd_frames(2)
    summary = write_bag(frames, tmp_path / "bag", storage=storage)
    messages = read_messages(tmp_path / "bag")

    assert summary.frames == 2
    assert summary.kind == "rgbd"
    assert set(messages) == {
        topics.IMAGE_TOPIC,
        topics.DEPTH_TOPIC,
        topics.CAMERA_INFO_TOPIC,
        topics.POSE_TOPIC,
        topics.KEYFRAMES_TOPIC,
    }
    for i, frame in enumerate(frames):
        image_ns, image = messages[topics.IMAGE_TOPIC][i]
        depth_ns, depth = messages[topics.DEPTH_TOPIC][i]
        info_ns, info = messages[topics.CAMERA_INFO_TOPIC][i]
        pose_ns, pose = messages[topics.POSE_TOPIC][i]
        # Bag time and header stamp are both the frame's stamp.
        for bag_ns, message in ((image_ns, image), (depth_ns, depth), (info_ns, info), (pose_ns, pose)):
            assert bag_ns == frame.stamp_ns == stamp_ns(message.header)

        # sensor_msgs/Image: rgb8, 3 bytes per pixel, rows of width*3 bytes, R G B order.
        assert (image.encoding, image.height, image.width, image.step, image.is_bigendian) == (
            "rgb8",
            3,
            4,
            12,
            0,
        )
        assert image.header.frame_id == "camera_color_optical_frame"
        assert bytes(image.data) == frame.image.tobytes()
        # REP 118 depth: 16UC1 millimetres, little-endian (low byte first) as declared.
        assert (depth.encoding, depth.step, depth.is_bigendian) == ("16UC1", 8, 0)
        assert depth.header.frame_id == "camera_color_optical_frame"
        expected_bytes = bytes(b for v in frame.depth_raw.ravel() for b in (int(v) & 0xFF, int(v) >> 8))
        assert bytes(depth.data) == expected_bytes

        # CameraInfo: K row-major, P = [K | 0], R = I, plumb_bob with zero distortion.
        assert (info.width, info.height, info.distortion_model) == (4, 3, "plumb_bob")
        np.testing.assert_array_equal(info.k, [500.0, 0.0, 1.5, 0.0, 501.0, 1.25, 0.0, 0.0, 1.0])
        np.testing.assert_array_equal(
            info.p, [500.0, 0.0, 1.5, 0.0, 0.0, 501.0, 1.25, 0.0, 0.0, 0.0, 1.0, 0.0]
        )
        np.testing.assert_array_equal(info.r, np.eye(3).ravel())
        np.testing.assert_array_equal(info.d, np.zeros(5))

        # PoseStamped: camera-to-map in "map"; pure translation along x is the identity quaternion.
        assert pose.header.frame_id == "map"
        p, q = pose.pose.position, pose.pose.orientation
        np.testing.assert_allclose([p.x, p.y, p.z], frame.T_world_camera[:3, 3], atol=1e-15)
        np.testing.assert_allclose([q.x, q.y, q.z, q.w], [0.0, 0.0, 0.0, 1.0], atol=1e-15)


def test_pose_quaternion_rotation_about_z(tmp_path):
    frames = rgbd_frames(1)
    frames[0].T_world_camera = pose_x(0.0, yaw_deg=90.0)

    write_bag(frames, tmp_path / "bag")

    _, pose = read_messages(tmp_path / "bag")[topics.POSE_TOPIC][0]
    q = pose.pose.orientation
    # A 90° turn about z is (0, 0, sin 45°, cos 45°) in ROS (x, y, z, w) order.
    np.testing.assert_allclose([q.x, q.y, q.z, q.w], [0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5)], atol=1e-12)


def test_stereo_right_projection_has_baseline(tmp_path):
    frames = stereo_frames(2)

    summary = write_bag(frames, tmp_path / "bag", storage="sqlite3")
    messages = read_messages(tmp_path / "bag")

    assert summary.kind == "stereo"
    assert set(messages) == {
        topics.LEFT_IMAGE_TOPIC,
        topics.RIGHT_IMAGE_TOPIC,
        topics.LEFT_CAMERA_INFO_TOPIC,
        topics.RIGHT_CAMERA_INFO_TOPIC,
        topics.POSE_TOPIC,
        topics.KEYFRAMES_TOPIC,
    }
    _, left = messages[topics.LEFT_IMAGE_TOPIC][1]
    _, right = messages[topics.RIGHT_IMAGE_TOPIC][1]
    _, left_info = messages[topics.LEFT_CAMERA_INFO_TOPIC][1]
    _, right_info = messages[topics.RIGHT_CAMERA_INFO_TOPIC][1]
    assert (left.encoding, left.step, left.header.frame_id) == ("mono8", 4, "left_camera_optical_frame")
    assert (right.encoding, right.header.frame_id) == ("mono8", "right_camera_optical_frame")
    assert bytes(right.data) == frames[1].right_image.tobytes()
    assert left_info.header.frame_id == "left_camera_optical_frame"
    assert right_info.header.frame_id == "right_camera_optical_frame"
    # REP 104: P[0,3] = -fx * baseline for the right camera, 0 for the left.
    assert left_info.p[3] == 0.0
    np.testing.assert_allclose(right_info.p[3], -500.0 * 0.537, rtol=1e-15)


def test_tum_depth_becomes_32fc1_metres(tmp_path):
    frames = rgbd_frames(1, depth_scale=1.0 / 5000.0)
    frames[0].depth_raw[0, 0] = 0
    frames[0].depth_raw[0, 1] = 5000

    write_bag(frames, tmp_path / "bag")
    _, depth = read_messages(tmp_path / "bag")[topics.DEPTH_TOPIC][0]

    assert (depth.encoding, depth.step) == ("32FC1", 16)
    depth_m = np.frombuffer(bytes(depth.data), dtype="<f4").reshape(3, 4)
    assert np.isnan(depth_m[0, 0])
    assert depth_m[0, 1] == np.float32(1.0)
    # Every TUM code comes back exactly: float32 resolves far below 0.2 mm steps.
    codes = frames[0].depth_raw[1:]
    np.testing.assert_array_equal(np.round(depth_m[1:].astype(np.float64) * 5000.0), codes)


def test_encode_depth_keeps_stored_units():
    millimetres = np.array([[0, 1234, 65535]], dtype=np.uint16)
    metres = np.array([[np.nan, 1.5, 2.25]], dtype=np.float32)

    encoding_mm, data_mm = encode_depth(millimetres, 0.001)
    encoding_m, data_m = encode_depth(metres, 1.0)

    assert encoding_mm == "16UC1"
    assert data_mm.dtype == np.uint16
    np.testing.assert_array_equal(data_mm, millimetres)
    assert encoding_m == "32FC1"
    np.testing.assert_array_equal(data_m, metres)


def test_keyframe_path_by_motion(tmp_path):
    # Steps of 0.04 m: a keyframe when more than 0.1 m from the last one (the default
    # mapper threshold), i.e. at 0.0, 0.12, 0.24 m -> frames 0, 3, 6.
    xs_m = [0.04 * i for i in range(8)]
    frames = rgbd_frames(xs_m=xs_m)

    summary = write_bag(frames, tmp_path / "bag")
    paths = read_messages(tmp_path / "bag")[topics.KEYFRAMES_TOPIC]

    keyframe_stamps = [frames[i].stamp_ns for i in (0, 3, 6)]
    assert summary.keyframes == 3
    assert len(paths) == 3
    for k, (bag_ns, path) in enumerate(paths):
        # Published at the new keyframe, holding all keyframes so far, in order.
        assert bag_ns == stamp_ns(path.header) == keyframe_stamps[k]
        assert path.header.frame_id == "map"
        assert [stamp_ns(p.header) for p in path.poses] == keyframe_stamps[: k + 1]
        assert all(p.header.frame_id == "map" for p in path.poses)
    final_xs = [p.pose.position.x for p in paths[-1][1].poses]
    np.testing.assert_allclose(final_xs, [0.0, 0.12, 0.24], atol=1e-12)


def test_keyframe_rules_rotation_every_n_dataset(tmp_path):
    frames = rgbd_frames(5, xs_m=[0.0] * 5)
    for i, frame in enumerate(frames):
        frame.T_world_camera = pose_x(0.0, yaw_deg=6.0 * i)  # 12° > 10° at frames 2 and 4
    frames[1].keyframe_id = 11

    def keyframe_indices(rule: KeyframeRule, name: str) -> list[int]:
        write_bag(frames, tmp_path / name, keyframes=rule)
        _, path = read_messages(tmp_path / name)[topics.KEYFRAMES_TOPIC][-1]
        stamps = [stamp_ns(p.header) for p in path.poses]
        return [f.index for f in frames if f.stamp_ns in stamps]

    assert keyframe_indices(KeyframeRule(), "motion") == [0, 2, 4]
    assert keyframe_indices(KeyframeRule(every_n_frames=2), "every") == [0, 2, 4]
    assert keyframe_indices(KeyframeRule(every_n_frames=3), "every3") == [0, 3]
    assert keyframe_indices(KeyframeRule(from_dataset=True), "dataset") == [1]


def test_metadata_yaml_content(tmp_path):
    write_bag(rgbd_frames(3), tmp_path / "bag", storage="mcap", custom_data={"source": "unit test"})

    metadata = yaml.safe_load((tmp_path / "bag" / "metadata.yaml").read_text())["rosbag2_bagfile_information"]

    assert metadata["version"] == 9
    assert metadata["storage_identifier"] == "mcap"
    assert metadata["relative_file_paths"] == ["bag.mcap"]
    assert (tmp_path / "bag" / "bag.mcap").is_file()
    assert metadata["message_count"] == 3 * 4 + 1
    assert metadata["starting_time"]["nanoseconds_since_epoch"] == 1_000_000_000
    assert metadata["duration"]["nanoseconds"] == 2 * 33_333_333
    counts = {t["topic_metadata"]["name"]: t["message_count"] for t in metadata["topics_with_message_count"]}
    assert counts[topics.IMAGE_TOPIC] == 3
    assert counts[topics.KEYFRAMES_TOPIC] == 1
    qos = metadata["topics_with_message_count"][0]["topic_metadata"]["offered_qos_profiles"][0]
    assert (qos["reliability"], qos["durability"], qos["history"]) == ("reliable", "volatile", "keep_last")
    assert metadata["custom_data"] == {"source": "unit test", "surfel_perception.keyframes": "motion"}


def test_existing_bag_needs_overwrite(tmp_path):
    write_bag(rgbd_frames(2), tmp_path / "bag")

    with pytest.raises(BagOutputError, match=r"exists already.*--overwrite"):
        write_bag(rgbd_frames(3), tmp_path / "bag")
    summary = write_bag(rgbd_frames(3), tmp_path / "bag", overwrite=True)

    assert summary.frames == 3
    assert len(read_messages(tmp_path / "bag")[topics.IMAGE_TOPIC]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bag"]


def test_overwrite_rejects_non_bag_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"jpeg")

    with pytest.raises(BagOutputError, match="not a bag directory"):
        write_bag(rgbd_frames(1), tmp_path / "photos", overwrite=True)
    assert (tmp_path / "photos" / "holiday.jpg").is_file()


def test_output_under_file_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("x")

    with pytest.raises(BagOutputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "notes.txt" / "bag")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write to read-only folders")
def test_unwritable_output_folder_rejected(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(BagOutputError, match="not writable"):
            write_bag(rgbd_frames(1), locked / "bag")
    finally:
        locked.chmod(0o700)


def test_missing_parent_folders_are_created(tmp_path):
    summary = write_bag(rgbd_frames(1), tmp_path / "a" / "b" / "bag")

    assert summary.path == tmp_path / "a" / "b" / "bag"
    assert (summary.path / "metadata.yaml").is_file()


def test_failed_conversion_leaves_no_partial_bag(tmp_path):
    def frames_then_failure():
        yield from rgbd_frames(2)
        raise OSError("disk read failed")

    with pytest.raises(OSError, match="disk read failed"):
        write_bag(frames_then_failure(), tmp_path / "bag")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: setattr(f[1], "stamp_ns", f[0].stamp_ns), "does not increase"),
        (lambda f: setattr(f[0], "stamp_ns", -1), "stamps must be >= 0"),
        (lambda f: setattr(f[0], "image", f[0].image.astype(np.float32)), "unsupported image: dtype float32"),
        (
            lambda f: setattr(f[0], "depth_raw", f[0].depth_raw.astype(np.int32)),
            "unsupported depth dtype int32",
        ),
        (lambda f: setattr(f[0], "depth_scale", 0.0), "invalid depth_scale 0.0"),
        (lambda f: setattr(f[0], "depth_raw", None), "neither depth_raw nor right_image"),
        (lambda f: setattr(f[1], "depth_raw", None), "neither depth_raw nor right_image"),
        (lambda f: setattr(f[0], "depth_raw", f[0].depth_raw[:2]), "depth image size 4x2 does not match"),
        (lambda f: f[0].T_world_camera.__setitem__((0, 0), 2.0), "not orthonormal"),
    ],
)
def test_invalid_frames_rejected(tmp_path, change, message):
    frames = rgbd_frames(2)
    change(frames)

    with pytest.raises(ValueError, match=message):
        write_bag(frames, tmp_path / "bag")
    assert not (tmp_path / "bag").exists()


def test_mixed_rgbd_stereo_rejected(tmp_path):
    frames = [rgbd_frames(1)[0], stereo_frames(2)[1]]
    frames[1].stamp_ns = frames[0].stamp_ns + 1

    with pytest.raises(FrameEncodingError, match="is stereo but the bag started as rgbd"):
        write_bag(frames, tmp_path / "bag")


def test_bad_baseline_empty_input_storage(tmp_path):
    frames = stereo_frames(1)
    frames[0].baseline_m = -0.5

    with pytest.raises(FrameEncodingError, match=r"invalid stereo baseline -0\.5"):
        write_bag(frames, tmp_path / "bag")
    with pytest.raises(FrameEncodingError, match="no frames to write"):
        write_bag([], tmp_path / "bag")
    with pytest.raises(ValueError, match="unknown bag storage 'rosbag1': use one of mcap, sqlite3"):
        write_bag(rgbd_frames(1), tmp_path / "bag", storage="rosbag1")


def test_invalid_keyframe_rules_are_rejected():
    with pytest.raises(ValueError, match="invalid keyframe interval -1"):
        KeyframeRule(every_n_frames=-1)
    with pytest.raises(ValueError, match=r"invalid keyframe motion thresholds -0\.1 m"):
        KeyframeRule(min_translation_m=-0.1)


# --- the convert command ---------------------------------------------------------------


def test_convert_unknown_format(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bag_main(["convert", str(tmp_path), "--format", "euroc", "--out", str(tmp_path / "bag")])

    assert exit_info.value.code == 2
    assert "invalid choice: 'euroc'" in capsys.readouterr().err


def test_convert_missing_dataset(tmp_path, capsys):
    code = bag_main(
        ["convert", str(tmp_path / "nowhere"), "--format", "7scenes", "--out", str(tmp_path / "bag")]
    )

    assert code == 2
    assert f"dataset not found: {tmp_path / 'nowhere'}" in capsys.readouterr().err
    assert not (tmp_path / "bag").exists()


def test_convert_existing_bag_without_overwrite(tmp_path, capsys):
    (tmp_path / "bag").mkdir()

    code = bag_main(["convert", str(tmp_path), "--format", "7scenes", "--out", str(tmp_path / "bag")])

    assert code == 2
    assert "exists already: choose another --out or pass --overwrite" in capsys.readouterr().err


def test_convert_negative_keyframe_interval(tmp_path, capsys):
    code = bag_main(
        [
            "convert",
            str(tmp_path),
            "--format",
            "7scenes",
            "--out",
            str(tmp_path / "bag"),
            "--keyframe-every",
            "-2",
        ]
    )

    assert code == 2
    assert "invalid --keyframe-every -2" in capsys.readouterr().err


def test_convert_7scenes_excerpt(seven_scenes_dir, tmp_path, capsys):
    code = bag_main(
        [
            "convert",
            str(seven_scenes_dir),
            "--format",
            "7scenes",
            "--out",
            str(tmp_path / "bag"),
            "--first",
            "2",
            "--max-frames",
            "3",
            "--stride",
            "2",
            "--storage",
            "sqlite3",
            "--no-progress",
        ]
    )

    assert code == 0
    assert "wrote sqlite3 bag" in capsys.readouterr().out
    messages = read_messages(tmp_path / "bag")
    # Frames 2, 4, 6 of a 30 Hz sequence without stamps: frame n at n/30 s.
    assert [bag_ns for bag_ns, _ in messages[topics.IMAGE_TOPIC]] == [round(n * 1e9 / 30) for n in (2, 4, 6)]
    metadata = yaml.safe_load((tmp_path / "bag" / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert metadata["custom_data"]["surfel_perception.source_format"] == "7scenes"
    assert metadata["custom_data"]["surfel_perception.source_first"] == "2"
    with BagDataset(tmp_path / "bag") as bag:
        assert (len(bag), bag.kind, bag.source_format) == (3, "rgbd", "7scenes")
    assert source_format_of_bag(tmp_path / "bag") == "7scenes"
    assert source_format_of_bag(tmp_path) is None


def test_convert_kitti_keyframe_every_n(kitti_dir, tmp_path):
    code = bag_main(
        [
            "convert",
            str(kitti_dir),
            "--format",
            "kitti",
            "--sequence",
            "0",
            "--out",
            str(tmp_path / "bag"),
            "--max-frames",
            "5",
            "--keyframe-every",
            "2",
            "--no-progress",
        ]
    )

    assert code == 0
    messages = read_messages(tmp_path / "bag")
    _, path = messages[topics.KEYFRAMES_TOPIC][-1]
    # KITTI times.txt of the excerpt: frame n at n * 0.1 s; keyframes at frames 0, 2, 4.
    assert [stamp_ns(p.header) for p in path.poses] == [0, 200_000_000, 400_000_000]
    _, right_info = messages[topics.RIGHT_CAMERA_INFO_TOPIC][0]
    # calib.txt P1[0,3] = -fx * baseline = -386.1448.
    np.testing.assert_allclose(right_info.p[3], -386.1448, rtol=1e-12)
    metadata = yaml.safe_load((tmp_path / "bag" / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert metadata["custom_data"]["surfel_perception.source_sequence"] == "0"
    assert metadata["custom_data"]["surfel_perception.keyframes"] == "every_n"
