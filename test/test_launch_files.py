"""Static checks of the launch files, their parameter files and the RViz config.

Each launch file is parsed as XML, without launching. Every node of this package must
be a console_scripts entry point, and every other package it starts a declared
dependency. Every parameter, inline or from a YAML file, must be one the node declares,
with a value of the declared type (the mapping node's values are also range-checked).
Every remapped topic must be one the node subscribes to. Model paths must name files
that the package installs.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

rclpy = pytest.importorskip("rclpy", reason="the node modules need rclpy to import")

from rclpy.parameter import Parameter  # noqa: E402

from quantized_inference_node.model_card import load_model_card, resolve_path  # noqa: E402
from quantized_inference_node.node import QuantizedInferenceNode  # noqa: E402
from surfel_mapping_node import node_parameters as mapping_parameters  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "surfel_perception"
LAUNCH_FILES = sorted((REPO_ROOT / "launch").glob("*.launch.xml"))
PARAMETER_FILES = sorted((REPO_ROOT / "config").glob("*.yaml"))
MAPPING_LAUNCH_FILES = [
    "kitti_replay.launch.xml",
    "mono_depth_mapping.launch.xml",
    "rgbd_drone.launch.xml",
    "stereo_ground_robot.launch.xml",
]
# Launch files with an optional perception node beside the mapper.
PERCEPTION_LAUNCH_FILES = ["rgbd_drone.launch.xml", "stereo_ground_robot.launch.xml"]
MAPPING_EXEC = "surfel_mapping_node"
INFERENCE_EXEC = "quantized_inference_node"
INFERENCE_TOPICS = {"image", "camera_info"}
# Declared by every rclpy node.
ROS_BUILTIN_PARAMETERS = {"use_sim_time", "start_type_description_service"}
SUBSTITUTION = re.compile(r"\$\((var|find-pkg-share) ([^)\s]+)\)")
PACKAGE_PREFIX = "pkg:"


def console_scripts() -> dict[str, str]:
    """Return the console_scripts entry points declared in setup.py (name -> target)."""
    entries = _setup_keyword("entry_points")["console_scripts"]
    return dict((part.strip() for part in entry.split("=", 1)) for entry in entries)


def _setup_keyword(name: str) -> Any:
    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "setup":
            for keyword in call.keywords:
                if keyword.arg == name:
                    return ast.literal_eval(keyword.value)
    raise AssertionError(f"setup.py has no setup({name}=...) literal")


def exec_dependencies() -> set[str]:
    root = ET.parse(REPO_ROOT / "package.xml").getroot()
    return {d.text.strip() for tag in ("exec_depend", "depend") for d in root.iter(tag)}


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


def package_nodes(root: ET.Element, executable: str | None = None) -> list[ET.Element]:
    return [
        n
        for n in root.iter("node")
        if n.get("pkg") == PACKAGE and (executable is None or n.get("exec") == executable)
    ]


def node_parameters(node: ET.Element, args: dict[str, str], launch_name: str) -> dict[str, Any]:
    """Return the node's parameter values: its sections of the parameter files, then inline values."""
    node_name = node.get("name")
    values: dict[str, Any] = {}
    for param in node.iter("param"):
        if param.get("from"):
            path = Path(resolve(param.get("from"), args))
            assert path.is_file(), f"{launch_name}: parameter file {path} does not exist"
            document = yaml.safe_load(path.read_text())
            assert node_name in document, (
                f"{path.name}: no section for node {node_name!r} (sections: {list(document)})"
            )
            values.update(flatten(document[node_name]["ros__parameters"]))
        else:
            values[param.get("name")] = yaml.safe_load(resolve(param.get("value"), args))
    return values


def launch_root(launch_name: str) -> ET.Element:
    return ET.parse(REPO_ROOT / "launch" / launch_name).getroot()


@pytest.fixture(scope="module")
def inference_node_parameters() -> dict[str, Parameter.Type]:
    """The parameters a real QuantizedInferenceNode declares, with their types."""
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=0)
    try:
        # Without model_path the node starts with no model, so nothing is loaded here.
        node = QuantizedInferenceNode(context=context, start_parameter_services=False)
        declared = {name: p.type_ for name, p in node.get_parameters_by_prefix("").items()}
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    return declared


