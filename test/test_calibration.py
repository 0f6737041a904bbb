"""Tests of the calibration data loader and the model input specs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from onnx import TensorProto, helper

from quantized_inference_node.hawq.calibration import (
    CalibrationError,
    ChannelOrder,
    ImagePreprocess,
    InputSpec,
    Layout,
    load_calibration,
    preprocess_image,
    read_input_specs,
)


def image_model(shape: list, name: str = "image", elem_type: int = TensorProto.FLOAT):
    """A model with one input of SHAPE (ints, dim_param strings or None) and an Identity."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], ["out"])],
        "g",
        [helper.make_tensor_value_info(name, elem_type, shape)],
        [helper.make_tensor_value_info("out", elem_type, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def two_input_specs() -> list[InputSpec]:
    return [
        InputSpec("points", ("batch", "n", 3), np.dtype(np.float32)),
        InputSpec("mask", ("batch", "n"), np.dtype(np.bool_)),
    ]


def write_images(folder: Path, sizes_hw: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    """Write random RGB images as PNG (lossless) and return them in file order."""
    rng = np.random.default_rng(seed)
    images = []
    for i, (h, w) in enumerate(sizes_hw):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"img_{i:02d}.png"), rgb[:, :, ::-1])
        images.append(rgb)
    return images


# -- input specs --------------------------------------------------------------------------


def test_read_input_specs_keeps_symbolic_and_unknown_dims() -> None:
    model = image_model(["n", 3, None, 64])
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -1

    specs = read_input_specs(model)

    assert specs == [InputSpec("image", ("n", 3, None, 64), np.dtype(np.float32))]


def test_question_mark_dims_are_independent() -> None:
    # PaddlePaddle exports name every unknown axis "?": they must not be tied together.
    model = image_model(["?", 3, "?", "?"])

    specs = read_input_specs(model)
    data = load_calibration({"image": np.zeros((2, 3, 48, 192), np.float32)}, specs)

    assert specs == [InputSpec("image", (None, 3, None, None), np.dtype(np.float32))]
    assert data.input_shapes == {"image": (3, 48, 192)}


def test_read_input_specs_skips_initializers_listed_as_inputs() -> None:
    model = image_model([1, 3, 8, 8])
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]))
    model.graph.initializer.append(helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0]))

    assert [spec.name for spec in read_input_specs(model)] == ["image"]


# -- arrays and .npz ----------------------------------------------------------------------


def test_npz_batches_and_resolved_dims(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    points = rng.standard_normal((10, 7, 3)).astype(np.float32)
    mask = rng.random((10, 7)) > 0.5
    path = tmp_path / "calib.npz"
    np.savez(path, points=points, mask=mask)

    data = load_calibration(path, two_input_specs(), batch_size=4)

    assert [len(b["points"]) for b in data] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["points"] for b in data]), points)
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in data]), mask)
    assert data.input_shapes == {"points": (7, 3), "mask": (7,)}
    assert data.num_samples == 10
    assert data.source == str(path)


def test_max_samples_takes_the_first_samples() -> None:
    points = np.arange(30, dtype=np.float32).reshape(10, 1, 3)
    data = load_calibration(
        {"points": points, "mask": np.ones((10, 1), bool)},
        two_input_specs(),
        batch_size=4,
        max_samples=5,
    )
    assert data.num_samples == 5
    np.testing.assert_array_equal(np.concatenate([b["points"] for b in data]), points[:5])


def test_fixed_batch_size_drops_remainder() -> None:
    spec = [InputSpec("x", (2, 4), np.dtype(np.float32))]
    data = load_calibration({"x": np.zeros((5, 4), np.float32)}, spec)
    assert [len(b["x"]) for b in data] == [2, 2]
    assert data.num_samples == 4
    with pytest.raises(CalibrationError, match=r"fixes the batch size at 2; pass batch_size=2"):
        load_calibration({"x": np.zeros((5, 4), np.float32)}, spec, batch_size=3)


