"""Train the small 7-Scenes monocular depth network, export it to ONNX and quantize it with HAWQ.

A demonstration for the monocular mapping mode (camera image -> depth network in
quantized_inference_node -> surfel_mapping_node in depth_only mode), trained on the
240 frames 0-239 of the 7-Scenes redkitchen excerpt. It is not a general depth
model: validation frames 240-299 come from the same room and the same few seconds
of recording, so its validation errors overstate how well it generalizes.

Network: a U-Net-style encoder-decoder, input 160x128 RGB (stretched from any
size), output metric depth at 80x64. Four stride-2 Conv+BN+ReLU stages (12, 24, 48,
96 channels, the last three followed by a second Conv+BN+ReLU), then three stages of
nearest 2x Resize, Concat with the skip and Conv+BN+ReLU, and a 3x3 Conv head whose
output is log depth, so depth = exp(head). 247,581 parameters before BatchNorm folding
(11 Conv layers, 246,708 weights, after it).

Training: Adam with cosine decay, L1 on log depth over valid pixels, horizontal
flips, seeded, one CPU thread by default (see train_depth_network).

Writes into quantized_inference_node/models/depth_7scenes/:
model.onnx (FP32, opset 17, input "image" Nx3x128x160, output "depth_m" Nx1x64x80)
and model.yaml (its card); then model_hawq.onnx and model_hawq.yaml from the HAWQ
tool (weights at most 1/6 of FP32, labels = the real depth).

Usage::

    python -m benchmarks.train_depth_network
    python -m benchmarks.train_depth_network --epochs 40 --skip-hawq
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from benchmarks.bench_depth_network import (
    DEFAULT_DATA_DIR,
    MODEL_DIR,
    OUTPUT_SIZE,
    TRAIN_FRAMES,
    VALIDATION_FRAMES,
    DepthSamples,
    depth_metrics,
    load_depth_samples,
)
from quantized_inference_node.model_card import (
    ModelCard,
    load_model_card,
    model_card_from_dict,
    model_card_to_dict,
)

LOGGER = logging.getLogger(__name__)

INPUT_SIZE = (160, 128)
INPUT_NAME = "image"
OUTPUT_NAME = "depth_m"
ONNX_OPSET = 17
HAWQ_SIZE_RATIO = 1.0 / 6.0
HAWQ_CALIBRATION_FRAMES = 32

CARD_DESCRIPTION = (
    "Demonstration monocular depth network trained on 240 frames of one 7-Scenes scene "
    "(redkitchen; Microsoft Research, non-commercial use). Not a general depth model: it "
    "only knows that room. See README.md beside it."
)


def depth_card(name: str = "depth_7scenes", description: str = CARD_DESCRIPTION) -> ModelCard:
    """Return the card of the network: RGB, ImageNet normalisation, stretch to 160x128, depth in metres."""
    return model_card_from_dict(
        {
            "name": name,
            "task": "depth",
            "description": description,
            "input": {
                "name": INPUT_NAME,
                "width": INPUT_SIZE[0],
                "height": INPUT_SIZE[1],
                "layout": "NCHW",
                "channel_order": "RGB",
                "dtype": "float32",
                "scale": 1.0 / 255.0,
                "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225],
                "resize": "stretch",
            },
            "output": {"name": OUTPUT_NAME, "type": "metric_depth", "scale": 1.0},
        }
    )


class ConvBlock(nn.Sequential):
    """3x3 Conv (no bias, BatchNorm follows) + BatchNorm + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DepthUNet(nn.Module):
    """Encoder-decoder from (N, 3, 128, 160) normalised RGB to (N, 1, 64, 80) depth in metres."""

    def __init__(self, widths: tuple[int, int, int, int] = (12, 24, 48, 96)) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        # One conv at 64x80: full-width stages there cost most of the multiply-adds.
        self.enc1 = ConvBlock(3, w1, 2)
        self.enc2 = nn.Sequential(ConvBlock(w1, w2, 2), ConvBlock(w2, w2))
        self.enc3 = nn.Sequential(ConvBlock(w2, w3, 2), ConvBlock(w3, w3))
        self.enc4 = nn.Sequential(ConvBlock(w3, w4, 2), ConvBlock(w4, w4))
        self.dec3 = ConvBlock(w4 + w3, w3)
        self.dec2 = ConvBlock(w3 + w2, w2)
        self.dec1 = ConvBlock(w2 + w1, 16)
        self.head = nn.Conv2d(16, 1, 3, padding=1)

    def log_depth(self, image: torch.Tensor) -> torch.Tensor:
        """Return (N, 1, 64, 80) natural log of depth in metres."""
        s1 = self.enc1(image)
        s2 = self.enc2(s1)
        s3 = self.enc3(s2)
        x = self.enc4(s3)
        x = self.dec3(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), s3], 1))
        x = self.dec2(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), s2], 1))
        x = self.dec1(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), s1], 1))
        return self.head(x)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Return (N, 1, 64, 80) depth in metres."""
        return torch.exp(self.log_depth(image))


@dataclass(frozen=True)
class TrainingResult:
    """The trained network and its training record."""

    model: DepthUNet
    epochs: int
    seconds: float
    final_loss: float


def masked_log_l1(log_pred: torch.Tensor, depth_m: torch.Tensor) -> torch.Tensor:
    """Mean |log d_pred - log d_gt| over pixels with valid (finite, > 0) ground truth."""
    valid = torch.isfinite(depth_m) & (depth_m > 0)
    target = torch.log(torch.where(valid, depth_m, torch.ones_like(depth_m)))
    return (torch.abs(log_pred - target) * valid).sum() / valid.sum().clamp(min=1)


def train_depth_network(
    train: DepthSamples,
    epochs: int = 40,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    threads: int = 1,
) -> TrainingResult:
    """Train DepthUNet on TRAIN with Adam, cosine learning-rate decay and random horizontal flips.

    Args:
        train: Inputs and ground truth (NaN invalid) of the training frames.
        epochs: Passes over the training frames.
        batch_size: Frames per step.
        lr: Initial learning rate.
        seed: Seed of the initialisation, shuffling and flips.
        threads: torch intra-op threads. One is the default because on a shared 2-core
            machine a training step took 0.7 s with one thread and 2.5-8 s with two.

    Raises:
        ValueError: when EPOCHS or BATCH_SIZE is < 1.
    """
    if epochs < 1 or batch_size < 1 or threads < 1:
        raise ValueError(
            f"invalid epochs {epochs}, batch_size {batch_size} or threads {threads}: each must be >= 1"
        )
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)

    model = DepthUNet()
    images = torch.from_numpy(train.images)
    depths = torch.from_numpy(train.depth_m)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    steps_per_epoch = (len(images) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)

    started = time.perf_counter()
    loss_value = float("nan")
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(images), batch_size):
            index = order[start : start + batch_size]
            x, y = images[index], depths[index]

            # Flip half of the batch left-right; image and depth flip together.
            flip = torch.rand(len(index), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            y = torch.where(flip[:, None, None, None], y.flip(-1), y)

            loss = masked_log_l1(model.log_depth(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
        loss_value = total / len(images)
        LOGGER.info(
            "epoch %d/%d: log-L1 %.4f (%.0f s)", epoch + 1, epochs, loss_value, time.perf_counter() - started
        )
    model.eval()
    return TrainingResult(model, epochs, time.perf_counter() - started, loss_value)


def export_onnx(model: DepthUNet, out_path: Path) -> Path:
    """Export the network in eval mode to FP32 ONNX with input N x 3 x 128 x 160 (N free).

    Raises:
        ValueError: when onnxruntime's output differs from torch's by more than 1e-4 m.
    """
    import onnxruntime as ort

    model = model.eval()
    example = torch.zeros(1, 3, INPUT_SIZE[1], INPUT_SIZE[0])
    torch.onnx.export(
        model,
        (example,),
        str(out_path),
        dynamo=False,
        opset_version=ONNX_OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        # A free batch axis lets the HAWQ tool and calibration run batches; the node feeds one image.
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )

    # The exported graph must compute what torch computes.
    probe = torch.from_numpy(np.random.default_rng(0).normal(size=example.shape).astype(np.float32))
    with torch.no_grad():
        expected = model(probe).numpy()
    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: probe.numpy()})[0]
    difference = float(np.abs(got - expected).max())
    if difference > 1e-4:
        raise ValueError(f"onnxruntime output differs from torch by {difference:.2e} m (limit 1e-4)")
    LOGGER.info("exported %s; onnxruntime vs torch max difference %.2e m", out_path, difference)
    return out_path


# Card keys that a stretch-resized depth model does not read; left out of the written card.
UNUSED_CARD_KEYS = {"input": ("max_side", "pad_value"), "output": ("class_names", "threshold", "top_k")}


def write_card(card: ModelCard, path: Path, comment: str) -> Path:
    """Write CARD as YAML to PATH with a leading comment block, without keys a depth model ignores.

    Raises:
        ValueError: when the written file does not read back as CARD.
    """
    data = model_card_to_dict(card)
    for section, keys in UNUSED_CARD_KEYS.items():
        for key in keys:
            data[section].pop(key)
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=100))

    if load_model_card(path) != card:
        raise ValueError(f"card {path} does not read back as written; check UNUSED_CARD_KEYS")
    return path


def hawq_labels(fp32_path: Path, samples: DepthSamples) -> np.ndarray:
    """Labels for the HAWQ analysis: the real depth, and FP32's own prediction where it is invalid.

    The HAWQ tool needs finite labels shaped like the output. Holes take the float
    model's prediction, so their residual is zero and only real measurements add to
    the loss.
    """
    from benchmarks.bench_depth_network import predict_depth

    fp32_m = predict_depth(fp32_path, samples.images, INPUT_NAME)
    valid = np.isfinite(samples.depth_m)
    return np.where(valid, samples.depth_m, fp32_m).astype(np.float32)


def quantize_hawq(fp32_path: Path, samples: DepthSamples, out_path: Path, report_dir: Path | None):
    """Quantize the FP32 model with the HAWQ tool (MSE Hessian on the real depth, 4/8 bits).

    Candidate widths are 4 and 8 only, because the tool stores 2-bit weights as int4:
    with 2 in the set the file could hold more bytes than the budget. With 4 and 8 the
    stored weights are exactly the allocated size.

    Returns:
        The tool's QuantizeResult.
    """
    from quantized_inference_node.hawq import QuantizeOptions, quantize
    from quantized_inference_node.hawq.hessian import HessianSettings

    torch.set_num_threads(1)
    options = QuantizeOptions(
        bits=(4, 8),
        size_ratio=HAWQ_SIZE_RATIO,
        batch_size=16,
        loss="mse",
        # Fewer steps and probes than the tool's defaults (100, 50) keep the analysis to
        # about 3.5 minutes on one CPU thread. Every layer's power iteration converged in 20 steps.
        hessian=HessianSettings(max_iterations=20, probes=8, seed=0),
        seed=0,
    )
    return quantize(
        fp32_path,
        {INPUT_NAME: samples.images},
        out_path,
        labels=hawq_labels(fp32_path, samples),
        options=options,
        report_dir=report_dir,
    )


def main(argv: list[str] | None = None) -> int:
    """Train, export, write the cards, quantize with HAWQ."""
    parser = argparse.ArgumentParser(
        description="Train the 7-Scenes demonstration depth network and export FP32 and HAWQ ONNX models.",
        epilog="example: python -m benchmarks.train_depth_network --epochs 40",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="7-Scenes redkitchen folder")
    parser.add_argument("--out-dir", type=Path, default=MODEL_DIR, help="folder for the models and cards")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--skip-hawq", action="store_true", help="train and export FP32 only")
    parser.add_argument("--hawq-only", action="store_true", help="quantize the existing model.onnx only")
    parser.add_argument("--hawq-report", type=Path, help="folder for the HAWQ tool's report")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if not args.data.is_dir():
        parser.error(f"7-Scenes folder {args.data} not found; pass --data")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    fp32_path = args.out_dir / "model.onnx"
    card = depth_card()

    # Data: the node's preprocessing, ground truth at the output size.
    train = load_depth_samples(args.data, TRAIN_FRAMES, card.input, INPUT_SIZE, OUTPUT_SIZE)
    validation = load_depth_samples(args.data, VALIDATION_FRAMES, card.input, INPUT_SIZE, OUTPUT_SIZE)

    # Train and export FP32.
    if not args.hawq_only:
        result = train_depth_network(train, epochs=args.epochs, seed=args.seed, threads=args.threads)
        with torch.no_grad():
            val_m = result.model(torch.from_numpy(validation.images)).numpy()
        metrics = depth_metrics(val_m, validation.depth_m)
        print(
            f"trained {result.epochs} epochs in {result.seconds:.0f} s, final train log-L1 "
            f"{result.final_loss:.4f}; validation abs-rel {metrics.abs_rel:.4f}, "
            f"delta<1.25 {metrics.delta_1_25:.4f} (same room as training: optimistic)"
        )
        export_onnx(result.model, fp32_path)
        write_card(
            card,
            args.out_dir / "model.yaml",
            "Card of model.onnx; written by benchmarks/train_depth_network.py.",
        )
    elif not fp32_path.is_file():
        parser.error(f"{fp32_path} not found; run without --hawq-only first")

    # HAWQ mixed precision with the real depth as labels.
    if not args.skip_hawq:
        step = len(TRAIN_FRAMES) // HAWQ_CALIBRATION_FRAMES
        calibration = DepthSamples(
            train.images[::step][:HAWQ_CALIBRATION_FRAMES],
            train.depth_m[::step][:HAWQ_CALIBRATION_FRAMES],
            train.frame_indices[::step][:HAWQ_CALIBRATION_FRAMES],
        )
        hawq_path = args.out_dir / "model_hawq.onnx"
        started = time.perf_counter()
        hawq = quantize_hawq(fp32_path, calibration, hawq_path, args.hawq_report)
        ratio = hawq.allocation.size_bytes / hawq.fp32_weight_bytes
        print(
            f"HAWQ in {time.perf_counter() - started:.0f} s: bits {list(hawq.allocation.bits)}, weights "
            f"{100 * ratio:.1f} % of FP32, relative output error {hawq.fidelity.relative_error:.4f}"
        )
        hawq_card = depth_card(
            "depth_7scenes_hawq", CARD_DESCRIPTION + " HAWQ mixed-precision weights (4/8 bits)."
        )
        write_card(
            hawq_card,
            args.out_dir / "model_hawq.yaml",
            "Card of model_hawq.onnx (HAWQ QDQ model); written by benchmarks/train_depth_network.py.",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
