"""Map quality against held-out depth observations, the same for every map representation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree


@dataclass
class MapQuality:
    """Distances between a map and depth observations that were not fused into it."""

    # Median distance from each map point to the nearest observed point, metres (accuracy).
    median_map_to_observed_m: float
    # 90th percentile of the same distances, metres.
    p90_map_to_observed_m: float
    # Fraction of observed points with a map point within coverage_radius_m (completeness).
    observed_within_radius: float
    coverage_radius_m: float
    map_points: int
    observed_points: int


def map_quality(
    map_points_world: np.ndarray,
    observed_points_world: np.ndarray,
    coverage_radius_m: float = 0.05,
) -> MapQuality:
    """Compare map points (N, 3) with observed points (M, 3), both in the world frame, metres.

    Only map points within ``coverage_radius_m`` of the observed region's bounding box
    count towards accuracy, so that parts of the map the held-out frames never saw do
    not count as errors.
    """
    map_points_world = np.asarray(map_points_world, dtype=np.float64).reshape(-1, 3)
    observed_points_world = np.asarray(observed_points_world, dtype=np.float64).reshape(-1, 3)
    if len(observed_points_world) == 0:
        raise ValueError("no observed points: the held-out frames have no valid depth")
    if len(map_points_world) == 0:
        return MapQuality(float("inf"), float("inf"), 0.0, coverage_radius_m, 0, len(observed_points_world))

    lower = observed_points_world.min(axis=0) - coverage_radius_m
    upper = observed_points_world.max(axis=0) + coverage_radius_m
    inside = np.all((map_points_world >= lower) & (map_points_world <= upper), axis=1)
    map_to_observed_m, _ = cKDTree(observed_points_world).query(map_points_world[inside], workers=-1)

    observed_to_map_m, _ = cKDTree(map_points_world).query(
        observed_points_world, distance_upper_bound=coverage_radius_m, workers=-1
    )
    return MapQuality(
        median_map_to_observed_m=float(np.median(map_to_observed_m)) if inside.any() else float("inf"),
        p90_map_to_observed_m=float(np.percentile(map_to_observed_m, 90)) if inside.any() else float("inf"),
        observed_within_radius=float(np.mean(observed_to_map_m <= coverage_radius_m)),
        coverage_radius_m=coverage_radius_m,
        map_points=len(map_points_world),
        observed_points=len(observed_points_world),
    )
