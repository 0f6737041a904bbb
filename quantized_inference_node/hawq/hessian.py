"""Per-layer Hessian curvature: top eigenvalue (power iteration) and trace (Hutchinson).

Both work on Hessian-vector products by double backpropagation,
H v = d(g . v)/dW with g = dL/dW built with ``create_graph=True``, so the
Hessian is never formed. Each layer's block H_i (the second derivatives with
respect to that layer's weight only) is analysed; cross-layer blocks are ignored,
as in HAWQ.

Traces are estimated jointly by default: one full Hessian-vector product per
probe, with a Rademacher vector v over all layers' weights at once, gives
v_i . (H v)_i for every layer i. Its mean is Tr(H_ii), since the cross terms
v_i . H_ij v_j (j != i) average to zero for independent probe entries, so the
estimate stays unbiased at the cost of one product per probe instead of one per
layer per probe; the cross terms only add variance, and on deep networks that
variance can swamp small layers' traces: on the PP-OCR detector, one layer's
trace is 1e4 times the others', and its cross terms make a third of the joint
estimates negative even with 64 probes. The per-layer estimator
(``TraceMethod.PER_LAYER``, the default) has no cross-layer variance.

``TraceMethod.GAUSS_NEWTON`` estimates the trace of the Gauss-Newton matrix
G = J^T H_out J (J the Jacobian of the outputs in the weights, H_out the loss
Hessian in the outputs) with output-space probes r, E[r r^T] = H_out: one
backward pass per probe gives J_i^T r for every layer at once, and
||J_i^T r||^2 estimates Tr(G_ii) with no cross-layer terms at all. For the
label-free distillation loss at the float weights the residual is zero, so G is
the Hessian exactly. With labels it is the usual positive semi-definite
approximation of it. It needs the model outputs and the output loss
(:class:`OutputLoss`).
Power iteration still needs one product per layer per step; skip it
(``eigenvalues=False``) when only traces are needed, as in HAWQ v2/v3's Omega.

The Hessian is the one of the calibration set's mean loss: each product is
summed over the calibration batches, weighted by batch size, and each batch's
graph is freed before the next one is built, so memory stays at one batch's
graph however many batches there are.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch
from tqdm import tqdm

LOGGER = logging.getLogger(__name__)

LossClosure = Callable[[], torch.Tensor]


class LayerNotInLossError(ValueError):
    """A layer's weight does not influence the loss, so it has no Hessian."""


class TraceMethod(str, Enum):
    """Estimator of the per-layer traces.

    PER_LAYER: one block Hessian-vector product per layer per probe (no cross-layer variance).
    JOINT: one full Hessian-vector product per probe serves all layers (cross-layer variance).
    GAUSS_NEWTON: one backward pass per output-space probe serves all layers; the
        Gauss-Newton matrix, which is the Hessian for distillation at the float weights.
    """

    PER_LAYER = "per_layer"
    JOINT = "joint"
    GAUSS_NEWTON = "gauss_newton"


class OutputLoss(str, Enum):
    """Loss on the model outputs, for the Gauss-Newton probes.

    MSE: mean of squared differences over all output entries, H_out = 2 I / M.
    SOFTMAX: mean over samples of cross-entropy or KL on softmax over axis 1 of (N, C)
        logits; H_out = (diag(p) - p p^T) / N, probed by r = onehot(y) - p with y ~ p.
    """

    MSE = "mse"
    SOFTMAX = "softmax"


@dataclass(frozen=True)
class HessianSettings:
    """Settings of the curvature estimates (one source of defaults for API and CLI).

    Attributes:
        max_iterations: Cap on power-iteration steps per layer.
        tolerance: Power iteration stops when the eigenvalue's relative change
            between two steps is below this.
        probes: Rademacher probes per batch for Hutchinson's trace estimate.
        seed: Seed of the random start vectors and probes.
        trace_method: Per-layer, joint or Gauss-Newton trace estimates (see TraceMethod).
        eigenvalues: Run the power iteration for the top eigenvalues (HAWQ v1's
            ordering and the fine-tuning order). Without it they are NaN, and the
            analysis costs only the trace probes.
    """

    max_iterations: int = 100
    tolerance: float = 1e-3
    probes: int = 50
    seed: int = 0
    trace_method: TraceMethod = TraceMethod.PER_LAYER
    eigenvalues: bool = True

    def __post_init__(self) -> None:
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")
        if not 0.0 < self.tolerance < 1.0:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")
        if self.probes < 1:
            raise ValueError(f"probes must be >= 1, got {self.probes}")
        try:
            object.__setattr__(self, "trace_method", TraceMethod(self.trace_method))
        except ValueError:
            choices = ", ".join(m.value for m in TraceMethod)
            raise ValueError(
                f"unknown trace_method {self.trace_method!r}; use one of {choices}"
            ) from None