def test_every_expected_launch_file_exists():
    assert [p.name for p in LAUNCH_FILES if p.name in MAPPING_LAUNCH_FILES] == MAPPING_LAUNCH_FILES


@pytest.mark.parametrize("parameter_file", PARAMETER_FILES, ids=lambda p: p.name)
def test_parameter_file_loads_with_one_section_per_node(parameter_file: Path):
    document = yaml.safe_load(parameter_file.read_text())

    assert isinstance(document, dict) and document, f"{parameter_file.name}: not a mapping of node names"
    for node_name, section in document.items():
        assert list(section) == ["ros__parameters"], (
            f"{parameter_file.name}: section {node_name!r} must hold only ros__parameters"
        )
        assert isinstance(section["ros__parameters"], dict)


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


@pytest.mark.parametrize("launch_file", LAUNCH_FILES, ids=lambda p: p.name)
def test_other_packages_are_dependencies(launch_file: Path):
    root = ET.parse(launch_file).getroot()
    dependencies = exec_dependencies()

    for node in root.iter("node"):
        if node.get("pkg") != PACKAGE:
            assert node.get("pkg") in dependencies, (
                f"{launch_file.name}: starts {node.get('pkg')}/{node.get('exec')} but package.xml "
                f"has no <exec_depend>{node.get('pkg')}</exec_depend>"
            )


@pytest.mark.parametrize("launch_name", MAPPING_LAUNCH_FILES)
def test_mapping_node_parameters_are_declared_and_valid(launch_name: str):
    root = launch_root(launch_name)
    args = arg_defaults(root)
    specs = mapping_parameters.all_parameter_specs()
    (node,) = package_nodes(root, MAPPING_EXEC)

    values = node_parameters(node, args, launch_name)

    undeclared = sorted(set(values) - set(specs))
    assert not undeclared, f"{launch_name}: parameters the node does not declare: {undeclared}"
    settings = mapping_parameters.settings_from_parameters(values)

    # Every remapped name is a topic the node subscribes to in its input mode.
    subscribed = set(mapping_parameters.INPUT_TOPICS[settings.input_mode]) | set(
        mapping_parameters.STATE_TOPICS
    )
    remapped = {remap.get("from") for remap in node.iter("remap")}
    assert remapped <= subscribed, f"{launch_name}: remaps of unknown topics {sorted(remapped - subscribed)}"
    assert remapped == subscribed, (
        f"{launch_name}: topics without a launch argument {sorted(subscribed - remapped)}"
    )


def inference_launch_nodes() -> list[tuple[str, str]]:
    return [
        (path.name, node.get("name"))
        for path in LAUNCH_FILES
        for node in package_nodes(ET.parse(path).getroot(), INFERENCE_EXEC)
    ]


@pytest.mark.parametrize(("launch_name", "node_name"), inference_launch_nodes())
def test_inference_node_parameters_are_declared_with_their_types(
    launch_name: str, node_name: str, inference_node_parameters: dict[str, Parameter.Type]
):
    root = launch_root(launch_name)
    args = arg_defaults(root)
    (node,) = [n for n in package_nodes(root, INFERENCE_EXEC) if n.get("name") == node_name]

    values = node_parameters(node, args, launch_name)

    undeclared = sorted(set(values) - set(inference_node_parameters) - ROS_BUILTIN_PARAMETERS)
    assert not undeclared, f"{launch_name}: {node_name} does not declare {undeclared}"
    for name, value in values.items():
        assert Parameter.Type.from_parameter_value(value) == inference_node_parameters[name], (
            f"{launch_name}: {node_name} parameter {name}={value!r} is not of the declared type "
            f"{inference_node_parameters[name].name}"
        )
    remapped = {remap.get("from") for remap in node.iter("remap")}
    assert remapped <= INFERENCE_TOPICS, (
        f"{launch_name}: remaps of unknown topics {remapped - INFERENCE_TOPICS}"
    )


