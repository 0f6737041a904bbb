"""Parameters and topics of surfel_mapping_node, ROS-free so that tools and tests can read them.

Every node option is listed once in PARAMETER_SPECS; every mapper option comes from
MapperConfig, flattened as ``section.name`` (e.g. ``fusion.max_weight``).
``settings_from_parameters`` validates a full set of values without ROS, so the node
and the launch-file checks apply the same rules.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from surfel_mapping_node.config import ConfigError, MapperConfig
from surfel_mapping_node.poses import InvalidPoseError, pose_from_translation_quaternion

NODE_NAME = "surfel_mapping_node"
# Topics subscribed in each input mode (relative names, remappable), then in every mode.
INPUT_TOPICS: dict[str, tuple[str, ...]] = {
    "rgbd": ("image", "depth", "camera_info"),
    "depth_only": ("image", "depth", "camera_info"),
    "stereo": ("left/image_rect", "right/image_rect", "left/camera_info", "right/camera_info"),
}
STATE_TOPICS = ("pose", "keyframes")
MILLIMETRES_PER_UNIT_DEFAULT = 0.001  # REP 118: 16UC1 depth is millimetres.
# Mapper sections that are not ROS parameters: intrinsics come from CameraInfo.
MAPPER_SECTIONS_NOT_PARAMETERS = ("camera",)


class NodeParameterError(ValueError):
    """An invalid ROS parameter value; the message names the parameter, the value and what is allowed."""


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter: its default (which fixes its type), description and limits."""

    name: str
    default: bool | int | float | str | list[float]
    description: str
    # Inclusive numeric range; None means unbounded on that side.
    min_value: float | None = None
    max_value: float | None = None
    # Allowed strings, for enumerations.
    choices: tuple[str, ...] = ()
    # Whether a running node accepts a new value (the rest are read at start-up).
    runtime: bool = False

    def allowed(self) -> str:
        """Return what the parameter accepts, in words."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if isinstance(self.default, list):
            return f"a list of {len(self.default)} finite numbers"
        kind = {bool: "a bool", int: "an integer", float: "a double", str: "a string"}[type(self.default)]
        if self.min_value is not None and self.max_value is not None:
            return f"{kind} in [{self.min_value}, {self.max_value}]"
        if self.min_value is not None:
            return f"{kind} >= {self.min_value}"
        return kind

    def check(self, value: Any) -> Any:
        """Return the value if it is allowed; raise NodeParameterError otherwise."""
        expected = type(self.default)
        ok_type = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if expected is list:
            ok_type = (
                isinstance(value, list | tuple)
                and len(value) == len(self.default)
                and all(isinstance(v, int | float) and math.isfinite(v) for v in value)
            )
        ok = ok_type
        if ok and isinstance(value, int | float) and not isinstance(value, bool):
            ok = math.isfinite(value) and (
                (self.min_value is None or value >= self.min_value)
                and (self.max_value is None or value <= self.max_value)
            )
        if ok and self.choices:
            ok = value in self.choices
        if not ok:
            raise NodeParameterError(f"invalid parameter {self.name}={value!r}: use {self.allowed()}")
        return list(value) if expected is list else value


# The node's own parameters (the mapper's come from MapperConfig, see mapper_parameter_specs).
PARAMETER_SPECS: tuple[ParamSpec, ...] = (
    ParamSpec(
        "input_mode",
        "rgbd",
        "Input: 'rgbd' (image + registered depth), 'stereo' (rectified "
        "pair, depth computed here) or 'depth_only' (a learned 32FC1 depth with its image).",
        choices=("rgbd", "stereo", "depth_only"),
    ),
    ParamSpec(
        "pose_type",
        "pose_stamped",
        "Message type of the 'pose' topic: 'pose_stamped' "
        "(geometry_msgs/PoseStamped) or 'odometry' (nav_msgs/Odometry).",
        choices=("pose_stamped", "odometry"),
    ),
    ParamSpec(
        "T_body_camera",
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        "Camera (optical frame) pose in "
        "the body frame that 'pose' and 'keyframes' report, as [x, y, z, qx, qy, qz, qw] in "
        "metres; identity when the poses are already camera poses.",
    ),
    ParamSpec("map_frame", "map", "Frame of the input poses and of the published map."),
    ParamSpec(
        "sync_tolerance",
        0.01,
        "Maximum stamp difference, seconds, between an image and its depth (or right image) and pose.",
        0.0,
        1.0,
    ),
    ParamSpec("image_queue_size", 10, "Messages kept per image stream while waiting for partners.", 1, 1000),
    ParamSpec(
        "pose_queue_size",
        200,
        "Poses kept while waiting for images (odometry may run at hundreds of Hz).",
        1,
        100000,
    ),
    ParamSpec(
        "image_qos",
        "sensor_data",
        "QoS of the image, depth and camera_info subscriptions: "
        "'sensor_data' (best effort, accepts any publisher) or 'reliable'.",
        choices=("sensor_data", "reliable"),
    ),
    ParamSpec(
        "pose_qos",
        "reliable",
        "QoS of the pose and keyframes subscriptions: 'reliable' or 'sensor_data' (best effort).",
        choices=("reliable", "sensor_data"),
    ),
    ParamSpec(
        "publish_rate",
        1.0,
        "Rate, Hz, of the ~/map, ~/map_mesh and ~/keyframe_path publications (only when the map changed).",
        0.01,
        100.0,
    ),
    ParamSpec(
        "max_published_points",
        500000,
        "Maximum number of points in ~/map; bigger maps are decimated evenly (0 publishes all).",
        0,
        100_000_000,
        runtime=True,
    ),
    ParamSpec("publish_mesh", False, "Publish ~/map_mesh, the surfels as colored discs.", runtime=True),
    ParamSpec(
        "mesh_max_surfels",
        2000,
        "Maximum number of discs in ~/map_mesh, decimated evenly (0 publishes all). Building "
        "the marker costs about 0.3 s per 1000 discs of 6 triangles, on the mapping thread.",
        0,
        10_000_000,
        runtime=True,
    ),
    ParamSpec("mesh_segments", 6, "Triangles per disc in ~/map_mesh.", 3, 64, runtime=True),
    ParamSpec(
        "save_path",
        "surfel_map.ply",
        "PLY file written by ~/save_map and on shutdown; a "
        "relative path is relative to the node's working directory.",
        runtime=True,
    ),
    ParamSpec(
        "save_on_shutdown", False, "Write the map to save_path when the node stops (Ctrl-C).", runtime=True
    ),
    ParamSpec(
        "log_every_n_frames",
        30,
        "Log a timing line every this many processed frames (0: never).",
        0,
        1_000_000,
        runtime=True,
    ),
)


def mapper_parameter_specs() -> tuple[ParamSpec, ...]:
    """Return the mapper's options as flattened parameter specs (``section.name``).

    Their values are checked by MapperConfig.validate, which names the option and the
    allowed values, so the specs carry no ranges of their own.
    """
    specs = []
    defaults = MapperConfig()
    for section in dataclasses.fields(defaults):
        if section.name in MAPPER_SECTIONS_NOT_PARAMETERS:
            continue
        for option in dataclasses.fields(getattr(defaults, section.name)):
            name = f"{section.name}.{option.name}"
            specs.append(
                ParamSpec(
                    name,
                    getattr(getattr(defaults, section.name), option.name),
                    f"Mapper option {name}; its meaning, default and limits are documented "
                    "in surfel_mapping_node/config.py (MapperConfig).",
                )
            )
    return tuple(specs)


def all_parameter_specs() -> dict[str, ParamSpec]:
    """Return every parameter the node declares, by name."""
    return {spec.name: spec for spec in (*PARAMETER_SPECS, *mapper_parameter_specs())}


def parameter_help() -> str:
    """Return every parameter with its default, what it accepts and its description."""
    lines = []
    for name, spec in all_parameter_specs().items():
        lines.append(f"  {name} (default {spec.default!r}; {spec.allowed()})")
        lines.append(f"      {spec.description}")
    return "\n".join(lines)


@dataclass(frozen=True)
class NodeSettings:
    """The validated node parameters (the mapper's are in ``mapper_config``)."""

    input_mode: str
    pose_type: str
    T_body_camera: np.ndarray
    map_frame: str
    sync_tolerance_ns: int
    image_queue_size: int
    pose_queue_size: int
    image_qos: str
    pose_qos: str
    publish_rate_hz: float
    max_published_points: int
    publish_mesh: bool
    mesh_max_surfels: int
    mesh_segments: int
    save_path: str
    save_on_shutdown: bool
    log_every_n_frames: int
    mapper_config: MapperConfig = field(default_factory=MapperConfig)


def settings_from_parameters(values: dict[str, Any]) -> NodeSettings:
    """Validate parameter values (name -> value, as declared) and return the settings.

    Missing names take their defaults. ROS-free, so launch files and tests can check
    parameter files without starting a node.

    Raises:
        NodeParameterError: an unknown name, or a value outside what the spec allows;
            the message names the parameter, the value and what is allowed.
    """
    specs = all_parameter_specs()
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise NodeParameterError(
            f"unknown parameter {unknown[0]!r}: the node declares {', '.join(sorted(specs))}"
        )
    checked = {name: spec.check(values.get(name, spec.default)) for name, spec in specs.items()}

    # Node options.
    t = checked["T_body_camera"]
    try:
        T_body_camera = pose_from_translation_quaternion(np.array(t[:3]), np.array(t[3:]))
    except InvalidPoseError as error:
        raise NodeParameterError(f"invalid parameter T_body_camera={t}: {error}") from error

    # Mapper options: nested back into MapperConfig sections and validated there.
    nested: dict[str, dict[str, Any]] = {}
    for name, value in checked.items():
        if "." in name:
            section, option = name.split(".", 1)
            nested.setdefault(section, {})[option] = value
    try:
        mapper_config = MapperConfig.from_dict(nested)
    except ConfigError as error:
        raise NodeParameterError(f"invalid mapper parameter: {error}") from error

    return NodeSettings(
        input_mode=checked["input_mode"],
        pose_type=checked["pose_type"],
        T_body_camera=T_body_camera,
        map_frame=checked["map_frame"],
        sync_tolerance_ns=round(checked["sync_tolerance"] * 1e9),
        image_queue_size=checked["image_queue_size"],
        pose_queue_size=checked["pose_queue_size"],
        image_qos=checked["image_qos"],
        pose_qos=checked["pose_qos"],
        publish_rate_hz=checked["publish_rate"],
        max_published_points=checked["max_published_points"],
        publish_mesh=checked["publish_mesh"],
        mesh_max_surfels=checked["mesh_max_surfels"],
        mesh_segments=checked["mesh_segments"],
        save_path=checked["save_path"],
        save_on_shutdown=checked["save_on_shutdown"],
        log_every_n_frames=checked["log_every_n_frames"],
        mapper_config=mapper_config,
    )
