"""End-to-end offline mapping: the pipeline and the surfel-map CLI on real and synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from surfel_mapping_node.config import MapperConfig, preset_for_format
from surfel_mapping_node.datasets import open_dataset
from surfel_mapping_node.metrics import map_quality, observed_points_world
from surfel_mapping_node.pipeline import run_pipeline, select_indices
from surfel_mapping_node.ply_io import read_surfel_ply


@pytest.mark.slow
def test_seven_scenes_map_matches_held_out_depth(seven_scenes_dir):
    dataset = open_dataset(seven_scenes_dir, "7scenes")
    config = MapperConfig()

    result = run_pipeline(dataset, config, select_indices(len(dataset), stride=2))
    quality = map_quality(
        result.mapper.cloud().position_m, observed_points_world(dataset, range(1, 300, 10), config)
    )

    assert result.summary()["frames_fused"] == 150
    assert quality.median_map_to_observed_m <= 0.003
    assert quality.observed_within_radius >= 0.95


@pytest.mark.slow
def test_kitti_stereo_map_stays_within_range(kitti_dir):
    dataset = open_dataset(kitti_dir, "kitti", sequence="00")
    config = MapperConfig.from_dict(preset_for_format("kitti"))

    result = run_pipeline(dataset, config, select_indices(len(dataset)))
    cloud = result.mapper.cloud()

    assert result.summary()["frames_fused"] == 51
    assert len(cloud.position_m) > 10_000
    camera_positions = np.array([dataset[i].T_world_camera[:3, 3] for i in range(len(dataset))])
    nearest_camera_m = np.min(
        np.linalg.norm(cloud.position_m[:, None, :] - camera_positions[None, ::5, :], axis=2), axis=1
    )
    # Every surfel was seen within the far limit from some camera of the drive.
    assert np.percentile(nearest_camera_m, 99) <= config.fusion.far_m + 5.0


def test_synthetic_noisy_surfels_lie_on_true_surface():
    from surfel_mapping_node.datasets.synthetic import KinectNoise, SyntheticDataset

    dataset = SyntheticDataset.room(noise=KinectNoise(), seed=0)
    result = run_pipeline(dataset, MapperConfig(), select_indices(len(dataset), max_frames=60))
    distance_m = dataset.scene.distance_to_surface(result.mapper.cloud().position_m)

    assert len(distance_m) > 1000
    assert np.mean(distance_m) <= 0.006


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "surfel_mapping_node.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_run_writes_outputs(seven_scenes_dir, tmp_path):
    out = tmp_path / "out"

    completed = run_cli(
        "run",
        str(seven_scenes_dir),
        "--format",
        "7scenes",
        "--max-frames",
        "6",
        "--stride",
        "2",
        "--out",
        str(out),
        "--no-progress",
    )

    assert completed.returncode == 0, completed.stderr
    timing = json.loads((out / "timing.json").read_text())
    assert [f["index"] for f in timing["frames"]] == [0, 2, 4, 6, 8, 10]
    assert set(timing["frames"][0]) >= {"index", "stamp", "total_ms", "stages_ms", "surfels"}
    assert timing["summary"]["frames"] == 6
    assert "superpixels" in timing["summary"]["stages"]
    cloud = read_surfel_ply(out / "map.ply")
    assert len(cloud.position_m) == timing["frames"][-1]["surfels"]
    assert (out / "preview.png").stat().st_size > 0
    assert MapperConfig.from_yaml(out / "config.yaml") == MapperConfig()
    assert "median" in completed.stdout


def test_cli_demo_runs_on_builtin_data(tmp_path):
    completed = run_cli("demo", "--out", str(tmp_path), "--max-frames", "10", "--no-progress")

    assert completed.returncode == 0, completed.stderr
    assert len(read_surfel_ply(tmp_path / "map.ply").position_m) > 0


def test_cli_missing_dataset_names_path(tmp_path):
    missing = tmp_path / "no_such_dataset"

    completed = run_cli("run", str(missing), "--format", "7scenes", "--out", str(tmp_path / "o"))

    assert completed.returncode == 2
    assert str(missing) in completed.stderr


def test_cli_unknown_config_key_is_error(seven_scenes_dir, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("fusion:\n  max_wieght: 3\n")

    completed = run_cli("run", str(seven_scenes_dir), "--format", "7scenes", "--config", str(config))

    assert completed.returncode == 2
    assert "fusion.max_wieght" in completed.stderr


def test_cli_config_prints_loadable_defaults(tmp_path):
    completed = run_cli("config", "--format", "kitti")
    path = tmp_path / "kitti.yaml"
    path.write_text(completed.stdout)

    assert completed.returncode == 0
    assert MapperConfig.from_yaml(path) == MapperConfig.from_dict(preset_for_format("kitti"))


def test_select_indices_rejects_bad_stride():
    with pytest.raises(ValueError, match="invalid stride 0"):
        select_indices(10, stride=0)
    with pytest.raises(ValueError, match="invalid first frame 12"):
        select_indices(10, first=12)


def test_cli_demo_missing_data_is_error(tmp_path):
    completed = run_cli("demo", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))

    assert completed.returncode == 2
    assert "7-Scenes excerpt not found in --data" in completed.stderr
    assert not (tmp_path / "o" / "map.ply").exists()


def test_cli_bag_format_on_dataset_folder(seven_scenes_dir, tmp_path):
    completed = run_cli("run", str(seven_scenes_dir), "--format", "bag", "--out", str(tmp_path / "o"))

    assert completed.returncode == 2
    assert "not a ROS 2 bag folder" in completed.stderr