class EigenEstimate(NamedTuple):
    """Result of one layer's power iteration."""

    eigenvalue: float
    iterations: int
    converged: bool


@dataclass(frozen=True)
class LayerCurvature:
    """Curvature of the loss with respect to one layer's weight.

    Attributes:
        name: Layer name.
        num_params: Number of weight entries n_i.
        top_eigenvalue: Eigenvalue of largest magnitude of the Hessian block (NaN
            when the power iteration was skipped).
        trace: Trace of the Hessian block (Hutchinson estimate).
        iterations: Power-iteration steps taken.
        converged: Whether the tolerance was met before the iteration cap.
    """

    name: str
    num_params: int
    top_eigenvalue: float
    trace: float
    iterations: int
    converged: bool

    @property
    def mean_eigenvalue(self) -> float:
        """HAWQ v1's ordering key, top eigenvalue / n_i."""
        return self.top_eigenvalue / self.num_params

    @property
    def mean_trace(self) -> float:
        """HAWQ v2/v3's sensitivity factor, Tr(H_i) / n_i."""
        return self.trace / self.num_params


def _first_order_grads(
    loss: torch.Tensor, weights: Sequence[torch.Tensor], names: Sequence[str]
) -> list[torch.Tensor | None]:
    """Return dL/dW_i with graph for each weight; None for a weight with a zero Hessian.

    Raises:
        LayerNotInLossError: naming the weights the loss does not depend on.
    """
    if not loss.requires_grad:
        raise LayerNotInLossError(
            f"the loss does not depend on any of the layers {list(names)}; "
            "check that the model's outputs are computed from them"
        )
    grads = torch.autograd.grad(loss, list(weights), create_graph=True, allow_unused=True)
    missing = [name for name, g in zip(names, grads, strict=True) if g is None]
    if missing:
        raise LayerNotInLossError(
            f"layers {missing} do not influence the loss (their outputs never reach the "
            "model outputs); remove them from the model or from the analysed layers"
        )
    # A gradient without a graph means the loss is linear in that weight: its Hessian is 0.
    return [g if g.requires_grad else None for g in grads]


