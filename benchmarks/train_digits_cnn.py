"""Train a small CNN on scikit-learn's digits and export it to FP32 ONNX.

The HAWQ benchmark and tests use it as a model whose accuracy can be measured
in seconds on a CPU. Split: train_test_split(test_size=0.3, random_state=0,
stratified); images are 8x8 gray values 0..16 scaled to [0, 1], NCHW float32.

Usage::

    python benchmarks/train_digits_cnn.py --out /tmp/digits_cnn.onnx
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class DigitsSplit:
    """The fixed digits split, images (N, 1, 8, 8) float32 in [0, 1], labels int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split() -> DigitsSplit:
    """Return the fixed stratified 70/30 split of scikit-learn's digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.3, random_state=0, stratify=labels
    )
    return DigitsSplit(x_train, y_train, x_test, y_test)


def build_digits_cnn():
    """Return the untrained CNN: three 3x3 Conv+BN+ReLU blocks (max pooling after the
    second) and two Linear layers, about 48k weights."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def train_digits_cnn(split: DigitsSplit, epochs: int = 40, seed: int = 0):
    """Train the CNN with Adam on the training split (seeded; a few seconds on a CPU).

    Returns:
        The trained module in eval mode.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    model = build_digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train)
    generator = torch.Generator().manual_seed(seed)

    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            index = order[start : start + 64]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
    return model.eval()


def export_onnx(model, path: Path) -> Path:
    """Export the trained module to FP32 ONNX (opset 17, input 'image', output 'logits')."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a torch module on (x, y)."""
    import torch

    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="FP32 .onnx file to write")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()

    split = load_digits_split()
    model = train_digits_cnn(split, args.epochs, args.seed)
    export_onnx(model, args.out)
    print(f"test accuracy {accuracy(model, split.x_test, split.y_test):.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