@pytest.mark.parametrize(("launch_name", "node_name"), inference_launch_nodes())
def test_inference_model_and_card_exist_and_match(launch_name: str, node_name: str):
    root = launch_root(launch_name)
    args = arg_defaults(root)
    (node,) = [n for n in package_nodes(root, INFERENCE_EXEC) if n.get("name") == node_name]
    values = node_parameters(node, args, launch_name)
    if values["model_path"].startswith(f"{PACKAGE_PREFIX}rapidocr_onnxruntime/"):
        pytest.importorskip("rapidocr_onnxruntime", reason="the PP-OCR models come with rapidocr-onnxruntime")

    model = resolve_path(values["model_path"])
    card = load_model_card(values["card_path"])

    assert model.is_file(), f"{launch_name}: {node_name} model {values['model_path']} -> {model} is missing"
    assert card.name


@pytest.mark.parametrize(("launch_name", "node_name"), inference_launch_nodes())
def test_packaged_model_files_are_installed(launch_name: str, node_name: str):
    """Files of this package named as pkg:quantized_inference_node/... must match package_data."""
    root = launch_root(launch_name)
    args = arg_defaults(root)
    (node,) = [n for n in package_nodes(root, INFERENCE_EXEC) if n.get("name") == node_name]
    values = node_parameters(node, args, launch_name)
    patterns = _setup_keyword("package_data")[INFERENCE_EXEC]

    for name in ("model_path", "card_path"):
        package, _, inner = values[name].removeprefix(PACKAGE_PREFIX).partition("/")
        if not values[name].startswith(PACKAGE_PREFIX) or package != INFERENCE_EXEC:
            continue
        assert any(fnmatch.fnmatchcase(inner, p) and inner.count("/") == p.count("/") for p in patterns), (
            f"{launch_name}: {name} {values[name]} is not installed: setup.py package_data "
            f"{patterns} does not match {inner}"
        )


def test_mono_launch_wires_network_depth():
    root = launch_root("mono_depth_mapping.launch.xml")
    args = arg_defaults(root)
    (network,) = package_nodes(root, INFERENCE_EXEC)
    (mapper,) = package_nodes(root, MAPPING_EXEC)
    network_remaps = {r.get("from"): resolve(r.get("to"), args) for r in network.iter("remap")}
    mapper_remaps = {r.get("from"): resolve(r.get("to"), args) for r in mapper.iter("remap")}
    card = load_model_card(resolve(args["card_path"], args))

    assert node_parameters(mapper, args, "mono")["input_mode"] == "depth_only"
    assert mapper_remaps["depth"] == f"/{network.get('name')}/depth"
    assert mapper_remaps["camera_info"] == f"/{network.get('name')}/camera_info"
    # The mapper downscales the same camera image the network sees to the depth's size.
    assert mapper_remaps["image"] == network_remaps["image"]
    assert card.task.value == "depth"
    assert "depth_7scenes/model_hawq" in args["model_path"]


@pytest.mark.parametrize("launch_name", PERCEPTION_LAUNCH_FILES)
def test_perception_node_off_by_default(launch_name: str):
    root = launch_root(launch_name)
    args = arg_defaults(root)
    (node,) = package_nodes(root, INFERENCE_EXEC)

    assert args["perception"] == "false"
    assert node.get("if") == "$(var perception)"
    assert {p.get("name") for p in node.iter("param") if p.get("name")} == {"model_path", "card_path"}


@pytest.mark.parametrize("launch_name", MAPPING_LAUNCH_FILES)
def test_rviz_argument_off_by_default(launch_name: str):
    root = launch_root(launch_name)
    args = arg_defaults(root)
    (rviz_node,) = [n for n in root.iter("node") if n.get("pkg") == "rviz2"]

    assert args["rviz"] == "false"
    assert rviz_node.get("if") == "$(var rviz)"
    config = resolve(rviz_node.get("args"), args).split()[1]
    assert Path(config) == REPO_ROOT / "rviz" / "surfel_map.rviz"


