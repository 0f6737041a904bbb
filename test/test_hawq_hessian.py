"""Hessian eigenvalues and traces against models whose Hessian is known exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quantized_inference_node.hawq.hessian import (
    HessianSettings,
    LayerNotInLossError,
    layer_curvatures,
)


def least_squares_problem(seed: int, n: int = 96, d: int = 12, k: int = 1):
    """Random X (n, d) with unequal column scales, targets Y (n, k), and batches of unequal size."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.linspace(0.5, 2.0, d)
    y = rng.normal(size=(n, k))
    return x.astype(np.float32), y.astype(np.float32)


def closures_for(weight: torch.Tensor, x: np.ndarray, y: np.ndarray, sizes: list[int]):
    """Mean-squared-error closures per batch for the linear model Y = X W^T."""
    closures, start = [], 0
    for size in sizes:
        xb = torch.from_numpy(x[start : start + size])
        yb = torch.from_numpy(y[start : start + size])
        closures.append(lambda xb=xb, yb=yb: F.mse_loss(xb @ weight.T, yb))
        start += size
    return closures


def test_least_squares_eigenvalue_and_trace_match_exact_hessian() -> None:
    # L = mean over n*k entries of (X W^T - Y)^2, so H = 2/(n k) * (I_k kron X^T X).
    x, y = least_squares_problem(seed=0, k=3)
    n, k = len(x), y.shape[1]
    gram = x.astype(np.float64).T @ x.astype(np.float64)
    exact_eigen = 2.0 / (n * k) * np.linalg.eigvalsh(gram).max()
    exact_trace = 2.0 / (n * k) * k * np.trace(gram)
    weight = torch.zeros(k, x.shape[1], requires_grad=True)
    sizes = [40, 32, 24]  # unequal batches: the average must weight them by size

    (curvature,) = layer_curvatures(
        closures_for(weight, x, y, sizes), sizes, [weight], ["linear"], HessianSettings(probes=100, seed=3)
    )

    # Required accuracy: 1 % on the eigenvalue and 5 % on the trace.
    np.testing.assert_allclose(curvature.top_eigenvalue, exact_eigen, rtol=0.01)
    np.testing.assert_allclose(curvature.trace, exact_trace, rtol=0.05)
    assert curvature.num_params == k * x.shape[1]
    assert curvature.converged


def test_two_layers_get_their_own_diagonal_blocks() -> None:
    # y = X1 a + X2 b: the blocks are 2 X1^T X1 / n and 2 X2^T X2 / n; cross terms are ignored.
    x1, y = least_squares_problem(seed=1, d=6)
    x2, _ = least_squares_problem(seed=2, d=9)
    n = len(y)
    a = torch.zeros(1, 6, requires_grad=True)
    b = torch.zeros(1, 9, requires_grad=True)
    tx1, tx2, ty = (torch.from_numpy(v) for v in (x1, x2, y))

    curvatures = layer_curvatures(
        [lambda: F.mse_loss(tx1 @ a.T + tx2 @ b.T, ty)], [n], [a, b], ["a", "b"], HessianSettings(probes=200)
    )

    for curvature, xi in zip(curvatures, (x1, x2), strict=True):
        gram = xi.astype(np.float64).T @ xi.astype(np.float64)
        np.testing.assert_allclose(
            curvature.top_eigenvalue, 2 / n * np.linalg.eigvalsh(gram).max(), rtol=0.01
        )
        np.testing.assert_allclose(curvature.trace, 2 / n * np.trace(gram), rtol=0.05)


def test_seeded_runs_repeat_exactly() -> None:
    x, y = least_squares_problem(seed=4)
    weight = torch.zeros(1, x.shape[1], requires_grad=True)
    settings = HessianSettings(probes=5, seed=11)

    first = layer_curvatures(closures_for(weight, x, y, [96]), [96], [weight], ["w"], settings)
    second = layer_curvatures(closures_for(weight, x, y, [96]), [96], [weight], ["w"], settings)

    assert first == second


def test_unused_layer_is_named() -> None:
    used = torch.ones(3, requires_grad=True)
    unused = torch.ones(4, requires_grad=True)
    x = torch.arange(3.0)

    with pytest.raises(LayerNotInLossError, match=r"\['head_unused'\] do not influence the loss"):
        layer_curvatures([lambda: (x * used).pow(2).sum()], [1], [used, unused], ["conv_used", "head_unused"])


def test_loss_linear_in_a_layer_gives_zero_curvature() -> None:
    # The loss is linear in w: its gradient has no graph, and the Hessian block is 0.
    w = torch.ones(5, requires_grad=True)
    x = torch.arange(5.0)

    (curvature,) = layer_curvatures([lambda: (x * w).sum()], [1], [w], ["linear"], HessianSettings(probes=2))

    assert curvature.trace == 0.0
    assert curvature.top_eigenvalue == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probes": 0}, "probes must be >= 1"),
        ({"max_iterations": 0}, "max_iterations must be >= 1"),
        ({"tolerance": 0.0}, r"tolerance must be in \(0, 1\)"),
    ],
)
def test_bad_settings_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HessianSettings(**kwargs)


def test_empty_calibration_set_is_rejected() -> None:
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="calibration set is empty"):
        layer_curvatures([], [], [w], ["w"])
