"""Static checks of the launch files, their parameter files and the RViz config.

Each launch file is parsed as XML, without ROS. Every node of this package must be a
console_scripts entry point. Every parameter, inline or from a YAML file, must be one
the node declares, with an allowed value. Every remapped topic must be one the node
subscribes to in its input mode.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("rclpy", reason="the node module needs rclpy to import")

from surfel_mapping_node import node as node_module

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "surfel_perception"
LAUNCH_FILES = sorted((REPO_ROOT / "launch").glob("*.launch.xml"))
MAPPING_LAUNCH_FILES = ["kitti_replay.launch.xml", "rgbd_drone.launch.xml", "stereo_ground_robot.launch.xml"]
SUBSTITUTION = re.compile(r"\$\((var|find-pkg-share) ([^)\s]+)\)")


def console_scripts() -> dict[str, str]:
    """Return the console_scripts entry points declared in setup.py (name -> target)."""
    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "setup":
            for keyword in call.keywords:
                if keyword.arg == "entry_points":
                    entries = ast.literal_eval(keyword.value)["console_scripts"]
                    return dict((part.strip() for part in entry.split("=", 1)) for entry in entries)
    raise AssertionError("setup.py has no setup(entry_points=...) call")


def arg_defaults(root: ET.Element) -> dict[str, str]:
    return {arg.get("name"): arg.get("default", "") for arg in root.iter("arg")}


def resolve(text: str, args: dict[str, str]) -> str:
    """Resolve $(var NAME) from argument defaults and $(find-pkg-share this) to the repo."""
    for _ in range(5):

        def substitute(match: re.Match) -> str:
            kind, name = match.groups()
            if kind == "var":
                assert name in args, f"$(var {name}) names no declared <arg>"
                return args[name]
            assert name == PACKAGE, f"$(find-pkg-share {name}) is not this package"
            return str(REPO_ROOT)

        text = SUBSTITUTION.sub(substitute, text)
    return text


def flatten(parameters: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested ros__parameters the way ROS does: {a: {b: 1}} -> {'a.b': 1}."""
    flat = {}
    for key, value in parameters.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def mapping_nodes(root: ET.Element) -> list[ET.Element]:
    return [
        n for n in root.iter("node") if n.get("pkg") == PACKAGE and n.get("exec") == "surfel_mapping_node"
    ]


def test_every_expected_launch_file_exists():
    assert [p.name for p in LAUNCH_FILES if p.name in MAPPING_LAUNCH_FILES] == MAPPING_LAUNCH_FILES


@pytest.mark.parametrize("launch_file", LAUNCH_FILES, ids=lambda p: p.name)
def test_nodes_of_this_package_are_console_scripts(launch_file: Path):
    root = ET.parse(launch_file).getroot()
    scripts = console_scripts()

    assert root.tag == "launch"
    for node in root.iter("node"):
        if node.get("pkg") == PACKAGE:
            assert node.get("exec") in scripts, (
                f"{launch_file.name}: exec {node.get('exec')!r} is not a console_scripts entry point"
            )


@pytest.mark.parametrize("launch_name", MAPPING_LAUNCH_FILES)
def test_mapping_node_parameters_are_declared_and_valid(launch_name: str):
    root = ET.parse(REPO_ROOT / "launch" / launch_name).getroot()
    args = arg_defaults(root)
    specs = node_module.all_parameter_specs()
    (node,) = mapping_nodes(root)
    node_name = node.get("name")

    # Parameter files first, then inline values (the launch order of precedence).
    values: dict[str, Any] = {}
    for param in node.iter("param"):
        if param.get("from"):
            path = Path(resolve(param.get("from"), args))
            assert path.is_file(), f"{launch_name}: parameter file {path} does not exist"
            document = yaml.safe_load(path.read_text())
            assert list(document) == [node_name], (
                f"{path.name}: top-level key must be the node name {node_name!r}, got {list(document)}"
            )
            values.update(flatten(document[node_name]["ros__parameters"]))
        else:
            name = param.get("name")
            assert name in specs, f"{launch_name}: inline parameter {name!r} is not declared by the node"
            values[name] = yaml.safe_load(resolve(param.get("value"), args))

    undeclared = sorted(set(values) - set(specs))
    assert not undeclared, f"{launch_name}: parameters the node does not declare: {undeclared}"
    settings = node_module.settings_from_parameters(values)

    # Every remapped name is a topic the node subscribes to in its input mode.
    subscribed = set(node_module.INPUT_TOPICS[settings.input_mode]) | set(node_module.STATE_TOPICS)
    remapped = {remap.get("from") for remap in node.iter("remap")}
    assert remapped <= subscribed, f"{launch_name}: remaps of unknown topics {sorted(remapped - subscribed)}"
    assert remapped == subscribed, (
        f"{launch_name}: topics without a launch argument {sorted(subscribed - remapped)}"
    )


