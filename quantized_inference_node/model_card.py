"""Model cards: the YAML file that describes an ONNX model's input preprocessing and output meaning.

A card sits beside its model (``model.yaml`` or ``model.onnx.yaml`` next to
``model.onnx``) or anywhere a path names it. The ROS node and the offline tools read
the same card. Example, for the PP-OCR text detector::

    name: ppocr_det_v4
    task: segmentation
    input:
      name: x
      layout: NCHW
      channel_order: BGR
      dtype: float32
      scale: 0.00392156862745098   # 1/255: 8-bit values to [0, 1]
      mean: [0.5, 0.5, 0.5]
      std: [0.5, 0.5, 0.5]
      resize: multiple_of_32
      max_side: 960
    output:
      name: sigmoid_0.tmp_0
      type: probability
      threshold: 0.3
      class_names: [background, text]

Unknown keys and invalid values raise ModelCardError naming the key.
:func:`check_card_against_model` compares a card with the model's declared inputs and
outputs, so a card written for another model is rejected before the first image.

Model and card paths may be files or ``pkg:<python package>/<path inside it>``, which
finds files shipped inside an installed package (the PP-OCR models of the
rapidocr-onnxruntime wheel: ``pkg:rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx``).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

PACKAGE_PREFIX = "pkg:"


class ModelCardError(ValueError):
    """An unknown key or an invalid value in a model card, or a card that does not fit its model."""


class Task(str, Enum):
    """Task of the model, which selects the postprocessing and the node's outputs."""

    SEGMENTATION = "segmentation"
    DEPTH = "depth"
    CLASSIFICATION = "classification"
    DETECTION = "detection"


class Layout(str, Enum):
    """Memory layout of the input tensor."""

    NCHW = "NCHW"
    NHWC = "NHWC"


class ChannelOrder(str, Enum):
    """Channel order the model expects, to which images are converted."""

    RGB = "RGB"
    BGR = "BGR"
    GRAY = "GRAY"


class ResizePolicy(str, Enum):
    """Resize policy that turns an image of any size into the input tensor.

    - ``stretch``: resize to ``width`` × ``height``, aspect ratio not kept.
    - ``letterbox``: scale to fit inside ``width`` × ``height`` keeping the aspect
      ratio, pad the right and bottom with ``pad_value``.
    - ``multiple_of_32``: for models with dynamic height and width (PP-OCR det): scale
      down so the longer side is at most ``max_side``, then round each side to the
      nearest multiple of 32 (at least 32).
    """

    STRETCH = "stretch"
    LETTERBOX = "letterbox"
    MULTIPLE_OF_32 = "multiple_of_32"


class OutputType(str, Enum):
    """Meaning of the output tensor's values."""

    # Unnormalized class scores; segmentation takes the argmax over the channel axis,
    # classification a softmax.
    LOGITS = "logits"
    # Probabilities: one channel thresholded (segmentation) or per-class scores.
    PROBABILITY = "probability"
    # Depth along the optical axis: metres = scale · value.
    METRIC_DEPTH = "metric_depth"
    # Inverse depth: metres = scale / value (values <= 0 become NaN).
    INVERSE_DEPTH = "inverse_depth"
    # Boxes as rows [x1, y1, x2, y2, score, class_id] in input-tensor pixels, shape
    # (1, N, 6) or (N, 6), as end-to-end detector exports with NMS inside produce.
    BOXES_XYXY_SCORE_CLASS = "boxes_xyxy_score_class"


TASK_OUTPUT_TYPES: dict[Task, tuple[OutputType, ...]] = {
    Task.SEGMENTATION: (OutputType.LOGITS, OutputType.PROBABILITY),
    Task.DEPTH: (OutputType.METRIC_DEPTH, OutputType.INVERSE_DEPTH),
    Task.CLASSIFICATION: (OutputType.LOGITS, OutputType.PROBABILITY),
    Task.DETECTION: (OutputType.BOXES_XYXY_SCORE_CLASS,),
}

# ONNX tensor element types that the preprocessing can produce.
DTYPES = ("float32", "float16", "uint8")
ORT_TYPE_BY_DTYPE = {"float32": "tensor(float)", "float16": "tensor(float16)", "uint8": "tensor(uint8)"}


