"""Tests of the ROS-free sensor_msgs/Image decoding, against hand-laid byte buffers."""

from __future__ import annotations

import array
import struct
import types

import numpy as np
import pytest

from surfel_mapping_node.image_encoding import (
    COLOR_ENCODINGS,
    DEPTH_ENCODINGS,
    IMAGE_ENCODINGS,
    ImageEncodingError,
    decode_pixels,
    pixel_format,
    to_rgb_or_gray,
)


def make_message(
    encoding: str, width: int, height: int, step: int, data: object, big_endian: bool = False
) -> types.SimpleNamespace:
    # The fields both rclpy and rosbags sensor_msgs/Image messages have.
    return types.SimpleNamespace(
        encoding=encoding, width=width, height=height, step=step, is_bigendian=int(big_endian), data=data
    )


# --- the table -----------------------------------------------------------------------


def test_table_is_union_of_all_readers():
    expected = {"mono8", "8UC1", "rgb8", "bgr8", "8UC3", "rgba8", "bgra8", "mono16", "16UC1", "32FC1"}

    assert set(IMAGE_ENCODINGS) == expected
    assert set(COLOR_ENCODINGS) | set(DEPTH_ENCODINGS) == expected
    assert pixel_format("bgra8").bytes_per_pixel == 4
    assert pixel_format("32FC1").bytes_per_pixel == 4
    assert pixel_format("8UC3").channel_order == "BGR"
    for encoding, pixel in IMAGE_ENCODINGS.items():
        expected_channels = 1 if pixel.channel_order == "GRAY" else len(pixel.channel_order)
        assert pixel.channels == expected_channels, encoding


# --- decoding ------------------------------------------------------------------------


def test_mono8_row_padding_is_skipped():
    # 3×2 image, rows padded to 5 bytes with 0xEE.
    data = bytes([1, 2, 3, 0xEE, 0xEE, 4, 5, 6, 0xEE, 0xEE])

    pixels = decode_pixels(make_message("mono8", 3, 2, 5, data))

    np.testing.assert_array_equal(pixels, np.array([[1, 2, 3], [4, 5, 6]], np.uint8))
    assert pixels.dtype == np.uint8
    assert pixels.flags.c_contiguous


@pytest.mark.parametrize("big_endian", [False, True])
def test_16uc1_padded_rows_in_either_byte_order(big_endian):
    values = [[0, 1000, 65535], [258, 4242, 1]]
    order = ">" if big_endian else "<"
    # Each row of 3 pixels (6 bytes) padded to 7 bytes, so the rows start at odd offsets.
    data = b"".join(struct.pack(f"{order}3H", *row) + b"\xab" for row in values)

    pixels = decode_pixels(make_message("16UC1", 3, 2, 7, data, big_endian))

    assert pixels.dtype == np.uint16
    assert pixels.dtype.isnative
    np.testing.assert_array_equal(pixels, np.array(values, np.uint16))


def test_32fc1_big_endian_keeps_nan_and_infinity():
    values = [1.5, float("nan"), -0.25, float("inf")]
    # 2×2 image, rows padded with four bytes.
    data = struct.pack(">2f", *values[:2]) + bytes(4) + struct.pack(">2f", *values[2:]) + bytes(4)

    pixels = decode_pixels(make_message("32FC1", 2, 2, 12, data, big_endian=True))

    assert pixels.dtype == np.float32
    assert pixels.dtype.isnative
    np.testing.assert_allclose(pixels, np.reshape(values, (2, 2)), rtol=0, atol=0, equal_nan=True)


def test_color_keeps_the_message_channel_order():
    # One row of two pixels (B, G, R) = (10, 20, 30), (40, 50, 60).
    data = bytes([10, 20, 30, 40, 50, 60])

    pixels = decode_pixels(make_message("bgr8", 2, 1, 6, data))

    np.testing.assert_array_equal(pixels, [[[10, 20, 30], [40, 50, 60]]])
    assert pixels.shape == (1, 2, 3)


@pytest.mark.parametrize(
    "data",
    [
        bytes([1, 2, 3, 4, 5, 6, 7, 8]),
        bytearray([1, 2, 3, 4, 5, 6, 7, 8]),
        array.array("B", [1, 2, 3, 4, 5, 6, 7, 8]),
        np.arange(1, 9, dtype=np.uint8),
        [1, 2, 3, 4, 5, 6, 7, 8],
    ],
    ids=["bytes", "bytearray", "array.array (rclpy)", "numpy (rosbags)", "list"],
)
def test_every_kind_of_data_buffer_is_read(data):
    pixels = decode_pixels(make_message("mono8", 4, 2, 4, data))

    np.testing.assert_array_equal(pixels, [[1, 2, 3, 4], [5, 6, 7, 8]])


def test_result_owns_its_memory():
    data = np.arange(6, dtype=np.uint8)
    message = make_message("mono8", 3, 2, 3, data)

    pixels = decode_pixels(message)
    pixels[0, 0] = 99

    assert pixels.flags.writeable
    assert data[0] == 0


def test_bytes_beyond_height_times_step_are_ignored():
    pixels = decode_pixels(make_message("mono8", 2, 1, 2, bytes([7, 8, 9, 9])))

    np.testing.assert_array_equal(pixels, [[7, 8]])


