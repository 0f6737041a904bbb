"""Per-layer, per-bit-width sensitivity Omega_i(b) of HAWQ v2/v3.

Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2 is the second-order estimate
of the loss increase when layer i's weights are quantized to b bits; the bit
allocation minimises its sum. HAWQ v1's ordering key, lambda_i / n_i, is kept for
the report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .fake_quant import WeightClipping, storage_bits, weight_block_size, weight_quantization_error
from .hessian import LayerCurvature


@dataclass(frozen=True)
class LayerSensitivity:
    """Sensitivity of one layer to weight quantization.

    Attributes:
        name: Layer name.
        num_params: Number of weight entries n_i.
        top_eigenvalue: Top Hessian eigenvalue lambda_i.
        trace: Hessian trace Tr(H_i).
        quant_error: ||Q_b(W_i) - W_i||^2 per bit width b.
        omega: Omega_i(b) = Tr(H_i)/n_i * quant_error[b] per bit width b.
        storage_bits: Stored bits per weight at each bit width b: b, plus the share of
            the block scales where the layer is quantized per block (empty means b).
    """

    name: str
    num_params: int
    top_eigenvalue: float
    trace: float
    quant_error: dict[int, float]
    omega: dict[int, float]
    storage_bits: dict[int, float] = field(default_factory=dict)

    @property
    def v1_key(self) -> float:
        """HAWQ v1's ordering key lambda_i / n_i (larger means more sensitive)."""
        return self.top_eigenvalue / self.num_params

    def finetune_key(self, bits: int) -> float:
        """HAWQ v1's fine-tuning order key lambda_i * ||Q_b(W_i) - W_i||^2.

        Without eigenvalues (skipped in the analysis) the mean eigenvalue
        Tr(H_i) / n_i replaces lambda_i, which gives Omega_i(b).
        """
        if math.isnan(self.top_eigenvalue):
            return self.omega[bits]
        return self.top_eigenvalue * self.quant_error[bits]


def layer_sensitivities(
    curvatures: Sequence[LayerCurvature],
    weights: Sequence[torch.Tensor],
    channel_axes: Sequence[int],
    bit_widths: Sequence[int],
    clipping: WeightClipping | str = WeightClipping.MAX_ABS,
    block_size: int | None = None,
) -> list[LayerSensitivity]:
    """Return Omega_i(b) for every layer and candidate bit width.

    Args:
        curvatures: Hessian eigenvalue and trace per layer.
        weights: The layers' float weights, in the same order.
        channel_axes: Output-channel axis of each weight (per-channel scales).
        bit_widths: Candidate weight bit widths, each in 2..8.
        clipping: How the weight scales are chosen (the export must use the same).
        block_size: Input channels per weight scale below 8 bits (None: per channel).

    Raises:
        ValueError: when the sequences differ in length or a bit width is out of range.
    """
    if not len(curvatures) == len(weights) == len(channel_axes):
        raise ValueError(
            f"{len(curvatures)} curvatures, {len(weights)} weights and "
            f"{len(channel_axes)} channel axes must match"
        )

    result = []
    for curvature, weight, axis in zip(curvatures, weights, channel_axes, strict=True):
        errors = {b: weight_quantization_error(weight, b, axis, clipping, block_size) for b in bit_widths}
        shape = tuple(weight.shape)
        storage = {b: storage_bits(b, weight_block_size(shape, axis, b, block_size)) for b in bit_widths}
        result.append(
            LayerSensitivity(
                name=curvature.name,
                num_params=curvature.num_params,
                top_eigenvalue=curvature.top_eigenvalue,
                trace=curvature.trace,
                quant_error=errors,
                omega={b: curvature.mean_trace * e for b, e in errors.items()},
                storage_bits=storage,
            )
        )
    return result
