"""Calibration data for the HAWQ tool: model input specs and batches of input arrays.

The Hessian analysis and the activation-range calibration both need a few hundred
representative inputs. ``load_calibration`` reads them from

- an ``.npz`` archive with one array per model input, named after the input, batch
  first (the general case: any number of inputs, any preprocessing done by you), or
- a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``) for a model with one
  image input, preprocessed as an ``ImagePreprocess`` describes, or
- an in-memory mapping of input name to array (same rules as the ``.npz``).

Dynamic input dimensions (a ``dim_param`` or an unset or non-positive ``dim_value``
in the ONNX model) take their size from the calibration data.
``CalibrationData.input_shapes`` reports the resolved shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import cv2
import numpy as np
import onnx

logger = logging.getLogger(__name__)

#: Image suffixes read from a calibration folder (compared in lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
#: Batch size used when the model does not fix its batch dimension.
DEFAULT_BATCH_SIZE = 8

Dim = int | str | None


class CalibrationError(ValueError):
    """Raised when calibration data does not match the model or cannot be read."""


class ChannelOrder(str, Enum):
    """Order of the colour channels the model expects."""

    RGB = "RGB"
    BGR = "BGR"


class Layout(str, Enum):
    """Axis order of the model's image input."""

    NCHW = "NCHW"
    NHWC = "NHWC"


