"""Surfel mapper against Open3D's VoxelBlockGrid on real RGB-D and stereo data.

Runs, in one process and on the same frames:
  - 7-Scenes 640×480, every second frame of 0–299: time per frame of the surfel
    mapper and of VoxelBlockGrid at 2 cm and 1 cm, map quality against the depth of
    the frames that were not fused, and memory;
  - KITTI 1241×376: mapping stages per frame, stereo matching timed separately;
  - the synthetic scene with Kinect-like noise: distance of surfels to the true surface;
  - a long synthetic trajectory: per-frame cost of the last 10 % against the first 10 %.
Results go to docs/benchmarks.md (section "mapping").

  python -m benchmarks.bench_mapping [--data ../shared/data] [--long-frames 2000]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.report import write_section
from surfel_mapping_node.config import MapperConfig, preset_for_format
from surfel_mapping_node.datasets import open_dataset
from surfel_mapping_node.metrics import MapQuality, map_quality, observed_points_world
from surfel_mapping_node.pipeline import run_pipeline, select_indices
from surfel_mapping_node.poses import invert

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class VoxelGridRun:
    voxel_size_m: float
    frame_ms: list[float]
    points_world: np.ndarray
    memory_bytes: int


def run_voxel_block_grid(dataset, indices, voxel_size_m: float, max_depth_m: float) -> VoxelGridRun:
    """Integrate FRAMES into an Open3D tensor VoxelBlockGrid (CPU); time each integration."""
    import open3d as o3d
    import open3d.core as o3c

    device = o3c.Device("CPU:0")
    grid = o3d.t.geometry.VoxelBlockGrid(
        attr_names=("tsdf", "weight", "color"),
        attr_dtypes=(o3c.float32, o3c.float32, o3c.float32),
        attr_channels=((1), (1), (3)),
        voxel_size=voxel_size_m,
        block_resolution=16,
        block_count=60000,
        device=device,
    )
    intrinsic = o3c.Tensor(dataset.camera.K, o3c.float64)
    frame_ms = []
    for index in indices:
        frame = dataset[index]
        extrinsic = o3c.Tensor(invert(frame.T_world_camera), o3c.float64)
        scale = 1.0 / frame.depth_scale
        start = time.perf_counter()
        depth = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(frame.depth_raw)))
        color = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(frame.image)))
        blocks = grid.compute_unique_block_coordinates(depth, intrinsic, extrinsic, scale, max_depth_m)
        grid.integrate(blocks, depth, color, intrinsic, intrinsic, extrinsic, scale, max_depth_m)
        frame_ms.append((time.perf_counter() - start) * 1e3)

    points = grid.extract_point_cloud().point.positions.numpy()
    active_blocks = grid.hashmap().size()
    bytes_per_voxel = 4 * (1 + 1 + 3)
    memory = active_blocks * 16**3 * bytes_per_voxel
    return VoxelGridRun(voxel_size_m, frame_ms, points, int(memory))


def quality_row(name: str, quality: MapQuality) -> str:
    return (
        f"| {name} | {quality.median_map_to_observed_m * 1e3:.2f} mm | "
        f"{quality.p90_map_to_observed_m * 1e3:.1f} mm | {quality.observed_within_radius * 100:.1f} % | "
        f"{quality.map_points:,} |"
    )


def surfel_map_bytes(mapper) -> tuple[int, int]:
    """Return (bytes of the surfel arrays, surfel count)."""
    cloud_bytes = mapper.memory_bytes() if hasattr(mapper, "memory_bytes") else None
    count = len(mapper.cloud().position_m)
    if cloud_bytes is None:
        cloud = mapper.cloud()
        cloud_bytes = sum(getattr(cloud, name).nbytes for name in cloud.__dataclass_fields__)
    return int(cloud_bytes), count


def bench_seven_scenes(data_dir: Path, lines: list[str], repeats: int) -> None:
    dataset = open_dataset(data_dir / "7scenes_redkitchen", "7scenes")
    config = MapperConfig.from_dict(preset_for_format("7scenes"))
    fused = select_indices(len(dataset), 0, None, 2)
    held_out = range(1, len(dataset), 10)

    warmup = run_pipeline(dataset, config, select_indices(len(dataset), 0, 3, 1))  # JIT compilation
    del warmup
    gc.collect()

    # The surfel mapper and VoxelBlockGrid 2 cm take turns, REPEATS times, so that load
    # from other processes falls on both; each figure is the median over the runs'
    # medians. VoxelBlockGrid 1 cm runs once.
    surfel_medians, grid_medians = [], []
    for _ in range(repeats):
        surfel_run = run_pipeline(dataset, config, fused)
        surfel_ms = [f.total_ms for f in surfel_run.frames if f.skipped_reason is None]
        surfel_medians.append(float(np.median(surfel_ms)))
        grid_2cm = run_voxel_block_grid(dataset, fused, 0.02, config.depth.max_depth_m)
        grid_medians.append(float(np.median(grid_2cm.frame_ms)))
    summary = surfel_run.summary()
    grids = {0.02: grid_2cm, 0.01: run_voxel_block_grid(dataset, fused, 0.01, config.depth.max_depth_m)}

    observed = observed_points_world(dataset, held_out, config)
    cloud = surfel_run.mapper.cloud()
    surfel_quality = map_quality(cloud.position_m, observed)
    grid_quality = {size: map_quality(run.points_world, observed) for size, run in grids.items()}
    surfel_bytes, surfel_count = surfel_map_bytes(surfel_run.mapper)

    median_2cm = float(np.median(grid_medians))
    surfel_median = float(np.median(surfel_medians))
    lines += [
        "### 7-Scenes redkitchen, 640×480, frames 0, 2, …, 298 (150 frames)",
        "",
        "Time per frame: the surfel mapper's total is depth decoding + superpixels + surfel extraction + "
        "fusion + new surfels; VoxelBlockGrid's is block allocation + integration (TSDF, weight, color).",
        "",
        f"The surfel mapper and VoxelBlockGrid 2 cm ran {repeats} times each, taking turns; the "
        "median column is the median of the runs' medians, with the runs' range in brackets, and "
        "the p90 is that of the last run.",
        "",
        "| system | median ms per frame (range over runs) | p90 ms | ratio to VoxelBlockGrid 2 cm |",
        "|---|---|---|---|",
        f"| surfel mapper | {surfel_median:.1f} ({min(surfel_medians):.1f}–{max(surfel_medians):.1f}) | "
        f"{np.percentile(surfel_ms, 90):.1f} | {surfel_median / median_2cm:.2f} |",
        f"| Open3D VoxelBlockGrid 2 cm | {median_2cm:.1f} "
        f"({min(grid_medians):.1f}–{max(grid_medians):.1f}) | "
        f"{np.percentile(grids[0.02].frame_ms, 90):.1f} | 1.00 |",
        f"| Open3D VoxelBlockGrid 1 cm | {np.median(grids[0.01].frame_ms):.1f} (one run) | "
        f"{np.percentile(grids[0.01].frame_ms, 90):.1f} | "
        f"{np.median(grids[0.01].frame_ms) / median_2cm:.2f} |",
    ]
    lines += ["", "Surfel mapper stages (median / p90 ms):", ""]
    lines += ["| stage | median ms | p90 ms |", "|---|---|---|"]
    for name, values in summary["stages"].items():
        lines.append(f"| {name} | {values['median_ms']:.2f} | {values['p90_ms']:.2f} |")
    lines += [
        "",
        f"Map quality against the depth of the held-out frames 1, 11, …, 291 ({len(observed):,} points, "
        "every 2nd pixel): accuracy is the distance from each map point to the observed surface (the plane "
        "of its 10 nearest observed points; map points more than 5 cm from every observed point are left "
        "out); completeness is the share of observed points with a map point within 5 cm.",
        "",
        "| map | median accuracy | p90 accuracy | observed within 5 cm | map points |",
        "|---|---|---|---|---|",
        quality_row("surfel mapper", surfel_quality),
    ]
    for size, quality in grid_quality.items():
        lines.append(quality_row(f"VoxelBlockGrid {size * 100:.0f} cm", quality))
    lines += [
        "",
        "Memory:",
        "",
        "| map | elements | bytes | bytes per element |",
        "|---|---|---|---|",
        f"| surfel mapper | {surfel_count:,} surfels | {surfel_bytes / 2**20:.1f} MiB | "
        f"{surfel_bytes / max(surfel_count, 1):.0f} |",
    ]
    for size, run in grids.items():
        voxels = run.memory_bytes // 20
        lines.append(
            f"| VoxelBlockGrid {size * 100:.0f} cm | {voxels:,} voxels in allocated blocks | "
            f"{run.memory_bytes / 2**20:.1f} MiB | 20 |"
        )
    lines.append("")


def bench_kitti(data_dir: Path, lines: list[str]) -> None:
    dataset = open_dataset(data_dir / "kitti_odometry", "kitti", sequence="00")
    config = MapperConfig.from_dict(preset_for_format("kitti"))
    run_pipeline(dataset, config, select_indices(len(dataset), 0, 2, 1))  # JIT compilation
    result = run_pipeline(dataset, config, select_indices(len(dataset)))
    summary = result.summary()
    lines += [
        f"### KITTI odometry excerpt, 1241×376, {summary['frames']} stereo pairs",
        "",
        "Mapping stages exclude stereo matching (OpenCV SGBM), which is timed on its own.",
        "",
        "| stage | median ms | p90 ms |",
        "|---|---|---|",
    ]
    for name, values in summary["stages"].items():
        lines.append(f"| {name} | {values['median_ms']:.2f} | {values['p90_ms']:.2f} |")
    lines += ["", f"Surfels at the end: {summary['surfels']:,}.", ""]


def bench_synthetic(lines: list[str], long_frames: int) -> None:
    from surfel_mapping_node.datasets.synthetic import KinectNoise, SyntheticDataset

    dataset = SyntheticDataset.room(noise=KinectNoise(), seed=0)
    config = MapperConfig()
    result = run_pipeline(dataset, config, select_indices(len(dataset)))
    cloud = result.mapper.cloud()
    distance_m = dataset.scene.distance_to_surface(cloud.position_m)
    lines += [
        "### Synthetic scene with Kinect-like depth noise",
        "",
        f"{len(dataset)} frames, {len(cloud.position_m):,} surfels: mean distance of surfels to the true "
        f"surface {np.mean(distance_m) * 1e3:.2f} mm, median {np.median(distance_m) * 1e3:.2f} mm.",
        "",
    ]

    long_dataset = SyntheticDataset.corridor(n_frames=long_frames, seed=0)
    result = run_pipeline(long_dataset, config, select_indices(len(long_dataset)))
    frame_ms = np.array([f.total_ms for f in result.frames])
    surfels = np.array([f.surfels for f in result.frames])
    tenth = max(len(frame_ms) // 10, 1)
    first_ms, last_ms = np.median(frame_ms[:tenth]), np.median(frame_ms[-tenth:])
    growth = surfels[-1] / max(surfels[tenth - 1], 1)
    lines += [
        f"### Flat cost: synthetic corridor, {len(frame_ms)} frames at 320×240",
        "",
        "| | first 10 % of frames | last 10 % of frames | ratio |",
        "|---|---|---|---|",
        f"| median ms per frame | {first_ms:.2f} | {last_ms:.2f} | {last_ms / first_ms:.2f} |",
    ]
    for stage in result.frames[-1].stages_ms:
        first = np.median([f.stages_ms.get(stage, 0.0) for f in result.frames[:tenth]])
        last = np.median([f.stages_ms.get(stage, 0.0) for f in result.frames[-tenth:]])
        lines.append(f"| — {stage} | {first:.2f} | {last:.2f} | {last / max(first, 1e-9):.2f} |")
    lines += [
        f"| surfels in the map | {surfels[tenth - 1]:,} | {surfels[-1]:,} | {growth:.1f}× |",
        "",
        "The stages that depend on the map work on the local map only. The keyframes stage "
        "(local-map search and parking) grows while the local map fills during the first metres "
        "of the walk and is flat after that; at about 3 ms per frame, a fraction of a "
        "millisecond of load from other processes moves the ratio by 0.1 or more.",
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--long-frames", type=int, default=2000)
    parser.add_argument(
        "--repeats", type=int, default=5, help="turns of the mapper and VoxelBlockGrid 2 cm on 7-Scenes"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["7scenes", "kitti", "synthetic"])
    args = parser.parse_args()

    lines: list[str] = []
    if "7scenes" not in args.skip:
        bench_seven_scenes(args.data, lines, args.repeats)
    if "kitti" not in args.skip:
        bench_kitti(args.data, lines)
    if "synthetic" not in args.skip:
        bench_synthetic(lines, args.long_frames)
    body = "\n".join(lines)
    print(body)
    write_section("mapping", "Surfel mapping against Open3D VoxelBlockGrid", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