@dataclass(frozen=True)
class InputSpec:
    """Preprocessing that turns an image into the model's input tensor."""

    # Name of the model input.
    name: str
    # Input size in pixels for stretch and letterbox; 0 for multiple_of_32 or to take
    # the size from the model when its height and width are fixed.
    width: int = 0
    height: int = 0
    layout: Layout = Layout.NCHW
    channel_order: ChannelOrder = ChannelOrder.RGB
    dtype: str = "float32"
    # Bits per channel of the images the model accepts: 8 (mono8, rgb8, bgr8) or 16
    # (mono16, 16UC1). Images of the other depth are rejected.
    bit_depth: int = 8
    # tensor = (pixel · scale − mean) / std, per channel in channel_order.
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    resize: ResizePolicy = ResizePolicy.STRETCH
    # Upper bound of the longer side for multiple_of_32, in pixels.
    max_side: int = 960
    # Padding value for letterbox, in raw pixel units (before scale, mean, std).
    pad_value: float = 0.0

    @property
    def channels(self) -> int:
        """Number of channels of the input tensor."""
        return 1 if self.channel_order is ChannelOrder.GRAY else 3


@dataclass(frozen=True)
class OutputSpec:
    """Interpretation of the model's output tensor."""

    # Name of the model output.
    name: str
    type: OutputType
    # Class names, indexed by class id; empty means "class_<id>".
    class_names: tuple[str, ...] = ()
    # Probability threshold of a one-channel probability map (segmentation), or the
    # minimum score of a reported box (detection).
    threshold: float = 0.5
    # Number of classes reported by classification.
    top_k: int = 5
    # Metres per output unit (metric_depth) or metres·unit (inverse_depth).
    scale: float = 1.0

    def class_name(self, class_id: int) -> str:
        """Return the name of CLASS_ID, or ``class_<id>`` when the card lists none for it."""
        if 0 <= class_id < len(self.class_names):
            return self.class_names[class_id]
        return f"class_{class_id}"


@dataclass(frozen=True)
class ModelCard:
    """Everything the engine needs to know about a model besides its weights."""

    # Short model name for logs and diagnostics.
    name: str
    task: Task
    input: InputSpec
    output: OutputSpec
    # Free text: source, licence, training data.
    description: str = ""


def resolve_path(path: str | Path) -> Path:
    """Return the file a model or card path names; ``pkg:<package>/<path>`` looks inside a package.

    Raises:
        FileNotFoundError: the package is not installed.
    """
    text = str(path)
    if not text.startswith(PACKAGE_PREFIX):
        return Path(text).expanduser()

    package, _, inner = text[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} of path {text!r} is not installed: pip install it, "
            f"or give the file's path instead"
        )
    return Path(next(iter(spec.submodule_search_locations))) / inner


def find_card_beside(model_path: str | Path) -> Path:
    """Return the card beside a model: ``<stem>.yaml`` or ``<name>.yaml`` next to it.

    Raises:
        FileNotFoundError: neither file exists.
    """
    model = resolve_path(model_path)
    candidates = [model.with_suffix(".yaml"), model.with_name(model.name + ".yaml")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no model card found for {model}: tried {', '.join(str(c) for c in candidates)}; "
        f"write one there or give the card's path"
    )


def load_model_card(path: str | Path) -> ModelCard:
    """Read and validate a model card from a YAML file.

    Raises:
        FileNotFoundError: the file does not exist.
        ModelCardError: the YAML is invalid, a key is unknown or a value is invalid.
    """
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise FileNotFoundError(f"model card {resolved} not found: check the card path")
    try:
        data = yaml.safe_load(resolved.read_text())
    except yaml.YAMLError as error:
        raise ModelCardError(f"model card {resolved} is not valid YAML: {error}") from error
    try:
        return model_card_from_dict(data)
    except ModelCardError as error:
        raise ModelCardError(f"model card {resolved}: {error}") from error


def model_card_from_dict(data: Any) -> ModelCard:
    """Build and validate a ModelCard from parsed YAML.

    Raises:
        ModelCardError: a key is unknown or missing, or a value is invalid.
    """
    card_data = _require_mapping(data, "card")
    _reject_unknown_keys(card_data, ModelCard, "card")
    for key in ("name", "task", "input", "output"):
        if key not in card_data:
            raise ModelCardError(f"missing key {key!r}: every card sets name, task, input and output")

    task = _enum_value(Task, card_data["task"], "task")
    input_spec = _input_spec_from_dict(_require_mapping(card_data["input"], "input"))
    output_spec = _output_spec_from_dict(_require_mapping(card_data["output"], "output"), task)
    card = ModelCard(
        name=_string(card_data["name"], "name"),
        task=task,
        input=input_spec,
        output=output_spec,
        description=_string(card_data.get("description", ""), "description", allow_empty=True),
    )
    return card


