"""Tests of the dataset readers on tiny datasets written in the test, and on the real excerpts."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.config import CameraConfig
from surfel_mapping_node.datasets.kitti import KittiOdometryDataset, read_calibration
from surfel_mapping_node.datasets.seven_scenes import SevenScenesDataset
from surfel_mapping_node.datasets.tum import TUM_CAMERAS, TumRgbdDataset, tum_camera
from surfel_mapping_node.depth import decode_depth
from surfel_mapping_node.poses import InvalidPoseError

WIDTH, HEIGHT = 32, 24


def write_rgb(path: Path, seed: int) -> np.ndarray:
    """Write a random RGB PNG (lossless) and return its pixels in RGB order."""
    rgb = np.random.default_rng(seed).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return rgb


def write_depth(path: Path, value: int) -> np.ndarray:
    depth = np.full((HEIGHT, WIDTH), value, dtype=np.uint16)
    depth[0, 0] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), depth)
    return depth


# ---------------------------------------------------------------- 7-Scenes


def make_seven_scenes(root: Path, count: int = 3) -> list[np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    K = np.array([[30.0, 0, 15.5], [0, 30.0, 11.5], [0, 0, 1]])
    np.savetxt(root / "camera-intrinsics.txt", K)
    poses = []
    for i in range(count):
        write_rgb(root / f"frame-{i:06d}.color.png", seed=i)
        write_depth(root / f"frame-{i:06d}.depth.png", 1000 + 100 * i)
        T = np.eye(4)
        T[:3, :3] = Rotation.from_euler("z", 10 * i, degrees=True).as_matrix()
        T[:3, 3] = [0.1 * i, 0.0, 0.0]
        np.savetxt(root / f"frame-{i:06d}.pose.txt", T)
        poses.append(T)
    return poses


def test_seven_scenes_reads_frames(tmp_path: Path) -> None:
    poses = make_seven_scenes(tmp_path)

    dataset = SevenScenesDataset(tmp_path)

    assert len(dataset) == 3
    assert dataset.camera == PinholeCamera(WIDTH, HEIGHT, 30.0, 30.0, 15.5, 11.5)
    frame = dataset[1]
    assert frame.index == 1
    assert frame.stamp_ns == round(1e9 / 30)
    np.testing.assert_array_equal(frame.image, write_rgb(tmp_path / "x.png", seed=1))
    np.testing.assert_allclose(frame.T_world_camera, poses[1], atol=1e-12)
    depth_m = decode_depth(frame.depth_raw, frame.depth_scale, 0.1, 10.0)
    assert np.isnan(depth_m[0, 0])
    np.testing.assert_allclose(depth_m[1:, 1:], 1.1, rtol=1e-6)
    assert [f.index for f in dataset] == [0, 1, 2]
    assert dataset[-1].index == 2


def test_seven_scenes_index_out_of_range(tmp_path: Path) -> None:
    make_seven_scenes(tmp_path)

    with pytest.raises(IndexError, match=r"frame index 3 out of range for a dataset of 3 frames"):
        SevenScenesDataset(tmp_path)[3]


def test_seven_scenes_missing_files_name_the_path(tmp_path: Path) -> None:
    make_seven_scenes(tmp_path)
    (tmp_path / "frame-000001.pose.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"pose file not found: .*frame-000001.pose.txt"):
        SevenScenesDataset(tmp_path)

    (tmp_path / "camera-intrinsics.txt").unlink()
    (tmp_path / "frame-000001.depth.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"camera intrinsics not found: .*camera-intrinsics.txt"):
        SevenScenesDataset(tmp_path)

    with pytest.raises(FileNotFoundError, match=r"7-Scenes folder not found: .*nowhere"):
        SevenScenesDataset(tmp_path / "nowhere")


def test_seven_scenes_missing_color_and_unreadable_depth(tmp_path: Path) -> None:
    make_seven_scenes(tmp_path)
    (tmp_path / "frame-000002.color.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"color image not found: .*frame-000002.color.png"):
        SevenScenesDataset(tmp_path)

    write_rgb(tmp_path / "frame-000002.color.png", seed=2)
    dataset = SevenScenesDataset(tmp_path)
    (tmp_path / "frame-000002.depth.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"failed to decode depth image .*frame-000002.depth.png"):
        dataset[2]


def test_seven_scenes_invalid_pose_raises(tmp_path: Path) -> None:
    make_seven_scenes(tmp_path)
    bad = np.eye(4)
    bad[0, 3] = -np.inf
    np.savetxt(tmp_path / "frame-000001.pose.txt", bad)

    with pytest.raises(InvalidPoseError, match=r"invalid pose in .*frame-000001.pose.txt"):
        SevenScenesDataset(tmp_path)[1]


def test_seven_scenes_real_excerpt(seven_scenes_dir: Path) -> None:
    dataset = SevenScenesDataset(seven_scenes_dir)

    assert len(dataset) == 300
    assert dataset.camera == PinholeCamera(640, 480, 585.0, 585.0, 320.0, 240.0)
    frame = dataset[150]
    assert frame.image.shape == (480, 640, 3)
    assert frame.image.dtype == np.uint8
    assert frame.depth_raw.dtype == np.uint16
    assert frame.stamp_ns == 5_000_000_000
    depth_m = decode_depth(frame.depth_raw, frame.depth_scale, 0.1, 10.0)
    # A kitchen seen by a Kinect: mostly valid, about 1-3 m away.
    assert np.isfinite(depth_m).mean() > 0.6
    assert 0.5 < np.nanmedian(depth_m) < 4.0
    # Ground truth moves smoothly: under 5 cm between neighbouring frames at 30 Hz.
    step = np.linalg.norm(dataset[151].T_world_camera[:3, 3] - frame.T_world_camera[:3, 3])
    assert step < 0.05


# ---------------------------------------------------------------- TUM RGB-D


def make_tum(root: Path) -> dict[str, object]:
    """Color at 0, 0.1, 0.2, 0.3 s; depth 5 ms after each except the last (30 ms late);
    ground truth at 0.0, 0.05, ... 0.25 s, moving 1 m/s along x and turning 90°/s about z."""
    root.mkdir(parents=True, exist_ok=True)
    base = 1305031102
    color_stamps = [0.0, 0.1, 0.2, 0.3]
    depth_stamps = [0.005, 0.105, 0.205, 0.33]
    rgb_lines = ["# color images", "# timestamp filename"]
    depth_lines = ["# depth images", "# timestamp filename"]
    for i, (tc, td) in enumerate(zip(color_stamps, depth_stamps, strict=True)):
        write_rgb(root / "rgb" / f"{i}.png", seed=10 + i)
        write_depth(root / "depth" / f"{i}.png", 5000 * (i + 1))
        rgb_lines.append(f"{base + tc:.6f} rgb/{i}.png")
        depth_lines.append(f"{base + td:.6f} depth/{i}.png")
    gt_lines = ["# ground truth trajectory", "# timestamp tx ty tz qx qy qz qw"]
    for t in np.arange(0.0, 0.2501, 0.05):
        q = Rotation.from_euler("z", 90 * t, degrees=True).as_quat()
        gt_lines.append(f"{base + t:.4f} {t:.4f} 0.0 1.5 {q[0]:.9f} {q[1]:.9f} {q[2]:.9f} {q[3]:.9f}")
    # Reverse the color list to check that lines are sorted by stamp.
    (root / "rgb.txt").write_text("\n".join(rgb_lines[:2] + rgb_lines[:1:-1]) + "\n")
    (root / "depth.txt").write_text("\n".join(depth_lines) + "\n")
    (root / "groundtruth.txt").write_text("\n".join(gt_lines) + "\n")
    return {"base": base}


def test_tum_association_and_interpolation(tmp_path: Path) -> None:
    make_tum(tmp_path)
    camera = PinholeCamera(WIDTH, HEIGHT, 25.0, 25.0, 15.5, 11.5)

    dataset = TumRgbdDataset(tmp_path, camera=camera)

    # The last color (0.3 s) is dropped: its depth is 30 ms away and ground truth ends at 0.25 s.
    assert len(dataset) == 3
    frames = list(dataset)
    assert [f.stamp_ns for f in frames] == [1305031102_000_000_000 + k * 100_000_000 for k in range(3)]
    np.testing.assert_array_equal(frames[1].image, write_rgb(tmp_path / "x.png", seed=11))
    depth_m = decode_depth(frames[2].depth_raw, frames[2].depth_scale, 0.1, 10.0)
    np.testing.assert_allclose(depth_m[5, 5], 3.0, rtol=1e-6)  # 15000 / 5000
    for frame, t in zip(frames, (0.0, 0.1, 0.2), strict=True):
        expected_R = Rotation.from_euler("z", 90 * t, degrees=True).as_matrix()
        np.testing.assert_allclose(frame.T_world_camera[:3, :3], expected_R, atol=1e-6)
        np.testing.assert_allclose(frame.T_world_camera[:3, 3], [t, 0.0, 1.5], atol=1e-6)


def test_tum_pose_interpolation_between_samples(tmp_path: Path) -> None:
    make_tum(tmp_path)
    # Keep ground truth only at 0.0 and 0.25 s: the frame at 0.1 s lies 40 % of the way.
    lines = (tmp_path / "groundtruth.txt").read_text().splitlines()
    (tmp_path / "groundtruth.txt").write_text("\n".join([lines[2], lines[-1]]) + "\n")

    camera = TUM_CAMERAS["freiburg1"].scaled(WIDTH, HEIGHT)
    dataset = TumRgbdDataset(tmp_path, camera=camera, max_pose_gap_s=0.3)

    frame = dataset[1]
    np.testing.assert_allclose(frame.T_world_camera[:3, 3], [0.1, 0.0, 1.5], atol=1e-6)
    expected_R = Rotation.from_euler("z", 0.4 * 22.5, degrees=True).as_matrix()
    np.testing.assert_allclose(frame.T_world_camera[:3, :3], expected_R, atol=1e-6)


def test_tum_tolerance_controls_depth_matching(tmp_path: Path) -> None:
    make_tum(tmp_path)
    camera = PinholeCamera(WIDTH, HEIGHT, 25.0, 25.0, 15.5, 11.5)

    # With a 4 ms tolerance no depth (5 ms late) matches.
    with pytest.raises(ValueError, match=r"no color image in .*rgb.txt has both a depth image and a pose"):
        TumRgbdDataset(tmp_path, camera=camera, max_time_difference_s=0.004)
    assert len(TumRgbdDataset(tmp_path, camera=camera, max_time_difference_s=0.006)) == 3


def test_tum_camera_options() -> None:
    assert tum_camera("freiburg1") == PinholeCamera(640, 480, 517.3, 516.5, 318.6, 255.3)
    config_camera = CameraConfig(width=640, height=480, fx=500.0, fy=500.0, cx=320.0, cy=240.0)
    assert tum_camera(config_camera) == PinholeCamera(640, 480, 500.0, 500.0, 320.0, 240.0)
    with pytest.raises(ValueError, match=r"unknown TUM camera 'freiburg9'.*freiburg1, freiburg2, freiburg3"):
        tum_camera("freiburg9")
    with pytest.raises(ValueError, match=r"the camera section is not set"):
        tum_camera(CameraConfig())


def test_tum_missing_and_malformed_files(tmp_path: Path) -> None:
    make_tum(tmp_path)
    camera = PinholeCamera(WIDTH, HEIGHT, 25.0, 25.0, 15.5, 11.5)
    dataset = TumRgbdDataset(tmp_path, camera=camera)

    (tmp_path / "rgb" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"color image not found: .*rgb/1.png"):
        dataset[1]

    message = r"rgb/0.png: color image size 32x24 does not match the camera size 640x480"
    with pytest.raises(ValueError, match=message):
        TumRgbdDataset(tmp_path, camera="freiburg1")[0]

    with (tmp_path / "groundtruth.txt").open("a") as stream:
        stream.write("1305031103.0 1 2 3\n")
    with pytest.raises(ValueError, match=r"invalid line 9 of .*groundtruth.txt: 4 values"):
        TumRgbdDataset(tmp_path, camera=camera)

    (tmp_path / "depth.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"TUM file list not found: .*depth.txt"):
        TumRgbdDataset(tmp_path, camera=camera)


# ---------------------------------------------------------------- KITTI


KITTI_FX = 700.0
P0 = [KITTI_FX, 0, 15.5, 0, 0, KITTI_FX, 11.5, 0, 0, 0, 1, 0]
P1 = [KITTI_FX, 0, 15.5, -0.5 * KITTI_FX, 0, KITTI_FX, 11.5, 0, 0, 0, 1, 0]
# Color cameras of KITTI sit 6 cm left of cam0 (P2[0,3] = fx·0.06) with a 0.54 m baseline.
P2 = [KITTI_FX, 0, 15.5, 0.06 * KITTI_FX, 0, KITTI_FX, 11.5, 0, 0, 0, 1, 0]
P3 = [KITTI_FX, 0, 15.5, -0.48 * KITTI_FX, 0, KITTI_FX, 11.5, 0, 0, 0, 1, 0]


def make_kitti(root: Path, calib_rows: dict[str, list[float]], count: int = 3, color: bool = False) -> None:
    sequence = root / "sequences" / "04"
    for i in range(count):
        for folder, seed in (("image_0", i), ("image_1", 100 + i)):
            gray = np.random.default_rng(seed).integers(0, 256, size=(HEIGHT, WIDTH), dtype=np.uint8)
            (sequence / folder).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(sequence / folder / f"{i:06d}.png"), gray)
        if color:
            write_rgb(sequence / "image_2" / f"{i:06d}.png", seed=200 + i)
            write_rgb(sequence / "image_3" / f"{i:06d}.png", seed=300 + i)
    lines = [f"{key}: " + " ".join(f"{v:.12e}" for v in values) for key, values in calib_rows.items()]
    (sequence / "calib.txt").write_text("\n".join(lines) + "\n")
    (sequence / "times.txt").write_text("".join(f"{0.1036 * i:.6e}\n" for i in range(count)))
    (root / "poses").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        T = np.eye(4)[:3]
        T[2, 3] = 0.8 * i
        rows.append(" ".join(f"{v:.6e}" for v in T.reshape(-1)))
    (root / "poses" / "04.txt").write_text("\n".join(rows) + "\n")


def test_kitti_gray_pair_with_missing_calib_rows(tmp_path: Path) -> None:
    # Only P0 and P1, as in the real excerpt.
    make_kitti(tmp_path, {"P0": P0, "P1": P1})

    dataset = KittiOdometryDataset(tmp_path, sequence=4)

    assert len(dataset) == 3
    assert dataset.camera == PinholeCamera(WIDTH, HEIGHT, KITTI_FX, KITTI_FX, 15.5, 11.5)
    np.testing.assert_allclose(dataset.baseline_m, 0.5, rtol=1e-12)
    frame = dataset[2]
    assert frame.right_image.shape == frame.image.shape == (HEIGHT, WIDTH)
    assert frame.baseline_m == dataset.baseline_m
    assert frame.stamp_ns == 207_200_000
    np.testing.assert_allclose(frame.T_world_camera[:3, 3], [0.0, 0.0, 1.6], atol=1e-9)
    assert frame.depth_raw is None


def test_kitti_color_pair_and_tr_row(tmp_path: Path) -> None:
    make_kitti(tmp_path, {"P0": P0, "P1": P1, "P2": P2, "P3": P3, "Tr": list(range(12))}, color=True)

    dataset = KittiOdometryDataset(tmp_path, sequence="04", color=True)

    frame = dataset[0]
    assert frame.image.shape == (HEIGHT, WIDTH, 3)
    # Baseline from the camera centres: 0.06 + 0.48 m.
    np.testing.assert_allclose(dataset.baseline_m, 0.54, rtol=1e-12)
    # Poses are of cam0; cam2 sits 6 cm to its left (-x).
    np.testing.assert_allclose(frame.T_world_camera[:3, 3], [-0.06, 0.0, 0.0], atol=1e-12)


def test_kitti_color_without_p2_raises(tmp_path: Path) -> None:
    make_kitti(tmp_path, {"P0": P0, "P1": P1}, color=True)

    message = r"calib.txt has no P2: row, needed for the color pair \(rows found: P0, P1\)"
    with pytest.raises(ValueError, match=message):
        KittiOdometryDataset(tmp_path, sequence="04", color=True)


def test_kitti_calibration_errors(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("P0: 1 2 3\n")
    with pytest.raises(ValueError, match=r"invalid row P0 on line 1 of .*calib.txt: 3 numbers, expected 12"):
        read_calibration(path)
    with pytest.raises(FileNotFoundError, match=r"KITTI calibration not found: .*missing.txt"):
        read_calibration(tmp_path / "missing.txt")


def test_kitti_missing_files_name_the_path(tmp_path: Path) -> None:
    make_kitti(tmp_path, {"P0": P0, "P1": P1})
    (tmp_path / "poses" / "04.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"KITTI file not found: .*poses/04.txt"):
        KittiOdometryDataset(tmp_path, sequence="04")

    with pytest.raises(FileNotFoundError, match=r"KITTI sequence folder not found: .*sequences/05"):
        KittiOdometryDataset(tmp_path, sequence="05")

    make_kitti(tmp_path, {"P0": P0, "P1": P1})
    dataset = KittiOdometryDataset(tmp_path, sequence="04")
    (tmp_path / "sequences" / "04" / "image_1" / "000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image not found: .*image_1/000001.png"):
        dataset[1]


def test_kitti_short_times_file_raises(tmp_path: Path) -> None:
    make_kitti(tmp_path, {"P0": P0, "P1": P1})
    (tmp_path / "sequences" / "04" / "times.txt").write_text("0.0\n")

    with pytest.raises(ValueError, match=r"times.txt has 1 lines for 3 images"):
        KittiOdometryDataset(tmp_path, sequence="04")


def test_kitti_real_excerpt(kitti_dir: Path) -> None:
    dataset = KittiOdometryDataset(kitti_dir, sequence="00")

    assert len(dataset) == 51
    assert dataset.camera == PinholeCamera(1241, 376, 718.856, 718.856, 607.1928, 185.2157)
    np.testing.assert_allclose(dataset.baseline_m, 386.1448 / 718.856, rtol=1e-9)
    first, last = dataset[0], dataset[-1]
    np.testing.assert_allclose(first.T_world_camera, np.eye(4), atol=1e-6)
    assert last.stamp_ns == 5_000_000_000
    assert first.image.shape == first.right_image.shape == (376, 1241)
    # About 52 m of driving in the excerpt (path length over the poses).
    positions = np.array([f.T_world_camera[:3, 3] for f in dataset])
    assert 40.0 < np.linalg.norm(np.diff(positions, axis=0), axis=1).sum() < 65.0


def test_tum_single_pose_sample_uses_nearest(tmp_path: Path) -> None:
    make_tum(tmp_path)
    lines = (tmp_path / "groundtruth.txt").read_text().splitlines()
    # Only the sample at 0.1 s: the color image at 0.1 s matches it exactly, the others are too far.
    (tmp_path / "groundtruth.txt").write_text(lines[4] + "\n")

    dataset = TumRgbdDataset(tmp_path, camera=PinholeCamera(WIDTH, HEIGHT, 25.0, 25.0, 15.5, 11.5))

    assert len(dataset) == 1
    np.testing.assert_allclose(dataset[0].T_world_camera[:3, 3], [0.1, 0.0, 1.5], atol=1e-9)
