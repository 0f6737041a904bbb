"""Per-tensor activation precision: which activation tensors stay float (HAWQ-V2).

Each uint8 activation tensor a adds rounding noise of variance scale_a^2 / 12 per
entry. To second order the loss then grows by Tr(H_a) * scale_a^2 / 12 / 2, where
H_a is the Hessian of the loss with respect to that tensor. The score
Tr(H_a) * scale_a^2 / 12 therefore ranks the tensors by the loss increase that
quantizing each one alone causes. The tensors with the largest scores are the ones
worth keeping in float.

The traces come from one Hutchinson product per probe over all tensors at once: a
zero perturbation is added to every named tensor, the loss is differentiated twice
with respect to all perturbations, and v_a . (H v)_a estimates Tr(H_a) for each a;
the cross terms have zero mean under independent Rademacher probes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import onnx
import torch

from .fake_quant import ActivationQParams
from .onnx_to_torch import OnnxGraphModule

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActivationSensitivity:
    """Second-order sensitivity of the loss to one activation tensor's quantization.

    Attributes:
        name: Tensor name in the ONNX graph.
        trace: Hutchinson estimate of Tr(H_a), summed over the tensor's entries per sample.
        scale: uint8 quantization step of the tensor.
        score: Tr(H_a) * scale^2 / 12, the expected loss increase (up to a factor 1/2).
    """

    name: str
    trace: float
    scale: float
    score: float


def activation_traces(
    module: OnnxGraphModule,
    losses: Sequence[Callable[[], torch.Tensor]],
    batch_sizes: Sequence[int],
    tensor_names: Sequence[str],
    probes: int,
    seed: int,
) -> dict[str, float]:
    """Return Tr(d^2 L / d a^2) for each named activation tensor a, averaged over batches.

    Args:
        module: The converted model the loss closures run.
        losses: One closure per calibration batch returning that batch's mean loss.
        batch_sizes: Samples per batch, to weight the batches.
        tensor_names: Activation tensors to analyse.
        probes: Rademacher probes per batch.
        seed: Seed of the probes.

    Returns:
        The trace estimate per tensor; 0 for a tensor the loss does not depend on
        (or depends on linearly).

    Raises:
        ValueError: when probes < 1, the batches are empty, or a name is not a tensor
            the model computes.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    total = float(sum(batch_sizes))
    if total <= 0 or len(losses) != len(batch_sizes):
        raise ValueError(f"{len(losses)} loss closures for batch sizes {list(batch_sizes)}")
    generator = torch.Generator().manual_seed(seed)
    traces = dict.fromkeys(tensor_names, 0.0)
    names = list(tensor_names)

    for loss_fn, size in zip(losses, batch_sizes, strict=True):
        perturbations: dict[str, torch.Tensor] = {}
        module.set_activation_transform({n: partial(_add_zero_perturbation, perturbations, n) for n in names})
        try:
            loss = loss_fn()
            missing = [n for n in names if n not in perturbations]
            if missing:
                raise ValueError(
                    f"activation tensors {missing[:5]} are not computed by the model; "
                    "name tensors of the ONNX graph"
                )
            leaves = [perturbations[n] for n in names]
            gradients = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            curved = [i for i, g in enumerate(gradients) if g is not None and g.requires_grad]
            for _ in range(probes):
                vectors = [
                    torch.randint(0, 2, leaf.shape, generator=generator).to(leaf.dtype) * 2 - 1
                    for leaf in leaves
                ]
                if not curved:
                    continue
                products = torch.autograd.grad(
                    [gradients[i] for i in curved],
                    [leaves[i] for i in curved],
                    grad_outputs=[vectors[i] for i in curved],
                    retain_graph=True,
                    allow_unused=True,
                )
                for i, product in zip(curved, products, strict=True):
                    if product is not None:
                        value = float((product.detach() * vectors[i]).sum())
                        traces[names[i]] += value / probes * size / total
        finally:
            module.set_activation_transform(None)
    return traces


def _add_zero_perturbation(store: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Return TENSOR plus a zero leaf tensor, kept in STORE under NAME for autograd."""
    store[name] = torch.zeros_like(tensor, requires_grad=True)
    return tensor + store[name]


def rank_activations(
    traces: Mapping[str, float], qparams: Mapping[str, ActivationQParams]
) -> list[ActivationSensitivity]:
    """Return each tensor's sensitivity, the largest score Tr(H_a) * scale^2 / 12 first."""
    rows = [
        ActivationSensitivity(name, trace, qparams[name].scale, trace * qparams[name].scale ** 2 / 12)
        for name, trace in traces.items()
    ]
    return sorted(rows, key=lambda row: row.score, reverse=True)


def select_float_activations(
    ranking: Sequence[ActivationSensitivity], count: int = 0, budget: float | None = None
) -> list[str]:
    """Return the top-ranked tensors to keep in float.

    Args:
        ranking: Sensitivities, largest score first (from :func:`rank_activations`).
        count: Keep at least the top COUNT tensors in float.
        budget: If given, also keep top tensors in float until the summed score of the
            tensors still quantized is at most BUDGET times the total score (0: all float).

    Raises:
        ValueError: when count < 0 or budget is outside [0, 1].
    """
    if count < 0:
        raise ValueError(f"the number of float activations must be >= 0, got {count}")
    if budget is not None and not 0.0 <= budget <= 1.0:
        raise ValueError(f"the activation error budget must be in [0, 1], got {budget}")
    chosen = min(count, len(ranking))
    if budget is not None:
        scores = [max(row.score, 0.0) for row in ranking]
        remaining, limit = sum(scores), budget * sum(scores)
        by_budget = 0
        while by_budget < len(ranking) and remaining > limit:
            remaining -= scores[by_budget]
            by_budget += 1
        chosen = max(chosen, by_budget)
    return [row.name for row in ranking[:chosen]]


def check_activation_names(names: Sequence[str], qparams: Mapping[str, ActivationQParams]) -> None:
    """Check that every name is a quantized activation tensor.

    Raises:
        ValueError: naming the unknown tensors and a few valid ones.
    """
    unknown = [name for name in names if name not in qparams]
    if unknown:
        examples = ", ".join(sorted(qparams)[:5])
        raise ValueError(
            f"float activations {unknown} are not quantized activation tensors of the model; "
            f"choose among its {len(qparams)} quantized tensors (e.g. {examples}) or see report.json"
        )


def without_float_activations(
    qparams: Mapping[str, ActivationQParams], float_names: Sequence[str], model: onnx.ModelProto
) -> dict[str, ActivationQParams]:
    """Return QPARAMS without the float tensors and their pass-through copies.

    A pass-through node (MaxPool, Reshape, ...) copies its input's parameters to its
    output. Quantizing that output would reintroduce the noise the float input avoids,
    so a copy with the same parameters stays float too.
    """
    protected = set(float_names)
    quantized = {name: params for name, params in qparams.items() if name not in protected}
    changed = True
    while changed:
        changed = False
        for node in model.graph.node:
            if not node.input or node.input[0] not in protected:
                continue
            for output in node.output:
                if output in quantized and qparams.get(node.input[0]) == quantized[output]:
                    quantized.pop(output)
                    protected.add(output)
                    changed = True
    return quantized