def test_kitti_replay_defaults_are_the_converted_bag_topics():
    topics = pytest.importorskip("surfel_mapping_node.topics")
    args = arg_defaults(launch_root("kitti_replay.launch.xml"))

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
    """Every YAML file is read by a launch file, and each of its sections by a node of that name."""
    sections_used: dict[str, set[str]] = {}
    for path in LAUNCH_FILES:
        root = ET.parse(path).getroot()
        args = arg_defaults(root)
        for node in package_nodes(root):
            for param in node.iter("param"):
                if param.get("from"):
                    file_name = Path(resolve(param.get("from"), args)).name
                    sections_used.setdefault(file_name, set()).add(node.get("name"))

    assert set(sections_used) == {p.name for p in PARAMETER_FILES}
    for path in PARAMETER_FILES:
        sections = set(yaml.safe_load(path.read_text()))
        assert sections == sections_used[path.name], (
            f"{path.name}: sections {sorted(sections)} but launch files read it for "
            f"{sorted(sections_used[path.name])}"
        )


def test_rviz_config_shows_the_node_outputs():
    config = yaml.safe_load((REPO_ROOT / "rviz" / "surfel_map.rviz").read_text())
    displays = {d["Name"]: d for d in config["Visualization Manager"]["Displays"]}

    assert displays["Surfel map"]["Class"] == "rviz_default_plugins/PointCloud2"
    assert displays["Surfel map"]["Color Transformer"] == "RGB8"
    assert displays["Surfel map"]["Topic"]["Value"] == "/surfel_mapping_node/map"
    assert displays["Keyframe path"]["Topic"]["Value"] == "/surfel_mapping_node/keyframe_path"
    assert displays["Surfel mesh"]["Topic"]["Value"] == "/surfel_mapping_node/map_mesh"


def test_settings_check_rejects_what_the_node_would_reject():
    with pytest.raises(
        mapping_parameters.NodeParameterError, match=r"unknown parameter 'fusion\.max_wieght'"
    ):
        mapping_parameters.settings_from_parameters({"fusion.max_wieght": 3.0})
    with pytest.raises(
        mapping_parameters.NodeParameterError, match=r"invalid parameter sync_tolerance=1: use a double"
    ):
        mapping_parameters.settings_from_parameters({"sync_tolerance": 1})
    with pytest.raises(
        mapping_parameters.NodeParameterError, match=r"invalid fusion\.max_weight=0\.0: it must be > 0"
    ):
        mapping_parameters.settings_from_parameters({"fusion.max_weight": 0.0})
    with pytest.raises(
        mapping_parameters.NodeParameterError, match=r"invalid parameter T_body_camera=.*invalid quaternion"
    ):
        mapping_parameters.settings_from_parameters({"T_body_camera": [0.0] * 7})


def test_inference_parameter_type_check_catches_a_wrong_type(inference_node_parameters):
    # The check above compares rclpy's type of a YAML value with the declared type.
    assert Parameter.Type.from_parameter_value(5) != inference_node_parameters["max_rate"]
    assert Parameter.Type.from_parameter_value(5.0) == inference_node_parameters["max_rate"]
    assert Parameter.Type.from_parameter_value(["cpu"]) == inference_node_parameters["providers"]


@pytest.mark.parametrize("launch_file", LAUNCH_FILES, ids=lambda p: p.name)
def test_fastdds_profile_is_set(launch_file: Path):
    """Each launch file points Fast DDS at the package's profile (installed: see test_colcon_build)."""
    root = ET.parse(launch_file).getroot()
    args = arg_defaults(root)
    profiles = [
        resolve(env.get("value"), args)
        for env in root.iter("set_env")
        if env.get("name") == "FASTRTPS_DEFAULT_PROFILES_FILE"
    ]
    assert profiles == [str(REPO_ROOT / "config" / "fastdds_large_frames.xml")], (
        f"{launch_file.name} must set FASTRTPS_DEFAULT_PROFILES_FILE once, to the package's profile"
    )


def test_fastdds_accepts_the_profile():
    """Fast DDS parses the profile and creates a participant with it (errors go to stderr)."""
    profile = REPO_ROOT / "config" / "fastdds_large_frames.xml"
    environment = {
        **os.environ,
        "FASTRTPS_DEFAULT_PROFILES_FILE": str(profile),
        "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "ROS_DOMAIN_ID": str(1 + os.getpid() % 100),
    }
    script = "import rclpy; rclpy.init(); rclpy.create_node('profile_check').destroy_node(); rclpy.shutdown()"
    completed = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    assert "XMLPARSER" not in completed.stderr, completed.stderr