@dataclass(frozen=True)
class InputSpec:
    """One model input as the ONNX graph declares it.

    Attributes:
        name: the graph input name.
        shape: one entry per axis: an int for a fixed size, the ``dim_param`` string
            for a named dynamic size, None for an unnamed dynamic size.
        dtype: numpy dtype of the input's elements.
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: np.dtype

    def is_fixed(self, axis: int) -> bool:
        """Return True when AXIS has a fixed size."""
        return isinstance(self.shape[axis], int)


@dataclass(frozen=True)
class ImagePreprocess:
    """Preprocessing that turns 8-bit images into the model's input tensor.

    Steps, in order: read as 8-bit colour (or grey for a one-channel input), resize to
    ``size_hw`` (bilinear), order channels, scale to [0, 1] when ``scale_to_unit``,
    subtract ``mean`` and divide by ``std`` per channel, lay out as ``layout``.

    Attributes:
        size_hw: output (height, width) in pixels; None keeps each image's size, which
            the model's fixed input size (if any) then must match, and which needs
            equal-sized images or ``batch_size=1``.
        mean: per-channel mean subtracted after scaling, in the model's channel order.
        std: per-channel divisor (> 0), in the model's channel order.
        channel_order: RGB or BGR.
        layout: NCHW or NHWC.
        scale_to_unit: divide the 8-bit values by 255 before normalising.
    """

    size_hw: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    channel_order: ChannelOrder = ChannelOrder.RGB
    layout: Layout = Layout.NCHW
    scale_to_unit: bool = True

    def __post_init__(self) -> None:
        if self.size_hw is not None and (
            len(self.size_hw) != 2 or any(int(v) != v or v <= 0 for v in self.size_hw)
        ):
            raise CalibrationError(
                f"size_hw must be two positive ints (height, width), got {self.size_hw}"
            )
        if len(self.mean) != len(self.std):
            raise CalibrationError(
                f"mean {self.mean} and std {self.std} must have one value per channel each"
            )
        if any(s <= 0 for s in self.std):
            raise CalibrationError(f"std values must be > 0, got {self.std}")
        object.__setattr__(self, "channel_order", ChannelOrder(self.channel_order))
        object.__setattr__(self, "layout", Layout(self.layout))


@dataclass
class CalibrationData:
    """Calibration batches ready to feed a model.

    Iterate over it (or index it) for batches ``{input_name: array}``, batch first.

    Attributes:
        batches: the batches, in file order.
        input_shapes: input name -> shape of one sample (batch axis excluded), with the
            dynamic dimensions resolved from the data.
        num_samples: total number of samples over all batches.
        source: where the data came from (a path, or ``"<arrays>"``).
        sample_names: image file names, in sample order (empty for arrays).
    """

    batches: list[dict[str, np.ndarray]]
    input_shapes: dict[str, tuple[int, ...]]
    num_samples: int
    source: str
    sample_names: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.batches[index]


def read_input_specs(model: onnx.ModelProto | str | Path) -> list[InputSpec]:
    """Return the specs of MODEL's graph inputs (initializers excluded), in graph order.

    Raises:
        FileNotFoundError: MODEL is a path that does not exist.
        CalibrationError: an input is not a tensor.
    """
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist; pass an .onnx file path")
        model = onnx.load(str(path), load_external_data=False)

    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise CalibrationError(f"model input {value.name!r} is not a tensor")
        tensor_type = value.type.tensor_type
        shape: list[Dim] = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(int(dim.dim_value))
            elif dim.HasField("dim_param") and dim.dim_param.isidentifier():
                shape.append(dim.dim_param)
            # Exporters write "?" or "-1" for "unknown": such a name ties no two axes together.
            else:
                shape.append(None)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, tuple(shape), dtype))
    return specs


def load_calibration(
    source: str | Path | Mapping[str, np.ndarray],
    input_specs: Sequence[InputSpec] | onnx.ModelProto,
    preprocess: ImagePreprocess | None = None,
    batch_size: int | None = None,
    max_samples: int | None = None,
) -> CalibrationData:
    """Load calibration inputs and cut them into batches.

    Args:
        source: an ``.npz`` file, a folder of images, or a mapping input name -> array
            (batch first).
        input_specs: the model's inputs (``read_input_specs``) or the ONNX model.
        preprocess: how images become the input tensor; required for an image folder,
            not allowed otherwise.
        batch_size: samples per batch; None takes the model's fixed batch size, or
            ``DEFAULT_BATCH_SIZE`` when the batch axis is dynamic. The last batch may be
            smaller, except when the model fixes the batch size (the rest is dropped).
        max_samples: use at most this many samples (the first ones, in file order).

    Raises:
        CalibrationError: the source is empty or unreadable, an argument is invalid, or
            names, shapes or dtypes do not match the model. The message names the
            input, the expected value and the found value.
        FileNotFoundError: SOURCE does not exist.
    """
    specs = read_input_specs(input_specs) if isinstance(input_specs, onnx.ModelProto) else list(
        input_specs
    )
    if not specs:
        raise CalibrationError("the model has no inputs to calibrate")
    batch_size = _resolve_batch_size(specs, batch_size)
    if max_samples is not None and max_samples < 1:
        raise CalibrationError(f"max_samples must be >= 1 or None, got {max_samples}")

    # Read the samples.
    if isinstance(source, Mapping):
        _reject_preprocess(preprocess, "an array mapping")
        arrays, names, label = dict(source), [], "<arrays>"
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"calibration source {path} does not exist")
        if path.is_dir():
            if preprocess is None:
                raise CalibrationError(
                    f"{path} is an image folder; pass preprocess=ImagePreprocess(...) to say "
                    "how images become the model input"
                )
            arrays, names = _read_image_folder(path, specs, preprocess, max_samples)
        elif path.suffix.lower() == ".npz":
            _reject_preprocess(preprocess, "an .npz file")
            arrays, names = _read_npz(path), []
        else:
            raise CalibrationError(
                f"calibration source {path} is neither an .npz file nor a folder of images"
            )
        label = str(path)

    # Check names, dtypes and shapes, then fix the dynamic dimensions.
    input_shapes = _check_arrays(arrays, specs, label)
    num_samples = next(iter(arrays.values())).shape[0]
    if max_samples is not None:
        num_samples = min(num_samples, max_samples)

    # Cut into batches.
    batches = []
    fixed_batch = specs[0].is_fixed(0) if specs[0].shape else False
    for start in range(0, num_samples, batch_size):
        stop = min(start + batch_size, num_samples)
        if fixed_batch and stop - start < batch_size:
            logger.warning(
                "dropping the last %d calibration sample(s): the model's batch size is fixed "
                "at %d",
                stop - start,
                batch_size,
            )
            num_samples = start
            break
        batches.append({name: np.ascontiguousarray(a[start:stop]) for name, a in arrays.items()})
    if not batches:
        raise CalibrationError(
            f"{label} contains {num_samples} sample(s), fewer than the model's fixed batch size "
            f"{batch_size}"
        )
    return CalibrationData(batches, input_shapes, num_samples, label, names[:num_samples])


def _resolve_batch_size(specs: Sequence[InputSpec], batch_size: int | None) -> int:
    """Return the batch size to use, checking it against a fixed batch axis."""
    fixed = {spec.shape[0] for spec in specs if spec.shape and spec.is_fixed(0)}
    if batch_size is not None and batch_size < 1:
        raise CalibrationError(f"batch_size must be >= 1, got {batch_size}")
    if fixed:
        model_batch = fixed.pop()
        if batch_size is not None and batch_size != model_batch:
            raise CalibrationError(
                f"the model fixes the batch size at {model_batch}; pass batch_size={model_batch}"
                f" (got {batch_size})"
            )
        return int(model_batch)
    return batch_size if batch_size is not None else DEFAULT_BATCH_SIZE


def _reject_preprocess(preprocess: ImagePreprocess | None, what: str) -> None:
    if preprocess is not None:
        raise CalibrationError(
            f"preprocess applies to image folders only; {what} must contain the model inputs "
            "already preprocessed"
        )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise CalibrationError(f"cannot read calibration archive {path}: {error}") from error


def _check_arrays(
    arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], label: str
) -> dict[str, tuple[int, ...]]:
    """Check ARRAYS against SPECS and return each input's resolved sample shape."""
    expected = [spec.name for spec in specs]
    missing = [name for name in expected if name not in arrays]
    extra = sorted(name for name in arrays if name not in expected)
    if missing or extra:
        raise CalibrationError(
            f"{label}: the model inputs are {expected}; missing {missing}, unexpected "
            f"{extra} (store one array per model input, named after it)"
        )

    resolved: dict[str, int] = {}
    counts = set()
    shapes = {}
    for spec in specs:
        array = np.asarray(arrays[spec.name])
        if array.dtype != spec.dtype:
            raise CalibrationError(
                f"{label}: input {spec.name!r} expects dtype {spec.dtype}, found {array.dtype}"
                f"; convert it with array.astype(np.{spec.dtype.name})"
            )
        if array.ndim != len(spec.shape):
            raise CalibrationError(
                f"{label}: input {spec.name!r} expects shape {_format_shape(spec.shape)} "
                f"(batch first), found {array.shape}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if axis == 0:
                continue
            if isinstance(want, int) and want != got:
                raise CalibrationError(
                    f"{label}: input {spec.name!r} expects shape {_format_shape(spec.shape)}, "
                    f"found {array.shape} (axis {axis} must be {want})"
                )
            if isinstance(want, str):
                if resolved.setdefault(want, got) != got:
                    raise CalibrationError(
                        f"{label}: dimension {want!r} is {resolved[want]} in one input and "
                        f"{got} in input {spec.name!r}; named dimensions must agree"
                    )
        if array.shape[0] == 0:
            raise CalibrationError(f"{label}: input {spec.name!r} contains no samples")
        counts.add(array.shape[0])
        shapes[spec.name] = tuple(int(d) for d in array.shape[1:])
    if len(counts) > 1:
        raise CalibrationError(
            f"{label}: inputs contain different sample counts "
            f"{ {spec.name: arrays[spec.name].shape[0] for spec in specs} }; they must agree"
        )
    return shapes


def _format_shape(shape: Sequence[Dim]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _read_image_folder(
    folder: Path,
    specs: Sequence[InputSpec],
    preprocess: ImagePreprocess,
    max_samples: int | None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read and preprocess the images of FOLDER into one array for the single input."""
    if len(specs) != 1:
        raise CalibrationError(
            f"an image folder feeds models with one input; this model has "
            f"{[s.name for s in specs]}: store the inputs in an .npz file instead"
        )
    spec = specs[0]
    if len(spec.shape) != 4:
        raise CalibrationError(
            f"input {spec.name!r} has shape {_format_shape(spec.shape)}; an image input needs "
            "4 axes (NCHW or NHWC)"
        )
    channel_axis, height_axis = (1, 2) if preprocess.layout is Layout.NCHW else (3, 1)
    channels = spec.shape[channel_axis]
    if channels not in (1, 3):
        raise CalibrationError(
            f"input {spec.name!r} has {channels} channels on axis {channel_axis} for layout "
            f"{preprocess.layout.value}; images give 1 or 3 (check the layout)"
        )
    if len(preprocess.mean) != channels:
        raise CalibrationError(
            f"preprocess mean/std have {len(preprocess.mean)} values; input {spec.name!r} "
            f"has {channels} channel(s)"
        )
    size_hw = _image_size(spec, preprocess, height_axis)

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(
            f"calibration folder {folder} contains no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    files = files[:max_samples] if max_samples is not None else files

    samples = [preprocess_image(_read_image(p, channels), preprocess, size_hw) for p in files]
    first = samples[0].shape
    for path, sample in zip(files, samples, strict=True):
        if sample.shape != first:
            raise CalibrationError(
                f"image {path} gives an input of shape {sample.shape}, {files[0]} gives {first}; "
                "set ImagePreprocess.size_hw so all images get one size"
            )
    return {spec.name: np.stack(samples).astype(spec.dtype, copy=False)}, [p.name for p in files]


def _image_size(
    spec: InputSpec, preprocess: ImagePreprocess, height_axis: int
) -> tuple[int, int] | None:
    """Return the (height, width) images are resized to, or None to keep their size."""
    model_hw = (spec.shape[height_axis], spec.shape[height_axis + 1])
    fixed = all(isinstance(d, int) for d in model_hw)
    if preprocess.size_hw is None:
        return model_hw if fixed else None
    if fixed and tuple(preprocess.size_hw) != model_hw:
        raise CalibrationError(
            f"input {spec.name!r} is fixed at (height, width) {model_hw}; "
            f"preprocess.size_hw is {tuple(preprocess.size_hw)}: set it to {model_hw}"
        )
    return (int(preprocess.size_hw[0]), int(preprocess.size_hw[1]))


def _read_image(path: Path, channels: int) -> np.ndarray:
    """Read PATH as uint8, (H, W, 3) in RGB order or (H, W) grey (ITU-R BT.601 weights)."""
    # Decoding in colour and converting here gives the same grey for every format,
    # because IMREAD_GRAYSCALE leaves the conversion to the codec library.
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise CalibrationError(
            f"cannot read image {path}: not a readable {path.suffix} file; remove or replace it"
        )
    code = cv2.COLOR_BGR2GRAY if channels == 1 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(image, code)


def preprocess_image(
    image: np.ndarray, preprocess: ImagePreprocess, size_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Turn one uint8 image into one model input sample (no batch axis), float32.

    Args:
        image: (H, W, 3) uint8 in RGB order, or (H, W) uint8 grey.
        preprocess: the preprocessing spec.
        size_hw: overrides ``preprocess.size_hw`` when given.

    Raises:
        CalibrationError: IMAGE is not uint8 (H, W) or (H, W, 3).
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
        image.ndim == 3 and image.shape[2] != 3
    ):
        raise CalibrationError(
            f"image must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}"
        )
    size_hw = size_hw if size_hw is not None else preprocess.size_hw

    if size_hw is not None and tuple(image.shape[:2]) != tuple(size_hw):
        image = cv2.resize(image, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_LINEAR)
    if image.ndim == 2:
        image = image[:, :, None]
    elif preprocess.channel_order is ChannelOrder.BGR:
        image = image[:, :, ::-1]

    values = image.astype(np.float32)
    if preprocess.scale_to_unit:
        values /= 255.0
    values = (values - np.asarray(preprocess.mean, np.float32)) / np.asarray(
        preprocess.std, np.float32
    )

    if preprocess.layout is Layout.NCHW:
        values = values.transpose(2, 0, 1)
    return np.ascontiguousarray(values, dtype=np.float32)

