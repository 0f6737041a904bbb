"""Preprocessing per model card: channel order, resize policy, normalization and layout.

:func:`prepare_input` turns one image (a numpy array) into a model's input tensor and
reports where the image lies inside the tensor (:class:`ResizeGeometry`), which the
postprocessing needs to map outputs back to image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from quantized_inference_node.model_card import ChannelOrder, InputSpec, Layout, ResizePolicy


class ImageError(ValueError):
    """An image the engine cannot process: empty, or of an unsupported dtype, bit depth or channel count."""


@dataclass(frozen=True)
class ResizeGeometry:
    """Placement of the input image inside the input tensor.

    The image is scaled by ``scale_x``, ``scale_y`` (tensor pixels per image pixel)
    into the top-left ``content_width`` × ``content_height`` of the tensor. Only
    letterbox leaves a rest, which is padding.
    """

    image_width: int
    image_height: int
    tensor_width: int
    tensor_height: int
    content_width: int
    content_height: int

    @property
    def scale_x(self) -> float:
        return self.content_width / self.image_width

    @property
    def scale_y(self) -> float:
        return self.content_height / self.image_height


@dataclass(frozen=True)
class PreparedInput:
    """Input tensor of one image, with the image's placement inside it."""

    tensor: np.ndarray
    geometry: ResizeGeometry


def image_channel_order(image: np.ndarray, color_order: ChannelOrder) -> ChannelOrder:
    """Return the channel order of IMAGE: GRAY for (H, W) or (H, W, 1), else COLOR_ORDER."""
    if image.ndim == 2 or image.shape[2] == 1:
        return ChannelOrder.GRAY
    return color_order


def convert_channels(image: np.ndarray, source: ChannelOrder, target: ChannelOrder) -> np.ndarray:
    """Convert IMAGE from SOURCE to TARGET channel order; (H, W) for GRAY, else (H, W, 3)."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if source is target:
        return image
    codes = {
        (ChannelOrder.GRAY, ChannelOrder.RGB): cv2.COLOR_GRAY2RGB,
        (ChannelOrder.GRAY, ChannelOrder.BGR): cv2.COLOR_GRAY2BGR,
        (ChannelOrder.RGB, ChannelOrder.GRAY): cv2.COLOR_RGB2GRAY,
        (ChannelOrder.BGR, ChannelOrder.GRAY): cv2.COLOR_BGR2GRAY,
        (ChannelOrder.RGB, ChannelOrder.BGR): cv2.COLOR_RGB2BGR,
        (ChannelOrder.BGR, ChannelOrder.RGB): cv2.COLOR_BGR2RGB,
    }
    return cv2.cvtColor(image, codes[(source, target)])


def resize_geometry(
    spec: InputSpec, image_width: int, image_height: int, fixed_size: tuple[int, int]
) -> ResizeGeometry:
    """Return the tensor size and image placement for an image of the given size.

    Args:
        spec: The card's input section.
        image_width, image_height: Input image size in pixels.
        fixed_size: (width, height) of the input tensor for stretch and letterbox.
    """
    if spec.resize is ResizePolicy.MULTIPLE_OF_32:
        ratio = min(1.0, spec.max_side / max(image_width, image_height))
        width = max(32, round(image_width * ratio / 32) * 32)
        height = max(32, round(image_height * ratio / 32) * 32)
        return ResizeGeometry(image_width, image_height, width, height, width, height)

    width, height = fixed_size
    if spec.resize is ResizePolicy.STRETCH:
        return ResizeGeometry(image_width, image_height, width, height, width, height)

    scale = min(width / image_width, height / image_height)
    content_width = min(width, max(1, round(image_width * scale)))
    content_height = min(height, max(1, round(image_height * scale)))
    return ResizeGeometry(image_width, image_height, width, height, content_width, content_height)


def prepare_input(
    image: np.ndarray, color_order: ChannelOrder, spec: InputSpec, fixed_size: tuple[int, int]
) -> PreparedInput:
    """Turn one image into the model's input tensor, per the card's input section.

    Args:
        image: (H, W), (H, W, 1) or (H, W, 3) uint8 or uint16 pixels.
        color_order: Channel order of a three-channel IMAGE (RGB or BGR).
        spec: The card's input section.
        fixed_size: (width, height) of the input tensor for stretch and letterbox.

    Raises:
        ImageError: an empty image, an unsupported dtype or channel count, or a bit
            depth other than the card's input.bit_depth.
    """
    _check_image(image, spec)

    source_order = image_channel_order(image, color_order)
    pixels = convert_channels(image, source_order, spec.channel_order)

    height, width = pixels.shape[:2]
    geometry = resize_geometry(spec, width, height, fixed_size)
    resized = cv2.resize(
        pixels, (geometry.content_width, geometry.content_height), interpolation=cv2.INTER_LINEAR
    )
    if resized.ndim == 2:
        resized = resized[:, :, np.newaxis]
    # Float before padding, so a pad value such as 127.5 is kept exactly.
    work_dtype = np.uint8 if spec.dtype == "uint8" else np.float32
    resized = resized.astype(work_dtype)
    if (geometry.content_width, geometry.content_height) != (geometry.tensor_width, geometry.tensor_height):
        canvas = np.full(
            (geometry.tensor_height, geometry.tensor_width, spec.channels), spec.pad_value, work_dtype
        )
        canvas[: geometry.content_height, : geometry.content_width] = resized
        resized = canvas

    if spec.dtype == "uint8":
        tensor = resized
    else:
        mean = np.asarray(spec.mean, dtype=np.float32)
        std = np.asarray(spec.std, dtype=np.float32)
        tensor = ((resized * np.float32(spec.scale) - mean) / std).astype(spec.dtype)

    if spec.layout is Layout.NCHW:
        tensor = tensor.transpose(2, 0, 1)
    return PreparedInput(np.ascontiguousarray(tensor[np.newaxis]), geometry)


def _check_image(image: np.ndarray, spec: InputSpec) -> None:
    if not isinstance(image, np.ndarray) or image.size == 0:
        shape = getattr(image, "shape", None)
        raise ImageError(f"empty image (shape {shape}): send an image with pixels")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise ImageError(
            f"unsupported image shape {image.shape}: expected (H, W), (H, W, 1) or (H, W, 3)"
        )
    bit_depth = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(image.dtype)
    if bit_depth is None:
        raise ImageError(f"unsupported image dtype {image.dtype}: expected uint8 or uint16")
    if bit_depth != spec.bit_depth:
        raise ImageError(
            f"{bit_depth}-bit image but the model card's input.bit_depth is {spec.bit_depth}: "
            f"send {spec.bit_depth}-bit images or use a card for {bit_depth}-bit input"
        )