def model_card_to_dict(card: ModelCard) -> dict[str, Any]:
    """Return the card as plain YAML-ready data (the inverse of model_card_from_dict)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {
        "name": card.name,
        "task": card.task.value,
        "description": card.description,
        "input": {f.name: plain(getattr(card.input, f.name)) for f in fields(InputSpec)},
        "output": {f.name: plain(getattr(card.output, f.name)) for f in fields(OutputSpec)},
    }


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and ONNX Runtime type string of a model input or output.

    Dimensions are ints when fixed and None (or a symbolic name) when dynamic, as
    ``onnxruntime.NodeArg.shape`` reports them.
    """

    name: str
    shape: tuple[int | str | None, ...]
    type: str


def check_card_against_model(
    card: ModelCard, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo]
) -> None:
    """Check that a card fits the model's declared inputs and outputs.

    Args:
        card: The validated card.
        inputs: The model's inputs (``session.get_inputs()`` converted to TensorInfo).
        outputs: The model's outputs.

    Raises:
        ModelCardError: names the card field that does not match and the model's value.
    """
    model_input = _find_tensor(inputs, card.input.name, "input.name", "inputs")
    model_output = _find_tensor(outputs, card.output.name, "output.name", "outputs")
    _check_input(card.input, model_input)
    _check_output(card, model_output)


def input_size(spec: InputSpec, model_input: TensorInfo) -> tuple[int, int]:
    """Return the fixed (width, height) of the input tensor; (0, 0) when it is dynamic.

    The card's size wins; a model with fixed spatial dimensions gives its own.
    """
    if spec.width > 0:
        return spec.width, spec.height
    height_axis, width_axis = (2, 3) if spec.layout is Layout.NCHW else (1, 2)
    height = model_input.shape[height_axis]
    width = model_input.shape[width_axis]
    if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
        return width, height
    return 0, 0


def _check_input(spec: InputSpec, model_input: TensorInfo) -> None:
    shape = model_input.shape
    if len(shape) != 4:
        raise ModelCardError(
            f"input {spec.name!r} of the model has rank {len(shape)} (shape {list(shape)}), "
            f"but the card's input.layout {spec.layout.value} needs rank 4"
        )

    channel_axis = 1 if spec.layout is Layout.NCHW else 3
    model_channels = shape[channel_axis]
    if isinstance(model_channels, int) and model_channels > 0 and model_channels != spec.channels:
        other_axis = 3 if spec.layout is Layout.NCHW else 1
        hint = ""
        if shape[other_axis] == spec.channels:
            other = "NHWC" if spec.layout is Layout.NCHW else "NCHW"
            hint = f"; the model looks {other}, so set input.layout: {other}"
        raise ModelCardError(
            f"input.channel_order {spec.channel_order.value} gives {spec.channels} channel(s), "
            f"but the model input {spec.name!r} has {model_channels} on axis {channel_axis} "
            f"(shape {list(shape)}){hint}"
        )

    expected_type = ORT_TYPE_BY_DTYPE[spec.dtype]
    if model_input.type != expected_type:
        raise ModelCardError(
            f"input.dtype {spec.dtype} does not match the model input {spec.name!r} of type "
            f"{model_input.type}"
        )

    height_axis, width_axis = (2, 3) if spec.layout is Layout.NCHW else (1, 2)
    model_height, model_width = shape[height_axis], shape[width_axis]
    fixed = all(isinstance(d, int) and d > 0 for d in (model_height, model_width))
    if spec.resize is ResizePolicy.MULTIPLE_OF_32:
        if fixed:
            raise ModelCardError(
                f"input.resize multiple_of_32 needs dynamic height and width, but the model "
                f"input {spec.name!r} is fixed at {model_width}x{model_height}: use "
                f"resize: stretch or letterbox"
            )
        return
    if fixed and spec.width > 0 and (spec.width, spec.height) != (model_width, model_height):
        raise ModelCardError(
            f"input.width x input.height {spec.width}x{spec.height} does not match the model "
            f"input {spec.name!r} of {model_width}x{model_height}: fix the card, or set both to 0 "
            f"to take the model's size"
        )
    if not fixed and spec.width == 0:
        raise ModelCardError(
            f"the model input {spec.name!r} has dynamic height and width (shape {list(shape)}), "
            f"so input.width and input.height must be set for resize {spec.resize.value}"
        )