def test_npz_wrong_input_name_is_named(tmp_path: Path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, points=np.zeros((2, 5, 3), np.float32), masks=np.zeros((2, 5), bool))
    with pytest.raises(CalibrationError, match=r"missing \['mask'\], unexpected \['masks'\]"):
        load_calibration(path, two_input_specs())


def test_npz_wrong_shape_is_named(tmp_path: Path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, image=np.zeros((2, 3, 16, 32), np.float32))
    specs = read_input_specs(image_model(["n", 3, 16, 16]))
    with pytest.raises(
        CalibrationError,
        match=r"input 'image' expects shape \(n, 3, 16, 16\), found \(2, 3, 16, 32\) "
        r"\(axis 3 must be 16\)",
    ):
        load_calibration(path, specs)


def test_wrong_rank_is_named() -> None:
    specs = read_input_specs(image_model(["n", 3, 16, 16]))
    with pytest.raises(CalibrationError, match=r"'image' expects shape \(n, 3, 16, 16\).*\(3, 16, 16\)"):
        load_calibration({"image": np.zeros((3, 16, 16), np.float32)}, specs)


def test_npz_wrong_dtype_is_named(tmp_path: Path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, image=np.zeros((2, 3, 16, 16), np.float64))
    specs = read_input_specs(image_model(["n", 3, 16, 16]))
    with pytest.raises(
        CalibrationError, match=r"input 'image' expects dtype float32, found float64"
    ):
        load_calibration(path, specs)


def test_named_dims_must_agree_across_inputs() -> None:
    arrays = {"points": np.zeros((2, 5, 3), np.float32), "mask": np.zeros((2, 6), bool)}
    with pytest.raises(CalibrationError, match=r"dimension 'n' is 5 in one input and 6"):
        load_calibration(arrays, two_input_specs())


def test_sample_counts_must_agree() -> None:
    arrays = {"points": np.zeros((2, 5, 3), np.float32), "mask": np.zeros((3, 5), bool)}
    with pytest.raises(CalibrationError, match="different sample counts"):
        load_calibration(arrays, two_input_specs())


def test_bad_arguments_raise_before_reading(tmp_path: Path) -> None:
    specs = two_input_specs()
    with pytest.raises(CalibrationError, match="batch_size must be >= 1, got 0"):
        load_calibration(tmp_path / "absent.npz", specs, batch_size=0)
    with pytest.raises(CalibrationError, match="max_samples must be >= 1 or None, got 0"):
        load_calibration(tmp_path / "absent.npz", specs, max_samples=0)
    with pytest.raises(FileNotFoundError, match=r"absent\.npz does not exist"):
        load_calibration(tmp_path / "absent.npz", specs)
    (tmp_path / "data.txt").write_text("1 2 3")
    with pytest.raises(CalibrationError, match=r"neither an \.npz file nor a folder"):
        load_calibration(tmp_path / "data.txt", specs)
    with pytest.raises(CalibrationError, match="preprocess applies to image folders only"):
        load_calibration({"x": np.zeros(1)}, specs, preprocess=ImagePreprocess())


def test_corrupt_npz_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(CalibrationError, match=r"cannot read calibration archive .*broken\.npz"):
        load_calibration(path, two_input_specs())


# -- image folders ------------------------------------------------------------------------


def test_image_folder_is_preprocessed_as_specified(tmp_path: Path) -> None:
    images = write_images(tmp_path, [(12, 10), (12, 10), (12, 10)])
    (tmp_path / "notes.txt").write_text("ignored: not an image")
    specs = read_input_specs(image_model(["n", 3, None, None]))
    preprocess = ImagePreprocess(
        mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), channel_order=ChannelOrder.BGR
    )

    data = load_calibration(tmp_path, specs, preprocess, batch_size=2)

    # Independent computation: BGR order, /255, (x - mean) / std, channels first.
    mean = np.array([0.5, 0.4, 0.3], np.float32)
    std = np.array([0.2, 0.25, 0.5], np.float32)
    expected = [((im[:, :, ::-1] / 255.0 - mean) / std).transpose(2, 0, 1) for im in images]
    got = np.concatenate([b["image"] for b in data])
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-6, atol=1e-6)
    assert got.dtype == np.float32
    assert [len(b["image"]) for b in data] == [2, 1]
    assert data.input_shapes == {"image": (3, 12, 10)}
    assert data.sample_names == ["img_00.png", "img_01.png", "img_02.png"]


