"""Map quality against held-out depth observations, the same for every map representation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from surfel_mapping_node.config import MapperConfig
from surfel_mapping_node.datasets.base import Dataset
from surfel_mapping_node.depth import decode_depth
from surfel_mapping_node.poses import transform_points


@dataclass
class MapQuality:
    """Distances between a map and depth observations that were not fused into it."""

    # Median distance from each map point to the observed surface, metres (accuracy): the
    # point-to-plane distance to a plane fitted to its nearest observed points.
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
    plane_neighbours: int = 10,
) -> MapQuality:
    """Compare map points (N, 3) with observed points (M, 3), both in the world frame, metres.

    Accuracy is measured to the observed surface rather than to the nearest observed
    point, because the distance to the nearest sample grows with the sample spacing
    (about 2.5 mm per pixel at 1.5 m for a VGA depth camera) even for a perfect map.
    The surface near a map point is the least-squares plane of its PLANE_NEIGHBOURS
    nearest observed points. Only map points within ``coverage_radius_m`` of an
    observed point count towards accuracy, so that parts of the map the held-out frames
    never saw do not count as errors.
    """
    map_points_world = np.asarray(map_points_world, dtype=np.float64).reshape(-1, 3)
    observed_points_world = np.asarray(observed_points_world, dtype=np.float64).reshape(-1, 3)
    if len(observed_points_world) == 0:
        raise ValueError("no observed points: the held-out frames have no valid depth")
    if len(map_points_world) == 0:
        return MapQuality(float("inf"), float("inf"), 0.0, coverage_radius_m, 0, len(observed_points_world))

    observed_tree = cKDTree(observed_points_world)
    neighbour_distance_m, neighbours = observed_tree.query(map_points_world, k=plane_neighbours, workers=-1)
    inside = neighbour_distance_m[:, 0] <= coverage_radius_m
    map_to_observed_m = _point_to_plane_m(map_points_world[inside], observed_points_world[neighbours[inside]])

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


def _point_to_plane_m(points: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Return the distance of points (N, 3) to the planes fitted to neighbours (N, K, 3)."""
    centroid = neighbours.mean(axis=1)
    centred = neighbours - centroid[:, None, :]
    covariance = np.einsum("nki,nkj->nij", centred, centred)
    _, eigenvectors = np.linalg.eigh(covariance)
    normal = eigenvectors[:, :, 0]  # eigenvector of the smallest eigenvalue
    return np.abs(np.einsum("ni,ni->n", points - centroid, normal))


def observed_points_world(
    dataset: Dataset, indices: range | list[int], config: MapperConfig, pixel_step: int = 2
) -> np.ndarray:
    """Back-project the valid depth of the frames INDICES into the world frame: (M, 3) metres.

    Every PIXEL_STEP-th pixel in both directions; depth is decoded with the config's
    range, as the mapper decodes it. For RGB-D datasets (frames with ``depth_raw``).
    """
    clouds = []
    for index in indices:
        frame = dataset[index]
        scale = config.depth.depth_scale or frame.depth_scale
        depth_m = decode_depth(frame.depth_raw, scale, config.depth.min_depth_m, config.depth.max_depth_m)
        depth_m = depth_m[::pixel_step, ::pixel_step]
        v, u = np.nonzero(np.isfinite(depth_m))
        points_camera = dataset.camera.backproject(u * pixel_step, v * pixel_step, depth_m[v, u])
        clouds.append(transform_points(frame.T_world_camera, points_camera))
    return np.concatenate(clouds) if clouds else np.zeros((0, 3))
