"""Tests of the map preview: a visible picture for a small cloud, a valid one for none."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from surfel_mapping_node.ply_io import PlyCloud
from surfel_mapping_node.preview import BACKGROUND_RGB, fit_projection, render_preview, write_preview


def floor_and_wall(seed: int = 0) -> PlyCloud:
    """A 4 × 3 m floor (z = 0, red, normals up) and a 4 × 2 m wall (y = 3, blue, normals −y)."""
    rng = np.random.default_rng(seed)
    floor = np.column_stack([rng.uniform(0, 4, 3000), rng.uniform(0, 3, 3000), np.zeros(3000)])
    wall = np.column_stack([rng.uniform(0, 4, 2000), np.full(2000, 3.0), rng.uniform(0, 2, 2000)])
    color = np.vstack([np.tile([200, 30, 30], (3000, 1)), np.tile([30, 30, 200], (2000, 1))]).astype(np.uint8)
    normal = np.vstack([np.tile([0.0, 0.0, 1.0], (3000, 1)), np.tile([0.0, -1.0, 0.0], (2000, 1))])
    return PlyCloud(
        position_m=np.vstack([floor, wall]).astype(np.float32),
        normal=normal.astype(np.float32),
        color_rgb=color,
        radius_m=np.full(5000, 0.03, np.float32),
        confidence=np.ones(5000, np.float32),
    )


def read_png_rgb(path: Path) -> np.ndarray:
    image_bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image_bgr is not None, f"{path} is not a readable PNG"
    return cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)


def test_small_cloud_gives_a_non_blank_png(tmp_path: Path) -> None:
    cloud = floor_and_wall()

    image = write_preview(tmp_path / "map.png", cloud, width=320, height=240)

    np.testing.assert_array_equal(read_png_rgb(tmp_path / "map.png"), image)
    assert image.shape == (240, 320, 3)
    painted = np.any(image != BACKGROUND_RGB, axis=2)
    assert painted.mean() > 0.2
    # Both surfaces show: reddish floor pixels and bluish wall pixels.
    red = (image[..., 0] > 100) & (image[..., 2] < 60)
    blue = (image[..., 2] > 100) & (image[..., 0] < 60)
    assert red.sum() > 1000
    assert blue.sum() > 500


def test_empty_cloud_gives_a_valid_png(tmp_path: Path) -> None:
    image = write_preview(
        tmp_path / "empty.png", position_m=np.zeros((0, 3)), color_rgb=np.zeros((0, 3), np.uint8)
    )

    np.testing.assert_array_equal(read_png_rgb(tmp_path / "empty.png"), image)
    # Blank except for the note.
    painted = np.any(image != BACKGROUND_RGB, axis=2)
    assert 0 < painted.mean() < 0.05


def test_top_view_faces_the_normals() -> None:
    # A 4 × 3 m floor between two facing 0.6 m walls: the thinnest principal axis is z.
    rng = np.random.default_rng(1)
    floor = np.column_stack([rng.uniform(0, 4, 3000), rng.uniform(0, 3, 3000), np.zeros(3000)])
    walls = np.column_stack(
        [rng.uniform(0, 4, 1000), np.repeat([0.0, 3.0], 500), rng.uniform(0, 0.6, 1000)]
    )
    position = np.vstack([floor, walls])
    wall_normals = np.repeat([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]], 500, axis=0)
    normal = np.vstack([np.tile([0.0, 0.0, 1.0], (3000, 1)), wall_normals])

    top = fit_projection(position, normal, 320, 240, view="top")
    from_below = fit_projection(position, -normal, 320, 240, view="top")

    np.testing.assert_allclose(top.toward, [0.0, 0.0, 1.0], atol=0.02)
    np.testing.assert_allclose(from_below.toward, [0.0, 0.0, -1.0], atol=0.02)
    np.testing.assert_allclose(np.cross(top.right, top.up), top.toward, atol=1e-9)


def test_nearest_splat_wins() -> None:
    # A black floor grid, and above its centre a green point 0.5 m over a red one.
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 11), np.linspace(-1, 1, 11)), -1).reshape(-1, 2)
    stacked = [[0.05, 0.05, 0.1], [0.05, 0.05, 0.6]]
    position = np.vstack([np.column_stack([grid, np.zeros(len(grid))]), stacked])
    color = np.zeros((len(position), 3), np.uint8)
    color[-2], color[-1] = [255, 0, 0], [0, 255, 0]
    normal = np.tile([0.0, 0.0, 1.0], (len(position), 1))

    radius_m = np.full(len(position), 0.05)
    image = render_preview(position, color, normal, radius_m, width=200, height=200, view="top")

    # Shading may darken a level or two; the hues are what matters.
    green = (image[..., 1] > 200) & (image[..., 0] < 50)
    red = (image[..., 0] > 200) & (image[..., 1] < 50)
    assert green.any()
    assert not red.any()


def test_non_finite_points_are_skipped() -> None:
    cloud = floor_and_wall()
    position = cloud.position_m.copy()
    position[:10] = np.nan

    image = render_preview(position, cloud.color_rgb, cloud.normal, cloud.radius_m, width=160, height=120)

    assert np.any(image != BACKGROUND_RGB)


def test_unwritable_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"failed to write .*missing/map.png"):
        write_preview(tmp_path / "missing" / "map.png", floor_and_wall())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"view": "side"}, r"unknown preview view 'side': use one of oblique, top"),
        ({"width": 10}, r"invalid preview size 10x720"),
    ],
)
def test_bad_options_raise(kwargs: dict, message: str) -> None:
    cloud = floor_and_wall()
    with pytest.raises(ValueError, match=message):
        render_preview(cloud.position_m, cloud.color_rgb, **kwargs)


def test_bad_arrays_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"invalid position_m shape \(4,\)"):
        render_preview(np.zeros(4), np.zeros((4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"invalid color_rgb: shape \(2, 3\), dtype float64"):
        render_preview(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"pass a cloud, or position_m and color_rgb"):
        write_preview(tmp_path / "x.png")
