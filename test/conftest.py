"""Shared fixtures: the real sensor data excerpts, skipped with a reason when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SURFEL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
SEVEN_SCENES_DIR = SHARED_DATA / "7scenes_redkitchen"
KITTI_DIR = SHARED_DATA / "kitti_odometry"


@pytest.fixture(scope="session")
def seven_scenes_dir() -> Path:
    """The 7-Scenes redkitchen excerpt (300 RGB-D frames with ground-truth poses)."""
    if not (SEVEN_SCENES_DIR / "camera-intrinsics.txt").is_file():
        pytest.skip(f"7-Scenes excerpt not found at {SEVEN_SCENES_DIR} (set SURFEL_SHARED_DATA)")
    return SEVEN_SCENES_DIR


@pytest.fixture(scope="session")
def kitti_dir() -> Path:
    """The KITTI odometry excerpt (51 stereo pairs of sequence 00 with poses)."""
    if not (KITTI_DIR / "sequences" / "00" / "calib.txt").is_file():
        pytest.skip(f"KITTI excerpt not found at {KITTI_DIR} (set SURFEL_SHARED_DATA)")
    return KITTI_DIR
