"""PinholeCamera: construction from K, P and CameraInfo, projection and validation."""

from __future__ import annotations

import numpy as np
import pytest

from surfel_mapping_node.camera import PinholeCamera

KITTI_P0 = [718.856, 0.0, 607.1928, 0.0, 0.0, 718.856, 185.2157, 0.0, 0.0, 0.0, 1.0, 0.0]
KITTI_P1 = [718.856, 0.0, 607.1928, -386.1448, 0.0, 718.856, 185.2157, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_from_K_reads_intrinsics():
    camera = PinholeCamera.from_K([[585.0, 0, 320.0], [0, 585.0, 240.0], [0, 0, 1]], 640, 480)

    assert camera == PinholeCamera(640, 480, 585.0, 585.0, 320.0, 240.0)
    np.testing.assert_array_equal(camera.K, [[585.0, 0, 320.0], [0, 585.0, 240.0], [0, 0, 1]])
    assert camera.shape == (480, 640)


def test_from_P_ignores_baseline_column():
    left = PinholeCamera.from_P(KITTI_P0, 1241, 376)
    right = PinholeCamera.from_P(KITTI_P1, 1241, 376)

    assert left == right
    assert (left.fx, left.cx, left.cy) == (718.856, 607.1928, 185.2157)


def test_from_camera_info_prefers_nonzero_p():
    k = [500.0, 0, 320.0, 0, 500.0, 240.0, 0, 0, 1]
    p = [400.0, 0, 300.0, 0, 0, 400.0, 200.0, 0, 0, 0, 1, 0]

    assert PinholeCamera.from_camera_info(640, 480, k, p).fx == 400.0
    assert PinholeCamera.from_camera_info(640, 480, k, [0.0] * 12).fx == 500.0
    assert PinholeCamera.from_camera_info(640, 480, k).cy == 240.0


def test_negative_fy_projects_v_upwards():
    # ICL-NUIM stores fy < 0: image rows grow as camera y decreases.
    camera = PinholeCamera(640, 480, 481.2, -480.0, 319.5, 239.5)
    u, v, z = camera.project(np.array([[0.0, 1.0, 2.0]]))

    np.testing.assert_allclose(v, [239.5 - 240.0])
    np.testing.assert_allclose(u, [319.5])
    np.testing.assert_allclose(z, [2.0])


def test_backproject_inverts_project():
    rng = np.random.default_rng(0)
    camera = PinholeCamera(640, 480, 585.0, 585.0, 320.0, 240.0)
    points = rng.uniform([-1, -1, 0.5], [1, 1, 5], size=(100, 3))

    u, v, z = camera.project(points)

    np.testing.assert_allclose(camera.backproject(u, v, z), points, atol=1e-12)


def test_project_behind_camera_gives_nan():
    camera = PinholeCamera(640, 480, 585.0, 585.0, 320.0, 240.0)

    u, v, _ = camera.project(np.array([[0.0, 0.0, -1.0], [0.0, 0.0, 0.0]]))

    assert np.isnan(u).all()
    assert np.isnan(v).all()


def test_scaled_keeps_pixel_centres():
    camera = PinholeCamera(640, 480, 585.0, 585.0, 319.5, 239.5)

    half = camera.scaled(320, 240)

    assert (half.fx, half.fy) == (292.5, 292.5)
    # The image centre stays the image centre: (319.5 + 0.5) / 2 - 0.5.
    assert (half.cx, half.cy) == (159.5, 119.5)


def test_check_image_shape_names_both_sizes():
    camera = PinholeCamera(640, 480, 585.0, 585.0, 320.0, 240.0)

    camera.check_image_shape((480, 640, 3))
    with pytest.raises(ValueError, match="depth size 320x240 does not match the camera size 640x480"):
        camera.check_image_shape((240, 320), "depth")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((0, 480, 585.0, 585.0, 320.0, 240.0), "invalid camera size 0x480"),
        ((640, 480, -1.0, 585.0, 320.0, 240.0), "fx=-1.0"),
        ((640, 480, 585.0, 0.0, 320.0, 240.0), "fy=0"),
        ((640, 480, 585.0, 585.0, float("nan"), 240.0), "cx=nan"),
    ],
)
def test_invalid_intrinsics_raise(arguments, message):
    with pytest.raises(ValueError, match=message):
        PinholeCamera(*arguments)


def test_bad_matrix_shapes_raise():
    with pytest.raises(ValueError, match=r"invalid intrinsic matrix shape \(2, 2\)"):
        PinholeCamera.from_K(np.eye(2), 640, 480)
    with pytest.raises(ValueError, match="invalid projection matrix with 9 values"):
        PinholeCamera.from_P(np.zeros(9), 640, 480)