def _check_output(card: ModelCard, model_output: TensorInfo) -> None:
    spec = card.output
    shape = model_output.shape
    rank = len(shape)
    classes = shape[1] if rank >= 2 else None
    known_classes = classes if isinstance(classes, int) and classes > 0 else None

    if card.task is Task.SEGMENTATION:
        if rank not in (3, 4):
            raise ModelCardError(
                f"output {spec.name!r} has rank {rank} (shape {list(shape)}), but task "
                f"segmentation needs (N, C, H, W) or (N, H, W)"
            )
        channels = known_classes if rank == 4 else 1
        if spec.type is OutputType.PROBABILITY and channels not in (None, 1):
            raise ModelCardError(
                f"output.type probability reads a one-channel map, but output {spec.name!r} has "
                f"{channels} channels: use output.type logits"
            )
        if spec.type is OutputType.LOGITS and (rank == 3 or channels == 1):
            raise ModelCardError(
                f"output.type logits needs one channel per class, but output {spec.name!r} has "
                f"shape {list(shape)}: use output.type probability with a threshold"
            )
        expected_names = 2 if spec.type is OutputType.PROBABILITY else channels
        _check_class_names(spec, expected_names)
    elif card.task is Task.CLASSIFICATION:
        if rank != 2:
            raise ModelCardError(
                f"output {spec.name!r} has rank {rank} (shape {list(shape)}), but task "
                f"classification needs (N, classes)"
            )
        _check_class_names(spec, known_classes)
    elif card.task is Task.DEPTH:
        if rank not in (3, 4) or (rank == 4 and known_classes not in (None, 1)):
            raise ModelCardError(
                f"output {spec.name!r} has shape {list(shape)}, but task depth needs "
                f"(N, 1, H, W) or (N, H, W)"
            )
    elif card.task is Task.DETECTION:
        last = shape[-1] if rank else None
        if rank not in (2, 3) or (isinstance(last, int) and last not in (6, -1)):
            raise ModelCardError(
                f"output {spec.name!r} has shape {list(shape)}, but output.type "
                f"boxes_xyxy_score_class needs (1, N, 6) or (N, 6)"
            )


def _check_class_names(spec: OutputSpec, classes: int | None) -> None:
    if classes is not None and spec.class_names and len(spec.class_names) != classes:
        raise ModelCardError(
            f"output.class_names lists {len(spec.class_names)} names, but output {spec.name!r} "
            f"has {classes} classes: list one name per class, or none"
        )


def _find_tensor(
    tensors: Sequence[TensorInfo], name: str, field_name: str, what: str
) -> TensorInfo:
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    names = ", ".join(repr(t.name) for t in tensors)
    raise ModelCardError(f"{field_name} {name!r} is not among the model's {what}: {names}")


def _input_spec_from_dict(data: Mapping[str, Any]) -> InputSpec:
    _reject_unknown_keys(data, InputSpec, "input")
    if "name" not in data:
        raise ModelCardError("missing key 'input.name': give the model input's name")

    channel_order = _enum_value(ChannelOrder, data.get("channel_order", "RGB"), "input.channel_order")
    channels = 1 if channel_order is ChannelOrder.GRAY else 3
    default_mean = (0.0,) * channels
    default_std = (1.0,) * channels
    spec = InputSpec(
        name=_string(data["name"], "input.name"),
        width=_int(data.get("width", 0), "input.width", minimum=0),
        height=_int(data.get("height", 0), "input.height", minimum=0),
        layout=_enum_value(Layout, data.get("layout", "NCHW"), "input.layout"),
        channel_order=channel_order,
        dtype=_choice(data.get("dtype", "float32"), DTYPES, "input.dtype"),
        bit_depth=_int(data.get("bit_depth", 8), "input.bit_depth", choices=(8, 16)),
        scale=_float(data.get("scale", 1.0 / 255.0), "input.scale", positive=True),
        mean=_floats(data.get("mean", default_mean), "input.mean", channels),
        std=_floats(data.get("std", default_std), "input.std", channels, positive=True),
        resize=_enum_value(ResizePolicy, data.get("resize", "stretch"), "input.resize"),
        max_side=_int(data.get("max_side", 960), "input.max_side", minimum=32),
        pad_value=_float(data.get("pad_value", 0.0), "input.pad_value"),
    )

    if (spec.width == 0) != (spec.height == 0):
        raise ModelCardError(
            f"input.width {spec.width} and input.height {spec.height}: set both, or both to 0"
        )
    if spec.resize is ResizePolicy.MULTIPLE_OF_32 and spec.width > 0:
        raise ModelCardError(
            "input.width and input.height are not used by resize multiple_of_32: remove them "
            "and bound the size with input.max_side"
        )
    if spec.dtype == "uint8" and (spec.scale != 1.0 or any(spec.mean) or any(s != 1.0 for s in spec.std)):
        raise ModelCardError(
            "input.dtype uint8 feeds raw pixels, so input.scale must be 1 and input.mean 0 and "
            "input.std 1 (the model normalizes inside)"
        )
    return spec