def _block_hvp(grad: torch.Tensor | None, weight: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Return H_ii v for one layer from its first-order gradient with graph."""
    if grad is None:
        return torch.zeros_like(v)
    (hv,) = torch.autograd.grad(grad, weight, grad_outputs=v, retain_graph=True, allow_unused=True)
    return torch.zeros_like(v) if hv is None else hv.detach()


def _normalized_weights(batch_sizes: Sequence[int]) -> list[float]:
    total = float(sum(batch_sizes))
    if total <= 0:
        raise ValueError("the calibration set is empty; give at least one sample")
    return [size / total for size in batch_sizes]


def top_eigenvalues(
    losses: Sequence[LossClosure],
    batch_sizes: Sequence[int],
    weights: Sequence[torch.Tensor],
    names: Sequence[str],
    settings: HessianSettings,
    show_progress: bool = False,
) -> list[EigenEstimate]:
    """Top eigenvalue of each layer's Hessian block by power iteration.

    All layers iterate together so each batch's graph serves every layer that
    has not converged yet.

    Args:
        losses: One closure per calibration batch returning that batch's mean loss.
        batch_sizes: Samples per batch, to weight the batches.
        weights: The layers' weight tensors (requires_grad).
        names: Layer names for messages.
        settings: Iteration cap, tolerance and seed.
        show_progress: Show a tqdm bar over iterations and batches.

    Returns:
        One EigenEstimate per layer.

    Raises:
        LayerNotInLossError: when a layer does not reach the loss.
        ValueError: when the calibration set is empty.
    """
    batch_weights = _normalized_weights(batch_sizes)
    generator = torch.Generator().manual_seed(settings.seed)
    vectors = []
    for w in weights:
        v = torch.randn(w.shape, generator=generator, dtype=w.dtype)
        vectors.append(v / v.norm())
    eigen = [math.nan] * len(weights)
    steps = [0] * len(weights)
    done = [False] * len(weights)

    bar = tqdm(
        total=settings.max_iterations * len(losses),
        desc="Hessian eigenvalues",
        unit="batch",
        disable=not show_progress,
    )
    for _ in range(settings.max_iterations):
        active = [i for i, finished in enumerate(done) if not finished]
        if not active:
            break

        # One Hessian-vector product per active layer, summed over the batches.
        products = [torch.zeros_like(vectors[i]) for i in active]
        for loss_fn, bw in zip(losses, batch_weights, strict=True):
            grads = _first_order_grads(loss_fn(), weights, names)
            for k, i in enumerate(active):
                products[k] += bw * _block_hvp(grads[i], weights[i], vectors[i])
            del grads
            bar.update(1)

        # Rayleigh quotient, then the next direction.
        for k, i in enumerate(active):
            hv = products[k]
            new = float((hv * vectors[i]).sum())
            steps[i] += 1
            previous = eigen[i]
            eigen[i] = new
            norm = float(hv.norm())
            if norm == 0.0:
                done[i] = True
                continue
            vectors[i] = hv / norm
            if not math.isnan(previous) and abs(new - previous) <= settings.tolerance * (
                abs(previous) + 1e-30
            ):
                done[i] = True
    bar.close()

    results = []
    for i, name in enumerate(names):
        converged = done[i]
        if not converged:
            LOGGER.warning(
                "power iteration for layer %s did not converge in %d steps; "
                "its eigenvalue %.4g is approximate (raise the iteration cap)",
                name,
                settings.max_iterations,
                eigen[i],
            )
        results.append(EigenEstimate(eigen[i], steps[i], converged))
    return results


def hutchinson_traces(
    losses: Sequence[LossClosure],
    batch_sizes: Sequence[int],
    weights: Sequence[torch.Tensor],
    names: Sequence[str],
    settings: HessianSettings,
    show_progress: bool = False,
) -> list[float]:
    """Trace of each layer's Hessian block, E[v^T H v] over Rademacher probes v.

    With ``TraceMethod.PER_LAYER`` each probe is a per-layer product H_ii v_i, so
    the estimate has no cross-layer noise. With ``TraceMethod.JOINT`` one product
    H v over all layers serves every layer (see the module docstring).

    Args: as in :func:`top_eigenvalues`.

    Returns:
        The trace estimate per layer.

    Raises:
        LayerNotInLossError: when a layer does not reach the loss.
        ValueError: when the calibration set is empty.
    """
    batch_weights = _normalized_weights(batch_sizes)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    traces = [0.0] * len(weights)

    bar = tqdm(total=len(losses), desc="Hessian traces", unit="batch", disable=not show_progress)
    for loss_fn, bw in zip(losses, batch_weights, strict=True):
        grads = _first_order_grads(loss_fn(), weights, names)
        if settings.trace_method is TraceMethod.JOINT:
            for i, value in enumerate(_joint_probe_means(grads, weights, settings.probes, generator)):
                traces[i] += bw * value
            del grads
            bar.update(1)
            continue
        for i, w in enumerate(weights):
            total = 0.0
            for _ in range(settings.probes):
                v = torch.randint(0, 2, w.shape, generator=generator).to(w.dtype) * 2 - 1
                total += float((_block_hvp(grads[i], w, v) * v).sum())
            traces[i] += bw * total / settings.probes
        del grads
        bar.update(1)
    bar.close()
    return traces


def _joint_probe_means(
    grads: Sequence[torch.Tensor | None],
    weights: Sequence[torch.Tensor],
    probes: int,
    generator: torch.Generator,
) -> list[float]:
    """Return the mean over PROBES of v_i . (H v)_i per layer, one full product per probe.

    Layers whose gradient has no graph (zero Hessian) are left out of the product
    and get 0.
    """
    curved = [i for i, g in enumerate(grads) if g is not None]
    sums = [0.0] * len(weights)
    if not curved:
        return sums
    for _ in range(probes):
        # Probes for every layer keep the random stream independent of which layers are curved.
        vectors = [torch.randint(0, 2, w.shape, generator=generator).to(w.dtype) * 2 - 1 for w in weights]
        products = torch.autograd.grad(
            [grads[i] for i in curved],
            [weights[i] for i in curved],
            grad_outputs=[vectors[i] for i in curved],
            retain_graph=True,
            allow_unused=True,
        )
        for i, hv in zip(curved, products, strict=True):
            if hv is not None:
                sums[i] += float((hv.detach() * vectors[i]).sum())
    return [total / probes for total in sums]


def gauss_newton_traces(
    outputs: Sequence[LossClosure],
    batch_sizes: Sequence[int],
    weights: Sequence[torch.Tensor],
    names: Sequence[str],
    settings: HessianSettings,
    output_loss: OutputLoss | str = OutputLoss.MSE,
    show_progress: bool = False,
) -> list[float]:
    """Trace of each layer's Gauss-Newton block, E[||J_i^T r||^2] over output probes r.

    Args:
        outputs: One closure per calibration batch returning the model's output
            (the tensor the loss compares).
        batch_sizes: Samples per batch, to weight the batches.
        weights: The layers' weight tensors (requires_grad).
        names: Layer names for messages.
        settings: Probes and seed.
        output_loss: The loss on the outputs (see OutputLoss).
        show_progress: Show a tqdm bar over batches.

    Returns:
        The trace estimate per layer.

    Raises:
        LayerNotInLossError: when a layer does not reach the outputs.
        ValueError: when the set is empty, or SOFTMAX is asked for outputs that are not (N, C).
    """
    output_loss = OutputLoss(output_loss)
    batch_weights = _normalized_weights(batch_sizes)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    traces = [0.0] * len(weights)

    bar = tqdm(total=len(outputs), desc="Gauss-Newton traces", unit="batch", disable=not show_progress)
    for output_fn, bw in zip(outputs, batch_weights, strict=True):
        y = output_fn()
        if not y.requires_grad:
            raise LayerNotInLossError(f"the outputs do not depend on any of the layers {list(names)}")
        if output_loss is OutputLoss.SOFTMAX and y.ndim != 2:
            raise ValueError(f"softmax Gauss-Newton probes need (N, C) logits, got shape {tuple(y.shape)}")
        for _ in range(settings.probes):
            probe, factor = _output_probe(y.detach(), output_loss, generator)
            grads = torch.autograd.grad(
                y, list(weights), grad_outputs=probe, retain_graph=True, allow_unused=True
            )
            missing = [name for name, g in zip(names, grads, strict=True) if g is None]
            if missing:
                raise LayerNotInLossError(
                    f"layers {missing} do not influence the loss (their outputs never reach the "
                    "model outputs); remove them from the model or from the analysed layers"
                )
            for i, g in enumerate(grads):
                traces[i] += bw * factor * float((g.detach().double() ** 2).sum()) / settings.probes
        del y
        bar.update(1)
    bar.close()
    return traces


def _output_probe(
    y: torch.Tensor, output_loss: OutputLoss, generator: torch.Generator
) -> tuple[torch.Tensor, float]:
    """Return a probe r with E[r r^T] proportional to H_out, and the factor making it equal."""
    if output_loss is OutputLoss.MSE:
        probe = torch.randint(0, 2, y.shape, generator=generator).to(y.dtype) * 2 - 1
        return probe, 2.0 / y.numel()
    p = torch.softmax(y.double(), dim=1)
    drawn = torch.multinomial(p, 1, generator=generator)
    onehot = torch.zeros_like(p).scatter_(1, drawn, 1.0)
    return (onehot - p).to(y.dtype), 1.0 / y.shape[0]


def layer_curvatures(
    losses: Sequence[LossClosure],
    batch_sizes: Sequence[int],
    weights: Sequence[torch.Tensor],
    names: Sequence[str],
    settings: HessianSettings | None = None,
    show_progress: bool = False,
    outputs: Sequence[LossClosure] | None = None,
    output_loss: OutputLoss | str = OutputLoss.MSE,
) -> list[LayerCurvature]:
    """Top eigenvalue and trace of every layer's Hessian block.

    Args: as in :func:`top_eigenvalues`; settings defaults to HessianSettings().
        outputs and output_loss are needed by ``TraceMethod.GAUSS_NEWTON`` only
        (see :func:`gauss_newton_traces`).

    Raises:
        LayerNotInLossError: when a layer does not reach the loss.
        ValueError: when names and weights differ in length, the set is empty, or the
            Gauss-Newton traces lack the output closures.
    """
    settings = settings or HessianSettings()
    if len(names) != len(weights):
        raise ValueError(f"{len(names)} names for {len(weights)} weights")
    if len(losses) != len(batch_sizes):
        raise ValueError(f"{len(losses)} loss closures for {len(batch_sizes)} batch sizes")

    if settings.eigenvalues:
        eigen = top_eigenvalues(losses, batch_sizes, weights, names, settings, show_progress)
    else:
        eigen = [EigenEstimate(math.nan, 0, False)] * len(weights)
    if settings.trace_method is TraceMethod.GAUSS_NEWTON:
        if outputs is None or len(outputs) != len(batch_sizes):
            raise ValueError(
                "gauss_newton traces need one output closure per batch (outputs=...); "
                "or use trace_method per_layer"
            )
        traces = gauss_newton_traces(
            outputs, batch_sizes, weights, names, settings, output_loss, show_progress
        )
    else:
        traces = hutchinson_traces(losses, batch_sizes, weights, names, settings, show_progress)

    return [
        LayerCurvature(
            name=name,
            num_params=int(w.numel()),
            top_eigenvalue=ev,
            trace=tr,
            iterations=it,
            converged=conv,
        )
        for name, w, (ev, it, conv), tr in zip(names, weights, eigen, traces, strict=True)
    ]