def test_mono16_big_endian_matches_numpy_big_endian_array():
    rng = np.random.default_rng(11)
    expected = rng.integers(0, 65536, (4, 5), dtype=np.uint16)
    wire = expected.astype(">u2").tobytes()

    pixels = decode_pixels(make_message("mono16", 5, 4, 10, wire, big_endian=True))

    np.testing.assert_array_equal(pixels, expected)
    assert pixels.dtype.isnative


# --- RGB or gray ---------------------------------------------------------------------


def test_bgr8_becomes_rgb():
    data = bytes([10, 20, 30, 40, 50, 60])

    rgb = to_rgb_or_gray(decode_pixels(make_message("bgr8", 2, 1, 6, data)), "bgr8")

    np.testing.assert_array_equal(rgb, [[[30, 20, 10], [60, 50, 40]]])
    assert rgb.flags.c_contiguous


def test_bgra8_becomes_rgb_without_alpha():
    # Two pixels (B, G, R, A) = (1, 2, 3, 4), (5, 6, 7, 8), rows padded to 10 bytes.
    data = bytes([1, 2, 3, 4, 5, 6, 7, 8, 0xEE, 0xEE])

    rgb = to_rgb_or_gray(decode_pixels(make_message("bgra8", 2, 1, 10, data)), "bgra8")

    np.testing.assert_array_equal(rgb, [[[3, 2, 1], [7, 6, 5]]])
    assert rgb.shape == (1, 2, 3)
    assert rgb.flags.c_contiguous


def test_rgba8_drops_alpha_and_rgb8_and_mono8_stay():
    rgba = to_rgb_or_gray(decode_pixels(make_message("rgba8", 1, 1, 4, bytes([1, 2, 3, 4]))), "rgba8")
    rgb = to_rgb_or_gray(decode_pixels(make_message("rgb8", 1, 1, 3, bytes([1, 2, 3]))), "rgb8")
    mono = to_rgb_or_gray(decode_pixels(make_message("mono8", 2, 1, 2, bytes([9, 8]))), "mono8")

    np.testing.assert_array_equal(rgba, [[[1, 2, 3]]])
    np.testing.assert_array_equal(rgb, [[[1, 2, 3]]])
    np.testing.assert_array_equal(mono, [[9, 8]])


def test_8uc3_is_read_as_bgr():
    rgb = to_rgb_or_gray(decode_pixels(make_message("8UC3", 1, 1, 3, bytes([1, 2, 3]))), "8UC3")

    np.testing.assert_array_equal(rgb, [[[3, 2, 1]]])


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "allowed", "match"),
    [
        (
            make_message("yuv422", 2, 1, 4, bytes(4)),
            None,
            "unsupported image encoding 'yuv422': use one of mono8, 8UC1, .*32FC1",
        ),
        (
            make_message("16UC1", 2, 1, 4, bytes(4)),
            COLOR_ENCODINGS,
            "unsupported image encoding '16UC1': use one of mono8, 8UC1, rgb8",
        ),
        (
            make_message("mono8", 0, 3, 0, b""),
            None,
            "empty mono8 image 0x3: width and height must be > 0",
        ),
        (
            make_message("rgb8", 2, 0, 6, b""),
            None,
            "empty rgb8 image 2x0",
        ),
        (
            make_message("16UC1", 3, 2, 5, bytes(10)),
            None,
            r"invalid step 5 of a 3x2 16UC1 image: a row needs at least 6 bytes "
            r"\(width × 2 bytes per pixel\)\. Set step >= 6",
        ),
        (
            make_message("32FC1", 2, 2, 8, bytes(15)),
            None,
            r"32FC1 image 2x2 with step 8 has 15 bytes of data: expected 16 \(height × step\)\. "
            "The message is truncated",
        ),
    ],
    ids=["unknown encoding", "encoding not allowed", "zero width", "zero height", "short step", "short data"],
)
def test_undecodable_messages_raise(message, allowed, match):
    with pytest.raises(ImageEncodingError, match=match):
        decode_pixels(message, allowed)


def test_errors_are_value_errors():
    with pytest.raises(ValueError, match="unsupported image encoding 'jpeg'"):
        decode_pixels(make_message("jpeg", 1, 1, 1, bytes(1)))


def test_allowed_encodings_outside_the_table_are_still_rejected():
    with pytest.raises(ImageEncodingError, match="unsupported image encoding 'bayer_rggb8'"):
        decode_pixels(make_message("bayer_rggb8", 2, 2, 2, bytes(4)), ("bayer_rggb8",))


def test_to_rgb_or_gray_rejects_bad_input():
    with pytest.raises(ImageEncodingError, match="unsupported image encoding 'yuv422'"):
        to_rgb_or_gray(np.zeros((2, 2, 2), np.uint8), "yuv422")
    with pytest.raises(
        ImageEncodingError, match=r"pixels of shape \(2, 2\) do not fit encoding 'bgr8' with 3 channel"
    ):
        to_rgb_or_gray(np.zeros((2, 2), np.uint8), "bgr8")
    with pytest.raises(ImageEncodingError, match=r"pixels of shape \(2, 2, 3\) do not fit encoding 'mono8'"):
        to_rgb_or_gray(np.zeros((2, 2, 3), np.uint8), "mono8")