def _output_spec_from_dict(data: Mapping[str, Any], task: Task) -> OutputSpec:
    _reject_unknown_keys(data, OutputSpec, "output")
    for key in ("name", "type"):
        if key not in data:
            raise ModelCardError(f"missing key 'output.{key}'")

    output_type = _enum_value(OutputType, data["type"], "output.type")
    allowed = TASK_OUTPUT_TYPES[task]
    if output_type not in allowed:
        choices = ", ".join(t.value for t in allowed)
        raise ModelCardError(
            f"output.type {output_type.value} does not fit task {task.value}: use one of {choices}"
        )

    names = data.get("class_names", ())
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (str, int)) for n in names):
        raise ModelCardError(f"invalid output.class_names {names!r}: expected a list of names")
    spec = OutputSpec(
        name=_string(data["name"], "output.name"),
        type=output_type,
        class_names=tuple(str(n) for n in names),
        threshold=_float(data.get("threshold", 0.5), "output.threshold"),
        top_k=_int(data.get("top_k", 5), "output.top_k", minimum=1),
        scale=_float(data.get("scale", 1.0), "output.scale", positive=True),
    )
    if output_type is OutputType.PROBABILITY and not 0.0 < spec.threshold < 1.0:
        raise ModelCardError(
            f"invalid output.threshold {spec.threshold}: a probability threshold is in (0, 1)"
        )
    return spec


def _reject_unknown_keys(data: Mapping[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        prefix = "" if where == "card" else f"{where}."
        raise ModelCardError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; valid keys: "
            f"{', '.join(prefix + k for k in sorted(known))}"
        )


def _require_mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ModelCardError(f"invalid {where} section {value!r}: expected a mapping of keys")
    return value


def _enum_value(enum_cls: type[Enum], value: Any, key: str) -> Any:
    for member in enum_cls:
        if value == member.value:
            return member
    choices = ", ".join(m.value for m in enum_cls)
    raise ModelCardError(f"invalid {key} {value!r}: choose one of {choices}")


def _choice(value: Any, choices: Sequence[str], key: str) -> str:
    if value not in choices:
        raise ModelCardError(f"invalid {key} {value!r}: choose one of {', '.join(choices)}")
    return str(value)


def _string(value: Any, key: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ModelCardError(f"invalid {key} {value!r}: expected a non-empty string")
    return value


def _int(
    value: Any, key: str, minimum: int | None = None, choices: Sequence[int] | None = None
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelCardError(f"invalid {key} {value!r}: expected an integer")
    if minimum is not None and value < minimum:
        raise ModelCardError(f"invalid {key} {value}: it must be >= {minimum}")
    if choices is not None and value not in choices:
        raise ModelCardError(f"invalid {key} {value}: choose one of {', '.join(map(str, choices))}")
    return value


def _float(value: Any, key: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelCardError(f"invalid {key} {value!r}: expected a finite number")
    if positive and value <= 0:
        raise ModelCardError(f"invalid {key} {value}: it must be > 0")
    return float(value)


def _floats(value: Any, key: str, count: int, positive: bool = False) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ModelCardError(
            f"invalid {key} {value!r}: expected a list of {count} numbers, one per channel"
        )
    return tuple(_float(v, f"{key}[{i}]", positive) for i, v in enumerate(value))
