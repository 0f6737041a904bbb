"""Tests of surfel PLY writing and reading."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest

from surfel_mapping_node.mapper import SurfelCloud
from surfel_mapping_node.ply_io import PlyCloud, read_surfel_ply, write_surfel_ply


def make_cloud(count: int, seed: int = 0) -> PlyCloud:
    rng = np.random.default_rng(seed)
    normal = rng.normal(size=(count, 3)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    return PlyCloud(
        position_m=rng.uniform(-5, 5, size=(count, 3)).astype(np.float32),
        normal=normal,
        color_rgb=rng.integers(0, 256, size=(count, 3), dtype=np.uint8),
        radius_m=rng.uniform(0.005, 0.05, size=count).astype(np.float32),
        confidence=rng.uniform(0.1, 20, size=count).astype(np.float32),
    )


def assert_same_cloud(actual: PlyCloud, expected: PlyCloud) -> None:
    # float32 values are stored bit for bit.
    for name in ("position_m", "normal", "color_rgb", "radius_m", "confidence"):
        np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name), err_msg=name)


def test_round_trip(tmp_path: Path) -> None:
    cloud = make_cloud(100)

    path = write_surfel_ply(tmp_path / "map.ply", cloud)

    assert_same_cloud(read_surfel_ply(path), cloud)


def test_keywords_and_cloud_write_same_bytes(tmp_path: Path) -> None:
    cloud = make_cloud(10)
    surfel_cloud = SurfelCloud(
        position_m=cloud.position_m,
        normal=cloud.normal,
        color_rgb=cloud.color_rgb,
        radius_m=cloud.radius_m,
        confidence=cloud.confidence,
        keyframe_id=np.arange(10, dtype=np.int64),
    )

    write_surfel_ply(tmp_path / "a.ply", surfel_cloud)
    write_surfel_ply(
        tmp_path / "b.ply",
        position_m=cloud.position_m,
        normal=cloud.normal,
        color_rgb=cloud.color_rgb,
        radius_m=cloud.radius_m,
        confidence=cloud.confidence,
    )

    assert (tmp_path / "a.ply").read_bytes() == (tmp_path / "b.ply").read_bytes()


def test_layout_matches_the_ply_specification(tmp_path: Path) -> None:
    cloud = PlyCloud(
        position_m=np.array([[1.0, 2.0, 3.0]], np.float32),
        normal=np.array([[0.0, 0.0, 1.0]], np.float32),
        color_rgb=np.array([[10, 20, 30]], np.uint8),
        radius_m=np.array([0.25], np.float32),
        confidence=np.array([4.0], np.float32),
    )

    data = write_surfel_ply(tmp_path / "one.ply", cloud).read_bytes()

    header, body = data.split(b"end_header\n")
    assert header.startswith(b"ply\nformat binary_little_endian 1.0\n")
    assert b"element vertex 1\n" in header
    properties = [line.split()[1:] for line in header.decode().splitlines() if line.startswith("property")]
    assert properties == [
        ["float", "x"], ["float", "y"], ["float", "z"],
        ["float", "nx"], ["float", "ny"], ["float", "nz"],
        ["uchar", "red"], ["uchar", "green"], ["uchar", "blue"],
        ["float", "radius"], ["float", "confidence"],
    ]  # fmt: skip
    # Hand-laid little-endian record: 6 floats, 3 bytes, 2 floats.
    assert body == struct.pack("<6f3B2f", 1, 2, 3, 0, 0, 1, 10, 20, 30, 0.25, 4)


def test_empty_map_gives_a_valid_file(tmp_path: Path) -> None:
    path = write_surfel_ply(tmp_path / "empty.ply", make_cloud(0))

    assert b"element vertex 0\n" in path.read_bytes()
    assert len(read_surfel_ply(path)) == 0


def test_open3d_reads_points_colors_and_normals(tmp_path: Path) -> None:
    o3d = pytest.importorskip("open3d")
    cloud = make_cloud(50)
    path = write_surfel_ply(tmp_path / "map.ply", cloud)

    points = o3d.io.read_point_cloud(str(path))

    np.testing.assert_allclose(np.asarray(points.points), cloud.position_m, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(points.normals), cloud.normal, rtol=0, atol=1e-6)
    # Open3D scales uchar colors to [0, 1].
    np.testing.assert_allclose(np.asarray(points.colors), cloud.color_rgb / 255.0, rtol=0, atol=1e-6)


def test_unwritable_path_raises_os_error_naming_it(tmp_path: Path) -> None:
    target = tmp_path / "no_such_folder" / "map.ply"

    with pytest.raises(OSError, match=r"failed to write .*no_such_folder/map.ply"):
        write_surfel_ply(target, make_cloud(3))


def test_failed_rename_keeps_target(tmp_path: Path) -> None:
    # A folder cannot be replaced by a file, so the last step (the rename) fails.
    target = tmp_path / "map.ply"
    target.mkdir()
    (target / "keep.txt").write_text("old")

    with pytest.raises(OSError, match=r"failed to write .*map.ply"):
        write_surfel_ply(target, make_cloud(3))

    assert (target / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.ply"]


def test_invalid_input_keeps_the_old_file(tmp_path: Path) -> None:
    path = write_surfel_ply(tmp_path / "map.ply", make_cloud(5))
    old_bytes = path.read_bytes()
    bad = make_cloud(5)
    bad.position_m[2, 1] = np.nan

    message = r"invalid position_m: 1 of 5 surfels are NaN or infinite \(first at row 2\)"
    with pytest.raises(ValueError, match=message):
        write_surfel_ply(path, bad)

    assert path.read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["map.ply"]


def test_new_file_gets_usual_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)

    path = write_surfel_ply(tmp_path / "map.ply", make_cloud(2))

    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_overwrite_keeps_existing_permissions(tmp_path: Path) -> None:
    path = write_surfel_ply(tmp_path / "map.ply", make_cloud(2))
    path.chmod(0o640)

    write_surfel_ply(path, make_cloud(3))

    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_overwrite_replaces_the_file(tmp_path: Path) -> None:
    path = write_surfel_ply(tmp_path / "map.ply", make_cloud(5, seed=1))

    write_surfel_ply(path, make_cloud(7, seed=2))

    assert_same_cloud(read_surfel_ply(path), make_cloud(7, seed=2))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("normal", np.zeros((4, 3), np.float32), r"invalid normal shape \(4, 3\): expected \(5, 3\)"),
        ("radius_m", np.zeros((5, 1), np.float32), r"invalid radius_m shape \(5, 1\): expected \(5,\)"),
        ("color_rgb", np.zeros((5, 3), np.float32), r"invalid color_rgb dtype float32: expected uint8"),
    ],
)
def test_bad_arrays_raise(tmp_path: Path, field: str, value: np.ndarray, message: str) -> None:
    cloud = make_cloud(5)
    setattr(cloud, field, value)

    with pytest.raises(ValueError, match=message):
        write_surfel_ply(tmp_path / "map.ply", cloud)


def test_missing_keyword_and_both_forms_raise(tmp_path: Path) -> None:
    cloud = make_cloud(2)

    with pytest.raises(ValueError, match=r"missing surfel array normal"):
        write_surfel_ply(tmp_path / "a.ply", position_m=cloud.position_m)
    with pytest.raises(ValueError, match=r"pass either a cloud or the arrays as keywords"):
        write_surfel_ply(tmp_path / "a.ply", cloud, position_m=cloud.position_m)
    with pytest.raises(ValueError, match=r"invalid cloud of type object: it has no position_m"):
        write_surfel_ply(tmp_path / "a.ply", object())


def test_reader_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"PLY file not found: .*missing.ply"):
        read_surfel_ply(tmp_path / "missing.ply")

    ascii_ply = tmp_path / "ascii.ply"
    ascii_ply.write_text("ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nend_header\n")
    with pytest.raises(ValueError, match=r"unsupported PLY format in .*ascii.ply: format ascii 1.0"):
        read_surfel_ply(ascii_ply)

    path = write_surfel_ply(tmp_path / "cut.ply", make_cloud(4))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"truncated PLY file .*cut.ply: the header announces 4 vertices"):
        read_surfel_ply(path)

    not_ply = tmp_path / "text.ply"
    not_ply.write_text("hello")
    with pytest.raises(ValueError, match=r"invalid PLY file .*text.ply"):
        read_surfel_ply(not_ply)


def test_reader_fills_missing_properties(tmp_path: Path) -> None:
    path = tmp_path / "xyz.ply"
    header = b"ply\nformat binary_little_endian 1.0\nelement vertex 2\nproperty float x\nproperty float y\n"
    path.write_bytes(header + b"property float z\nend_header\n" + struct.pack("<6f", 1, 2, 3, 4, 5, 6))

    cloud = read_surfel_ply(path)

    np.testing.assert_array_equal(cloud.position_m, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(cloud.confidence, [1, 1])
    np.testing.assert_array_equal(cloud.color_rgb, np.zeros((2, 3), np.uint8))
