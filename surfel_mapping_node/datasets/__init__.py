"""Dataset readers behind one interface (see base.Dataset), opened by format name."""

from __future__ import annotations

from pathlib import Path

from surfel_mapping_node.config import MapperConfig
from surfel_mapping_node.datasets.base import Dataset, Frame

FORMATS = ("tum", "7scenes", "kitti", "bag", "synthetic")

__all__ = ["FORMATS", "Dataset", "Frame", "open_dataset"]


def open_dataset(
    path: str | Path | None,
    format_name: str,
    sequence: str = "00",
    config: MapperConfig | None = None,
) -> Dataset:
    """Open the dataset at PATH in the layout FORMAT_NAME.

    Args:
        path: dataset folder, or a bag folder for "bag"; ignored for "synthetic".
        format_name: one of FORMATS.
        sequence: KITTI sequence number.
        config: its ``camera`` section, when set, replaces the dataset's intrinsics
            (required in practice for TUM, which ships none); ``depth.depth_scale`` is
            applied by the pipeline, not here.

    Raises:
        ValueError: for an unknown format.
        FileNotFoundError: when the dataset or one of its files is missing (the message names it).
    """
    config = config or MapperConfig()
    camera = _camera_from_config(config)

    if format_name == "synthetic":
        from surfel_mapping_node.datasets.synthetic import SyntheticDataset

        return SyntheticDataset.room(camera=camera) if camera else SyntheticDataset.room()
    if path is None:
        raise ValueError(f"format {format_name!r} needs a dataset path")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")

    if format_name == "7scenes":
        from surfel_mapping_node.datasets.seven_scenes import SevenScenesDataset

        return SevenScenesDataset(path, camera=camera)
    if format_name == "kitti":
        from surfel_mapping_node.datasets.kitti import KittiOdometryDataset

        if camera is not None:
            raise ValueError("KITTI intrinsics come from calib.txt: remove the camera section")
        return KittiOdometryDataset(path, sequence=sequence)
    if format_name == "tum":
        from surfel_mapping_node.datasets.tum import TumRgbdDataset

        return TumRgbdDataset(path, camera=camera or "freiburg1")
    if format_name == "bag":
        from surfel_mapping_node.datasets.rosbag import BagDataset

        if camera is not None:
            raise ValueError("a bag carries CameraInfo messages: remove the camera section")
        if path.is_dir() and not (path / "metadata.yaml").is_file():
            raise FileNotFoundError(
                f"not a ROS 2 bag folder: {path} has no metadata.yaml; convert a dataset with "
                "'surfel-map convert' or pass the dataset's own --format"
            )
        return BagDataset(path)
    raise ValueError(f"unknown dataset format {format_name!r}: use one of {', '.join(FORMATS)}")


def _camera_from_config(config: MapperConfig):
    from surfel_mapping_node.camera import PinholeCamera

    section = config.camera
    if not section.is_set():
        return None
    return PinholeCamera(section.width, section.height, section.fx, section.fy, section.cx, section.cy)