def test_image_folder_resizes_to_model_nhwc(tmp_path: Path) -> None:
    images = write_images(tmp_path, [(20, 30), (7, 9)])
    specs = read_input_specs(image_model([None, 8, 6, 3]))
    preprocess = ImagePreprocess(layout=Layout.NHWC, scale_to_unit=False)

    data = load_calibration(tmp_path, specs, preprocess, batch_size=2)

    expected = np.stack(
        [cv2.resize(im, (6, 8), interpolation=cv2.INTER_LINEAR).astype(np.float32) for im in images]
    )
    np.testing.assert_allclose(data[0]["image"], expected, rtol=0, atol=1e-4)


def test_grey_model_input_reads_images_as_grey(tmp_path: Path) -> None:
    images = write_images(tmp_path, [(5, 4)])
    specs = read_input_specs(image_model([1, 1, 5, 4]))
    data = load_calibration(
        tmp_path, specs, ImagePreprocess(mean=(0.0,), std=(1.0,), scale_to_unit=False)
    )
    expected = cv2.cvtColor(images[0], cv2.COLOR_RGB2GRAY).astype(np.float32)
    np.testing.assert_allclose(data[0]["image"][0, 0], expected, atol=1e-4)


def test_empty_image_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    specs = read_input_specs(image_model(["n", 3, 8, 8]))
    with pytest.raises(CalibrationError, match=rf"calibration folder {tmp_path} contains no images"):
        load_calibration(tmp_path, specs, ImagePreprocess())


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    write_images(tmp_path, [(8, 8)])
    (tmp_path / "img_99.png").write_bytes(b"\x89PNG truncated")
    specs = read_input_specs(image_model(["n", 3, 8, 8]))
    with pytest.raises(CalibrationError, match=r"cannot read image .*img_99\.png"):
        load_calibration(tmp_path, specs, ImagePreprocess())


def test_image_folder_argument_errors(tmp_path: Path) -> None:
    write_images(tmp_path, [(8, 8)])
    with pytest.raises(CalibrationError, match=r"pass preprocess=ImagePreprocess"):
        load_calibration(tmp_path, read_input_specs(image_model(["n", 3, 8, 8])))
    with pytest.raises(CalibrationError, match="an image folder feeds models with one input"):
        load_calibration(tmp_path, two_input_specs(), ImagePreprocess())
    with pytest.raises(CalibrationError, match=r"has 4 channels on axis 1 for layout NCHW"):
        load_calibration(tmp_path, read_input_specs(image_model([1, 4, 8, 8])), ImagePreprocess())


def test_image_size_mismatch_raises(tmp_path: Path) -> None:
    write_images(tmp_path, [(8, 8), (9, 8)])
    fixed = read_input_specs(image_model(["n", 3, 8, 8]))
    with pytest.raises(CalibrationError, match=r"fixed at \(height, width\) \(8, 8\)"):
        load_calibration(tmp_path, fixed, ImagePreprocess(size_hw=(16, 16)))
    dynamic = read_input_specs(image_model(["n", 3, "h", "w"]))
    with pytest.raises(CalibrationError, match=r"img_01\.png gives an input of shape \(3, 9, 8\)"):
        load_calibration(tmp_path, dynamic, ImagePreprocess())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size_hw": (0, 4)}, r"size_hw must be two positive ints"),
        ({"mean": (0.5,), "std": (1.0, 1.0)}, r"one value per channel"),
        ({"std": (1.0, 0.0, 1.0)}, r"std values must be > 0"),
        ({"layout": "CHW"}, r"'CHW' is not a valid Layout"),
    ],
)
def test_invalid_preprocess_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImagePreprocess(**kwargs)


def test_preprocess_image_rejects_non_uint8() -> None:
    with pytest.raises(CalibrationError, match=r"uint8 \(H, W\) or \(H, W, 3\), got float32"):
        preprocess_image(np.zeros((4, 4, 3), np.float32), ImagePreprocess())
