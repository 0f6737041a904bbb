"""Map quality: accuracy to the observed surface and completeness."""

from __future__ import annotations

import numpy as np
import pytest

from surfel_mapping_node.metrics import map_quality


def plane_points(spacing_m: float, offset_z_m: float = 0.0, size_m: float = 1.0) -> np.ndarray:
    axis = np.arange(0.0, size_m, spacing_m)
    x, y = np.meshgrid(axis, axis)
    return np.stack([x.ravel(), y.ravel(), np.full(x.size, offset_z_m)], axis=1)


def test_sparse_samples_do_not_count_as_error():
    # A perfect map between observed samples 1 cm apart: point-to-plane distance is 0,
    # although the nearest observed sample is up to 7 mm away.
    observed = plane_points(0.01)
    map_points = plane_points(0.01)[:, :] + [0.005, 0.005, 0.0]

    quality = map_quality(map_points, observed)

    assert quality.median_map_to_observed_m == pytest.approx(0.0, abs=1e-9)
    assert quality.observed_within_radius == 1.0


def test_offset_map_reports_its_offset():
    observed = plane_points(0.01)
    map_points = plane_points(0.02, offset_z_m=0.004)

    quality = map_quality(map_points, observed)

    assert quality.median_map_to_observed_m == pytest.approx(0.004, abs=1e-6)
    assert quality.p90_map_to_observed_m == pytest.approx(0.004, abs=1e-6)


def test_completeness_counts_uncovered_observations():
    observed = plane_points(0.01, size_m=1.0)
    half = observed[observed[:, 0] < 0.3]

    quality = map_quality(half, observed, coverage_radius_m=0.05)

    # Covered: x < 0.3 + 0.05 (within the coverage radius of the map's edge).
    expected = np.mean(observed[:, 0] < 0.345)
    assert quality.observed_within_radius == pytest.approx(expected, abs=0.02)


def test_map_points_far_from_observations_are_left_out():
    observed = plane_points(0.01)
    stray = np.array([[5.0, 5.0, 5.0]])

    quality = map_quality(np.vstack([plane_points(0.02), stray]), observed)

    assert quality.median_map_to_observed_m == pytest.approx(0.0, abs=1e-9)
    assert quality.map_points == len(plane_points(0.02)) + 1


def test_empty_map_and_empty_observations():
    observed = plane_points(0.05)

    assert map_quality(np.zeros((0, 3)), observed).observed_within_radius == 0.0
    with pytest.raises(ValueError, match="no observed points"):
        map_quality(observed, np.zeros((0, 3)))
