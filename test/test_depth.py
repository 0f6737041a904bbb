"""Tests of depth decoding: every invalid value becomes NaN, units follow the scale."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from surfel_mapping_node.depth import (
    TUM_SCALE,
    decode_depth,
    disparity_to_depth,
    read_depth_image,
    resolve_depth_scale,
)


def test_uint16_millimetres_decode_and_invalid_codes() -> None:
    raw = np.array([[0, 65535, 50, 100], [1500, 10000, 10001, 65534]], dtype=np.uint16)

    depth_m = decode_depth(raw, 0.001, min_depth_m=0.1, max_depth_m=10.0)

    assert depth_m.dtype == np.float32
    # 0 and 65535 are "no measurement"; 0.05 m and 10.001 m lie outside [0.1, 10] m.
    expected = np.array([[np.nan, np.nan, np.nan, 0.1], [1.5, 10.0, np.nan, np.nan]], dtype=np.float32)
    np.testing.assert_allclose(depth_m, expected, rtol=1e-6, equal_nan=True)


def test_uint16_65535_is_invalid_even_when_in_range() -> None:
    raw = np.array([[65535, 65534]], dtype=np.uint16)

    depth_m = decode_depth(raw, 0.001, min_depth_m=0.1, max_depth_m=100.0)

    assert np.isnan(depth_m[0, 0])
    np.testing.assert_allclose(depth_m[0, 1], 65.534, rtol=1e-6)


def test_tum_factor_5000() -> None:
    # TUM stores depth × 5000: 5000 is 1 m, 10000 is 2 m.
    raw = np.array([[5000, 10000, 0]], dtype=np.uint16)

    depth_m = decode_depth(raw, TUM_SCALE, min_depth_m=0.1, max_depth_m=10.0)

    np.testing.assert_allclose(depth_m, [[1.0, 2.0, np.nan]], rtol=1e-6, equal_nan=True)


def test_big_endian_uint16_is_decoded_by_value() -> None:
    raw = np.array([[1000, 2000]], dtype=">u2")

    depth_m = decode_depth(raw, 0.001, min_depth_m=0.1, max_depth_m=10.0)

    np.testing.assert_allclose(depth_m, [[1.0, 2.0]], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_metres_every_invalid_value(dtype: type) -> None:
    raw = np.array(
        [[0.0, np.nan, np.inf, -np.inf], [-1.0, 0.05, 10.5, 2.5], [0.1, 10.0, 1e-30, 3.25]], dtype=dtype
    )

    depth_m = decode_depth(raw, 1.0, min_depth_m=0.1, max_depth_m=10.0)

    assert depth_m.dtype == np.float32
    expected = np.array(
        [[np.nan] * 4, [np.nan, np.nan, np.nan, 2.5], [0.1, 10.0, np.nan, 3.25]], dtype=np.float32
    )
    np.testing.assert_allclose(depth_m, expected, rtol=1e-6, equal_nan=True)


def test_float_input_is_not_modified() -> None:
    raw = np.array([[np.inf, 2.0]], dtype=np.float32)

    decode_depth(raw, 1.0, min_depth_m=0.1, max_depth_m=10.0)

    assert np.isinf(raw[0, 0])


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int16, np.float16, np.uint32])
def test_unsupported_dtype_raises(dtype: type) -> None:
    raw = np.ones((2, 2), dtype=dtype)

    message = rf"unsupported depth dtype {np.dtype(dtype)}.*uint16, float32, float64"
    with pytest.raises(ValueError, match=message):
        decode_depth(raw, 0.001, min_depth_m=0.1, max_depth_m=10.0)


def test_float_depth_with_scale_other_than_one_raises() -> None:
    raw = np.ones((2, 2), dtype=np.float32)

    with pytest.raises(ValueError, match=r"depth_scale=0.001 for float32 depth.*depth_scale=1.0"):
        decode_depth(raw, 0.001, min_depth_m=0.1, max_depth_m=10.0)


@pytest.mark.parametrize("scale", [0.0, -0.001, float("nan")])
def test_uint16_with_invalid_scale_raises(scale: float) -> None:
    raw = np.ones((2, 2), dtype=np.uint16)

    with pytest.raises(ValueError, match=r"invalid depth_scale=.* for uint16 depth"):
        decode_depth(raw, scale, min_depth_m=0.1, max_depth_m=10.0)


@pytest.mark.parametrize(("low", "high"), [(0.0, 10.0), (5.0, 1.0), (0.1, float("inf"))])
def test_invalid_range_raises(low: float, high: float) -> None:
    with pytest.raises(ValueError, match=r"invalid depth range"):
        decode_depth(np.ones((2, 2), np.uint16), 0.001, min_depth_m=low, max_depth_m=high)


def test_depth_with_channel_axis_raises() -> None:
    with pytest.raises(ValueError, match=r"invalid depth image shape \(2, 2, 1\)"):
        decode_depth(np.ones((2, 2, 1), np.uint16), 0.001, min_depth_m=0.1, max_depth_m=10.0)


def test_full_uint16_range_matches_independent_formula() -> None:
    codes = np.arange(65536, dtype=np.uint16).reshape(256, 256)

    depth_m = decode_depth(codes, 0.001, min_depth_m=0.5, max_depth_m=8.0)

    metres = codes.astype(np.float64) * 0.001
    valid = (metres >= 0.5 - 1e-9) & (metres <= 8.0 + 1e-9)
    np.testing.assert_array_equal(np.isfinite(depth_m), valid)
    np.testing.assert_allclose(depth_m[valid], metres[valid], rtol=1e-6)


def test_disparity_to_depth_formula_and_invalid_values() -> None:
    disparity = np.array([[10.0, 0.0, -3.0, np.nan], [np.inf, 1.0, 100.0, 0.5]], dtype=np.float32)

    depth_m = disparity_to_depth(disparity, fx=700.0, baseline_m=0.5, min_depth_m=1.0, max_depth_m=400.0)

    # depth = 700 · 0.5 / d: 35 m, 350 m, 3.5 m; 700 m at d = 0.5 is beyond 400 m.
    expected = np.array([[35.0, np.nan, np.nan, np.nan], [np.nan, 350.0, 3.5, np.nan]])
    np.testing.assert_allclose(depth_m, expected, rtol=1e-6, equal_nan=True)
    assert depth_m.dtype == np.float32


def test_disparity_to_depth_accepts_integer_disparity() -> None:
    depth_m = disparity_to_depth(np.array([[4, 0]], dtype=np.int16), fx=100.0, baseline_m=0.2)

    np.testing.assert_allclose(depth_m, [[5.0, np.nan]], rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize(
    ("fx", "baseline_m", "message"),
    [
        (0.0, 0.5, r"invalid fx=0.0"),
        (700.0, -0.5, r"invalid baseline_m=-0.5"),
        (700.0, np.nan, r"baseline_m=nan"),
    ],
)
def test_disparity_to_depth_invalid_parameters_raise(fx: float, baseline_m: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        disparity_to_depth(np.ones((2, 2), np.float32), fx=fx, baseline_m=baseline_m)


def test_disparity_to_depth_rejects_bad_array() -> None:
    with pytest.raises(ValueError, match=r"invalid disparity image: shape \(4,\)"):
        disparity_to_depth(np.ones(4, np.float32), fx=1.0, baseline_m=1.0)


def test_resolve_depth_scale() -> None:
    assert resolve_depth_scale(0.0, TUM_SCALE) == pytest.approx(0.0002)
    assert resolve_depth_scale(0.001, TUM_SCALE) == pytest.approx(0.001)
    with pytest.raises(ValueError, match=r"invalid depth_scale=-1.0"):
        resolve_depth_scale(-1.0, 0.001)


def test_read_depth_image_round_trip_and_errors(tmp_path) -> None:
    raw = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    path = tmp_path / "depth.png"
    cv2.imwrite(str(path), raw)

    np.testing.assert_array_equal(read_depth_image(path), raw)

    with pytest.raises(FileNotFoundError, match=r"depth image not found: .*missing.png"):
        read_depth_image(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"failed to decode depth image .*broken.png"):
        read_depth_image(broken)
