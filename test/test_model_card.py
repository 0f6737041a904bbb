"""Tests of model card parsing, validation and matching against models."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from quantized_inference_node.model_card import (
    ChannelOrder,
    Layout,
    ModelCardError,
    OutputType,
    ResizePolicy,
    Task,
    TensorInfo,
    check_card_against_model,
    find_card_beside,
    input_size,
    load_model_card,
    model_card_from_dict,
    model_card_to_dict,
    resolve_path,
)

MODELS_DIR = Path(__file__).resolve().parents[1] / "quantized_inference_node" / "models"

SEGMENTATION_CARD: dict[str, Any] = {
    "name": "seg",
    "task": "segmentation",
    "input": {"name": "image", "width": 64, "height": 32, "channel_order": "BGR"},
    "output": {"name": "logits", "type": "logits", "class_names": ["road", "car", "person"]},
}
SEGMENTATION_INPUTS = [TensorInfo("image", (1, 3, 32, 64), "tensor(float)")]
SEGMENTATION_OUTPUTS = [TensorInfo("logits", (1, 3, 32, 64), "tensor(float)")]


def card_with(path: str, value: Any, base: dict[str, Any] = SEGMENTATION_CARD) -> dict[str, Any]:
    """Return a copy of BASE with the dotted key PATH set to VALUE."""
    data = copy.deepcopy(base)
    *parents, key = path.split(".")
    target = data
    for parent in parents:
        target = target[parent]
    target[key] = value
    return data


def test_card_defaults_and_types() -> None:
    card = model_card_from_dict(SEGMENTATION_CARD)

    assert card.task is Task.SEGMENTATION
    assert card.input.layout is Layout.NCHW
    assert card.input.channel_order is ChannelOrder.BGR
    assert card.input.resize is ResizePolicy.STRETCH
    assert card.input.scale == pytest.approx(1 / 255)
    assert card.input.mean == (0.0, 0.0, 0.0)
    assert card.input.std == (1.0, 1.0, 1.0)
    assert card.input.bit_depth == 8
    assert card.output.type is OutputType.LOGITS
    assert card.output.class_names == ("road", "car", "person")
    assert card.output.class_name(1) == "car"
    assert card.output.class_name(7) == "class_7"


def test_card_round_trip_through_yaml(tmp_path: Path) -> None:
    card = model_card_from_dict(SEGMENTATION_CARD)
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(model_card_to_dict(card)))

    assert load_model_card(path) == card


def test_gray_card_takes_one_channel_mean() -> None:
    data = card_with("input.channel_order", "GRAY")

    card = model_card_from_dict(data)

    assert card.input.channels == 1
    assert card.input.mean == (0.0,)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("extra", 1, r"unknown key\(s\) extra"),
        ("input.colour", "RGB", r"unknown key\(s\) input.colour; valid keys: input.bit_depth"),
        ("output.thresh", 0.3, r"unknown key\(s\) output.thresh"),
        ("task", "tracking", r"invalid task 'tracking': choose one of segmentation, depth"),
        ("input.layout", "CHW", r"invalid input.layout 'CHW': choose one of NCHW, NHWC"),
        ("input.channel_order", "rgb", r"invalid input.channel_order 'rgb'"),
        ("input.dtype", "float64", r"invalid input.dtype 'float64': choose one of float32"),
        ("input.bit_depth", 12, r"invalid input.bit_depth 12: choose one of 8, 16"),
        ("input.width", -1, r"invalid input.width -1: it must be >= 0"),
        ("input.width", 0, r"input.width 0 and input.height 32: set both"),
        ("input.width", "64", r"invalid input.width '64': expected an integer"),
        ("input.scale", 0, r"invalid input.scale 0: it must be > 0"),
        ("input.mean", [0.5, 0.5], r"invalid input.mean \[0.5, 0.5\]: expected a list of 3 numbers"),
        ("input.std", [1, 0, 1], r"invalid input.std\[1\] 0: it must be > 0"),
        ("input.mean", [0, float("nan"), 0], r"invalid input.mean\[1\] nan: expected a finite number"),
        ("input.resize", "crop", r"invalid input.resize 'crop': choose one of stretch, letterbox"),
        ("input.max_side", 16, r"invalid input.max_side 16: it must be >= 32"),
        ("output.type", "metric_depth", r"output.type metric_depth does not fit task segmentation"),
        ("output.top_k", 0, r"invalid output.top_k 0: it must be >= 1"),
        ("output.class_names", "road", r"invalid output.class_names 'road': expected a list"),
        ("name", "", r"invalid name '': expected a non-empty string"),
        ("input", ["image"], r"invalid input section \['image'\]: expected a mapping"),
    ],
)
def test_invalid_card_values(path: str, value: Any, message: str) -> None:
    with pytest.raises(ModelCardError, match=message):
        model_card_from_dict(card_with(path, value))


def test_missing_card_keys() -> None:
    data = copy.deepcopy(SEGMENTATION_CARD)
    del data["output"]
    with pytest.raises(ModelCardError, match="missing key 'output'"):
        model_card_from_dict(data)

    data = copy.deepcopy(SEGMENTATION_CARD)
    del data["input"]["name"]
    with pytest.raises(ModelCardError, match=r"missing key 'input.name'"):
        model_card_from_dict(data)

    with pytest.raises(ModelCardError, match="invalid card section None"):
        model_card_from_dict(None)


def test_probability_threshold_range() -> None:
    data = card_with("output.type", "probability")
    data["output"]["threshold"] = 1.5
    with pytest.raises(ModelCardError, match=r"invalid output.threshold 1.5: a probability threshold"):
        model_card_from_dict(data)


def test_multiple_of_32_rejects_fixed_size() -> None:
    data = card_with("input.resize", "multiple_of_32")
    with pytest.raises(ModelCardError, match="not used by resize multiple_of_32"):
        model_card_from_dict(data)


def test_uint8_input_rejects_normalization() -> None:
    data = card_with("input.dtype", "uint8")
    with pytest.raises(ModelCardError, match=r"input.dtype uint8 feeds raw pixels"):
        model_card_from_dict(data)

    data["input"].update(scale=1.0)
    assert model_card_from_dict(data).input.dtype == "uint8"


def test_load_card_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model card .*absent.yaml not found"):
        load_model_card(tmp_path / "absent.yaml")

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ModelCardError, match=r"broken.yaml is not valid YAML"):
        load_model_card(broken)

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump(card_with("input.colour", "RGB")))
    with pytest.raises(ModelCardError, match=r"unknown.yaml: unknown key\(s\) input.colour"):
        load_model_card(unknown)


def test_card_matches_model() -> None:
    card = model_card_from_dict(SEGMENTATION_CARD)

    check_card_against_model(card, SEGMENTATION_INPUTS, SEGMENTATION_OUTPUTS)

    assert input_size(card.input, SEGMENTATION_INPUTS[0]) == (64, 32)


def test_input_size_from_model() -> None:
    data = copy.deepcopy(SEGMENTATION_CARD)
    del data["input"]["width"], data["input"]["height"]
    card = model_card_from_dict(data)

    check_card_against_model(card, SEGMENTATION_INPUTS, SEGMENTATION_OUTPUTS)

    assert input_size(card.input, SEGMENTATION_INPUTS[0]) == (64, 32)


@pytest.mark.parametrize(
    ("card", "inputs", "outputs", "message"),
    [
        (SEGMENTATION_CARD, [TensorInfo("x", (1, 3, 32, 64), "tensor(float)")], SEGMENTATION_OUTPUTS,
         r"input.name 'image' is not among the model's inputs: 'x'"),
        (SEGMENTATION_CARD, SEGMENTATION_INPUTS, [TensorInfo("out", (1, 3, 32, 64), "tensor(float)")],
         r"output.name 'logits' is not among the model's outputs: 'out'"),
        (SEGMENTATION_CARD, [TensorInfo("image", (1, 3, 32), "tensor(float)")], SEGMENTATION_OUTPUTS,
         r"has rank 3 .* needs rank 4"),
        (SEGMENTATION_CARD, [TensorInfo("image", (1, 32, 64, 3), "tensor(float)")], SEGMENTATION_OUTPUTS,
         r"input.channel_order BGR gives 3 channel\(s\).*set input.layout: NHWC"),
        (card_with("input.channel_order", "GRAY"), SEGMENTATION_INPUTS, SEGMENTATION_OUTPUTS,
         r"input.channel_order GRAY gives 1 channel\(s\), but the model input 'image' has 3"),
        (SEGMENTATION_CARD, [TensorInfo("image", (1, 3, 32, 64), "tensor(uint8)")], SEGMENTATION_OUTPUTS,
         r"input.dtype float32 does not match the model input 'image' of type tensor\(uint8\)"),
        (SEGMENTATION_CARD, [TensorInfo("image", (1, 3, 48, 64), "tensor(float)")], SEGMENTATION_OUTPUTS,
         r"input.width x input.height 64x32 does not match the model input 'image' of 64x48"),
        (SEGMENTATION_CARD, SEGMENTATION_INPUTS, [TensorInfo("logits", (1, 4, 32, 64), "tensor(float)")],
         r"output.class_names lists 3 names, but output 'logits' has 4 classes"),
        (SEGMENTATION_CARD, SEGMENTATION_INPUTS, [TensorInfo("logits", (1, 1, 32, 64), "tensor(float)")],
         r"output.type logits needs one channel per class"),
        (card_with("output.type", "probability"), SEGMENTATION_INPUTS, SEGMENTATION_OUTPUTS,
         r"output.type probability reads a one-channel map, but output 'logits' has 3 channels"),
        (SEGMENTATION_CARD, SEGMENTATION_INPUTS, [TensorInfo("logits", (1, 3), "tensor(float)")],
         r"task segmentation needs \(N, C, H, W\) or \(N, H, W\)"),
        (card_with("input.resize", "multiple_of_32", {**SEGMENTATION_CARD, "input": {"name": "image"}}),
         SEGMENTATION_INPUTS, SEGMENTATION_OUTPUTS,
         r"resize multiple_of_32 needs dynamic height and width, but the model input 'image' is fixed"),
        ({**SEGMENTATION_CARD, "input": {"name": "image"}},
         [TensorInfo("image", (None, 3, "h", "w"), "tensor(float)")], SEGMENTATION_OUTPUTS,
         r"dynamic height and width .* input.width and input.height must be set for resize stretch"),
    ],
)
def test_card_model_mismatch(card: dict, inputs: list, outputs: list, message: str) -> None:
    with pytest.raises(ModelCardError, match=message):
        check_card_against_model(model_card_from_dict(card), inputs, outputs)


@pytest.mark.parametrize(
    ("task", "output_type", "shape", "message"),
    [
        ("classification", "logits", (1, 3, 4), r"task classification needs \(N, classes\)"),
        ("classification", "logits", (1, 4), r"output.class_names lists 3 names, but output 'out' has 4"),
        ("depth", "metric_depth", (1, 2, 8, 8), r"task depth needs \(N, 1, H, W\) or \(N, H, W\)"),
        ("detection", "boxes_xyxy_score_class", (1, 10, 5), r"needs \(1, N, 6\) or \(N, 6\)"),
    ],
)
def test_output_shape_per_task(task: str, output_type: str, shape: tuple, message: str) -> None:
    card = model_card_from_dict(
        {
            "name": "m",
            "task": task,
            "input": {"name": "image", "width": 64, "height": 32},
            "output": {"name": "out", "type": output_type, "class_names": ["a", "b", "c"]},
        }
    )
    with pytest.raises(ModelCardError, match=message):
        check_card_against_model(card, SEGMENTATION_INPUTS, [TensorInfo("out", shape, "tensor(float)")])


def test_find_card_beside(tmp_path: Path) -> None:
    model = tmp_path / "net.onnx"
    with pytest.raises(FileNotFoundError, match=r"no model card found for .*net.onnx: tried .*net.yaml"):
        find_card_beside(model)

    (tmp_path / "net.onnx.yaml").write_text("")
    assert find_card_beside(model) == tmp_path / "net.onnx.yaml"

    (tmp_path / "net.yaml").write_text("")
    assert find_card_beside(model) == tmp_path / "net.yaml"


def test_resolve_package_path() -> None:
    path = resolve_path("pkg:quantized_inference_node/models/ppocr_det_v4.yaml")

    assert path == MODELS_DIR / "ppocr_det_v4.yaml"
    assert path.is_file()
    with pytest.raises(FileNotFoundError, match=r"package 'no_such_package' of path .* is not installed"):
        resolve_path("pkg:no_such_package/model.onnx")


@pytest.mark.parametrize("card_file", sorted(MODELS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_cards_are_valid(card_file: Path) -> None:
    card = load_model_card(card_file)

    assert card.name == card_file.stem
