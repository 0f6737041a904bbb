"""Decode the pixels of a sensor_msgs/Image into numpy arrays, without ROS.

One home for the image decoding of the whole package: the mapping node
(:mod:`surfel_mapping_node.ros_conversions`), the bag reader
(:mod:`surfel_mapping_node.datasets.rosbag`) and the inference node
(:mod:`quantized_inference_node.node`) all use it. It reads any object with the fields
``height``, ``width``, ``encoding``, ``step``, ``is_bigendian`` and ``data``, so rclpy
messages and the messages rosbags deserializes work alike, and so does a
``types.SimpleNamespace`` in a test.

:func:`decode_pixels` returns native-endian pixels in the message's channel order,
whatever the row padding in ``step`` and the byte order of the data.
:func:`to_rgb_or_gray` turns them into what the mapper takes: gray stays (H, W), color
becomes (H, W, 3) RGB with BGR reordered and alpha dropped.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, NamedTuple

import numpy as np


class ImageEncodingError(ValueError):
    """A sensor_msgs/Image that cannot be decoded: encoding, size, step or data length."""


class PixelFormat(NamedTuple):
    """The pixel layout of one sensor_msgs/Image encoding."""

    dtype: np.dtype
    channels: int
    # "GRAY", "RGB", "BGR", "RGBA" or "BGRA": the order of the channels in the data.
    channel_order: str

    @property
    def bytes_per_pixel(self) -> int:
        return self.channels * self.dtype.itemsize


# Encoding name -> pixel format. REP 118: 16UC1 and mono16 depth are millimetres by
# default, 32FC1 depth is metres. 8UC3 names no channel order, so it is read as BGR,
# the order of OpenCV images, where 8UC3 images usually come from.
IMAGE_ENCODINGS: dict[str, PixelFormat] = {
    "mono8": PixelFormat(np.dtype(np.uint8), 1, "GRAY"),
    "8UC1": PixelFormat(np.dtype(np.uint8), 1, "GRAY"),
    "rgb8": PixelFormat(np.dtype(np.uint8), 3, "RGB"),
    "bgr8": PixelFormat(np.dtype(np.uint8), 3, "BGR"),
    "8UC3": PixelFormat(np.dtype(np.uint8), 3, "BGR"),
    "rgba8": PixelFormat(np.dtype(np.uint8), 4, "RGBA"),
    "bgra8": PixelFormat(np.dtype(np.uint8), 4, "BGRA"),
    "mono16": PixelFormat(np.dtype(np.uint16), 1, "GRAY"),
    "16UC1": PixelFormat(np.dtype(np.uint16), 1, "GRAY"),
    "32FC1": PixelFormat(np.dtype(np.float32), 1, "GRAY"),
}
# Encodings of 8-bit gray or color images, which to_rgb_or_gray turns into mapper input.
COLOR_ENCODINGS = ("mono8", "8UC1", "rgb8", "bgr8", "8UC3", "rgba8", "bgra8")
# Depth images: 16-bit millimetres or float metres.
DEPTH_ENCODINGS = ("16UC1", "mono16", "32FC1")


def pixel_format(encoding: str, allowed_encodings: Collection[str] | None = None) -> PixelFormat:
    """Return the pixel format of ENCODING.

    Args:
        encoding: a sensor_msgs/Image encoding name, e.g. "bgr8".
        allowed_encodings: the encodings the caller accepts; default all of IMAGE_ENCODINGS.

    Raises:
        ImageEncodingError: ENCODING is not in IMAGE_ENCODINGS or not allowed.
    """
    allowed = tuple(IMAGE_ENCODINGS) if allowed_encodings is None else tuple(allowed_encodings)
    if encoding not in allowed or encoding not in IMAGE_ENCODINGS:
        raise ImageEncodingError(
            f"unsupported image encoding {encoding!r}: use one of {', '.join(allowed)} "
            "(convert or republish the image in one of them)"
        )
    return IMAGE_ENCODINGS[encoding]


def decode_pixels(message: Any, allowed_encodings: Collection[str] | None = None) -> np.ndarray:
    """Return the pixels of a sensor_msgs/Image as a native-endian array it owns.

    One-channel encodings give (H, W), the others (H, W, C) in the message's channel
    order (``IMAGE_ENCODINGS[encoding].channel_order``). Row padding (``step`` larger
    than width × pixel size) is skipped, big-endian data is byte-swapped, and bytes
    beyond height × step are ignored. The result is C-contiguous, writable and shares
    no memory with the message.

    Args:
        message: an object with ``height``, ``width``, ``encoding``, ``step``,
            ``is_bigendian`` and ``data`` (bytes, array.array or a uint8 numpy array),
            such as an rclpy or rosbags sensor_msgs/Image.
        allowed_encodings: the encodings the caller accepts; default all of IMAGE_ENCODINGS.

    Raises:
        ImageEncodingError: an unsupported or disallowed encoding, a zero width or
            height, a step shorter than a row, or data shorter than height × step.
    """
    encoding = str(message.encoding)
    pixel = pixel_format(encoding, allowed_encodings)
    height, width, step = int(message.height), int(message.width), int(message.step)
    if height <= 0 or width <= 0:
        raise ImageEncodingError(
            f"empty {encoding} image {width}x{height}: width and height must be > 0. "
            "Check the publisher of the image"
        )
    row_bytes = width * pixel.bytes_per_pixel
    if step < row_bytes:
        raise ImageEncodingError(
            f"invalid step {step} of a {width}x{height} {encoding} image: a row needs at least "
            f"{row_bytes} bytes (width × {pixel.bytes_per_pixel} bytes per pixel). Set step >= {row_bytes}"
        )
    data = _as_bytes(message.data)
    if data.size < height * step:
        raise ImageEncodingError(
            f"{encoding} image {width}x{height} with step {step} has {data.size} bytes of data: "
            f"expected {height * step} (height × step). The message is truncated, or its "
            "height or step is wrong"
        )

    # A view with another item size needs only the last axis contiguous, so the padded
    # rows are read in place and the one copy below swaps the bytes where needed.
    rows = data[: height * step].reshape(height, step)[:, :row_bytes]
    wire_dtype = pixel.dtype.newbyteorder(">" if message.is_bigendian else "<")
    pixels = np.array(rows.view(wire_dtype), dtype=pixel.dtype, order="C")
    shape = (height, width) if pixel.channels == 1 else (height, width, pixel.channels)
    return pixels.reshape(shape)


def to_rgb_or_gray(pixels: np.ndarray, encoding: str) -> np.ndarray:
    """Return decoded pixels as gray (H, W) or RGB (H, W, 3), the mapper's image layout.

    Gray images come back unchanged; BGR and BGRA are reordered to RGB and alpha is
    dropped. Bit depth is kept.

    Args:
        pixels: the output of decode_pixels for a message of ENCODING.
        encoding: the encoding of the message the pixels come from.

    Raises:
        ImageEncodingError: ENCODING is unknown, or PIXELS do not have its channel count.
    """
    pixel = pixel_format(encoding)
    expected_tail = () if pixel.channels == 1 else (pixel.channels,)
    if pixels.ndim != 2 + len(expected_tail) or pixels.shape[2:] != expected_tail:
        raise ImageEncodingError(
            f"pixels of shape {pixels.shape} do not fit encoding {encoding!r} with {pixel.channels} "
            "channel(s): pass the array decode_pixels returned for that message"
        )

    if pixel.channels == 1:
        return pixels
    if pixel.channel_order.startswith("BGR"):
        return np.ascontiguousarray(pixels[:, :, 2::-1])
    if pixel.channels == 3:
        return pixels
    return np.ascontiguousarray(pixels[:, :, :3])


def _as_bytes(data: Any) -> np.ndarray:
    """Return the data field of a message as a flat uint8 array (a view when possible)."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        view = memoryview(data)
    except TypeError:
        # A plain sequence of byte values, e.g. a list.
        return np.asarray(data, dtype=np.uint8).reshape(-1)
    return np.frombuffer(view.cast("B") if view.c_contiguous else view.tobytes(), dtype=np.uint8)
