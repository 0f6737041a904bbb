"""`colcon build` of the package in a fresh workspace installs its data and executables."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "surfel_perception"
# Build outputs and local state that a checkout may hold; a clean copy leaves them out.
NOT_COPIED = (".git", ".venv", "build", "install", "log", "out", "__pycache__", "*.egg-info", ".*_cache")

pytestmark = pytest.mark.slow


def find_colcon() -> str | None:
    """Return colcon from PATH or from the running interpreter's bin folder."""
    return shutil.which("colcon") or shutil.which("colcon", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def install_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    colcon = find_colcon()
    if colcon is None:
        pytest.skip("colcon is not installed (pip install colcon-common-extensions)")
    workspace = tmp_path_factory.mktemp("colcon_ws")
    # A copy, not a symlink: setuptools writes egg-info next to setup.py.
    shutil.copytree(REPO_ROOT, workspace / "src" / PACKAGE, ignore=shutil.ignore_patterns(*NOT_COPIED))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

    result = subprocess.run(
        [colcon, "build", "--base-paths", "src", "--event-handlers", "console_direct-"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, f"colcon build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return workspace / "install" / PACKAGE


def test_share_holds_launch_config_rviz_and_package_files(install_dir: Path):
    share = install_dir / "share" / PACKAGE
    expected = {
        "launch": sorted(p.name for p in (REPO_ROOT / "launch").glob("*.launch.xml")),
        "config": sorted(p.name for p in (REPO_ROOT / "config").iterdir() if p.suffix in (".yaml", ".xml")),
        "rviz": sorted(p.name for p in (REPO_ROOT / "rviz").glob("*.rviz")),
    }

    for folder, names in expected.items():
        assert sorted(p.name for p in (share / folder).iterdir()) == names
    assert {"rgbd_drone.launch.xml", "stereo_ground_robot.launch.xml", "kitti_replay.launch.xml"} <= set(
        expected["launch"]
    )
    assert "surfel_map.rviz" in expected["rviz"]
    assert (share / "package.xml").is_file()
    assert (install_dir / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE).is_file()


def test_executables_are_installed_under_lib_package(install_dir: Path):
    lib = install_dir / "lib" / PACKAGE
    for name in ("surfel_mapping_node", "surfel-map"):
        executable = lib / name
        assert executable.is_file(), f"{executable} is missing"
        assert os.access(executable, os.X_OK), f"{executable} is not executable"


def test_installed_node_runs_and_rejects_an_invalid_parameter(install_dir: Path):
    pytest.importorskip("rclpy", reason="rclpy is needed to run the node")
    site_packages = next((install_dir / "lib").glob("python3*/site-packages"))
    env = dict(
        os.environ,
        PYTHONPATH=f"{site_packages}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        ROS_DOMAIN_ID=str(1 + os.getpid() % 100),
        RMW_IMPLEMENTATION="rmw_fastrtps_cpp",
    )

    result = subprocess.run(
        [str(install_dir / "lib" / PACKAGE / "surfel_mapping_node"), "--ros-args", "-p", "input_mode:=lidar"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "invalid parameter input_mode='lidar': use one of 'rgbd', 'stereo', 'depth_only'" in result.stderr