@pytest.mark.parametrize("launch_name", MAPPING_LAUNCH_FILES)
def test_rviz_argument_off_by_default(launch_name: str):
    root = ET.parse(REPO_ROOT / "launch" / launch_name).getroot()
    args = arg_defaults(root)
    (rviz_node,) = [n for n in root.iter("node") if n.get("pkg") == "rviz2"]

    assert args["rviz"] == "false"
    assert rviz_node.get("if") == "$(var rviz)"
    config = resolve(rviz_node.get("args"), args).split()[1]
    assert Path(config) == REPO_ROOT / "rviz" / "surfel_map.rviz"


def test_kitti_replay_defaults_are_the_converted_bag_topics():
    topics = pytest.importorskip("surfel_mapping_node.topics")
    args = arg_defaults(ET.parse(REPO_ROOT / "launch" / "kitti_replay.launch.xml").getroot())

    assert (args["left_image"], args["right_image"], args["left_camera_info"], args["right_camera_info"]) == (
        topics.LEFT_IMAGE_TOPIC,
        topics.RIGHT_IMAGE_TOPIC,
        topics.LEFT_CAMERA_INFO_TOPIC,
        topics.RIGHT_CAMERA_INFO_TOPIC,
    )
    assert (args["pose"], args["keyframes"], args["map_frame"]) == (
        topics.POSE_TOPIC,
        topics.KEYFRAMES_TOPIC,
        topics.MAP_FRAME,
    )


def test_parameter_files_all_used():
    used = set()
    for launch_name in MAPPING_LAUNCH_FILES:
        root = ET.parse(REPO_ROOT / "launch" / launch_name).getroot()
        args = arg_defaults(root)
        for param in root.iter("param"):
            if param.get("from"):
                used.add(Path(resolve(param.get("from"), args)).name)

    assert used == {"rgbd_drone.yaml", "stereo_ground_robot.yaml", "kitti_replay.yaml"}


def test_rviz_config_shows_the_node_outputs():
    config = yaml.safe_load((REPO_ROOT / "rviz" / "surfel_map.rviz").read_text())
    displays = {d["Name"]: d for d in config["Visualization Manager"]["Displays"]}

    assert displays["Surfel map"]["Class"] == "rviz_default_plugins/PointCloud2"
    assert displays["Surfel map"]["Color Transformer"] == "RGB8"
    assert displays["Surfel map"]["Topic"]["Value"] == "/surfel_mapping_node/map"
    assert displays["Keyframe path"]["Topic"]["Value"] == "/surfel_mapping_node/keyframe_path"
    assert displays["Surfel mesh"]["Topic"]["Value"] == "/surfel_mapping_node/map_mesh"


def test_settings_check_rejects_what_the_node_would_reject():
    with pytest.raises(node_module.NodeParameterError, match=r"unknown parameter 'fusion\.max_wieght'"):
        node_module.settings_from_parameters({"fusion.max_wieght": 3.0})
    with pytest.raises(
        node_module.NodeParameterError, match=r"invalid parameter sync_tolerance=1: use a double"
    ):
        node_module.settings_from_parameters({"sync_tolerance": 1})
    with pytest.raises(
        node_module.NodeParameterError, match=r"invalid fusion\.max_weight=0\.0: it must be > 0"
    ):
        node_module.settings_from_parameters({"fusion.max_weight": 0.0})
    with pytest.raises(
        node_module.NodeParameterError, match=r"invalid parameter T_body_camera=.*invalid quaternion"
    ):
        node_module.settings_from_parameters({"T_body_camera": [0.0] * 7})
