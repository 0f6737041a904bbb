"""Quantizers shared by the analysis (torch) and the ONNX export (numpy).

Weights are quantized symmetrically per output channel with a narrow range,
q in [-(2^(b-1) - 1), 2^(b-1) - 1], zero point 0; a 2-bit weight therefore takes
the three values {-1, 0, 1} times its channel scale. Activations are quantized
to 8 bits, always as uint8: onnxruntime on x86 only fuses QDQ pairs into integer
kernels for uint8 activations, so a tensor that can be negative gets an
asymmetric uint8 range with a zero point, and a non-negative tensor (after ReLU)
gets zero point 0, which also reproduces the ReLU's clamp exactly.

Weight scales of 2-, 3- and 4-bit layers come from MSE clipping by default: per
channel, the clipping range is the ratio of the largest magnitude (from a small
grid) that minimises ||Q(W) - W||^2. With few levels, max-abs scaling spends them
on rare large weights and rounds the bulk to zero; a narrower range trades some
clipping error on those for finer steps on the rest. 8-bit scales stay max-abs.

Optionally, weights below 8 bits get one scale per block of ``block_size``
consecutive input channels (at each output channel and kernel position) instead of
one per output channel: the layout of DequantizeLinear's blocked quantization
(opset 21). Each fp32 scale then costs 32 / block_size bits per weight, which the
bit allocation counts (see :func:`storage_bits`). A weight whose input-channel
count the block size does not divide keeps per-channel scales.

The numpy and torch versions compute the same numbers, so the torch fake-quant
model predicts what onnxruntime computes on the exported QDQ model.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

ACTIVATION_QMIN = 0
ACTIVATION_QMAX = 255
# A scale below this would divide by (almost) zero for an all-zero channel.
MIN_SCALE = 1e-12


#: Clip ratios (of each channel's largest magnitude) tried by MSE clipping.
CLIP_RATIOS = tuple(float(r) for r in np.round(np.linspace(1.0, 0.2, 17), 4))
#: Widest weight grid that gets MSE clipping; wider grids use max-abs scales.
MSE_CLIPPING_MAX_BITS = 4
#: Bits of one stored weight scale (float32).
SCALE_BITS = 32


class WeightClipping(str, Enum):
    """Method of choosing a weight channel's quantization range.

    MAX_ABS: the channel's largest magnitude maps to the largest level.
    MSE: for 2..4 bits, the ratio from CLIP_RATIOS minimising the channel's squared
    rounding plus clipping error; max-abs for wider grids.
    """

    MAX_ABS = "max_abs"
    MSE = "mse"


class RangeMethod(str, Enum):
    """Method of taking an activation range from calibration data."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"


def block_axis(weight_ndim: int, channel_axis: int) -> int:
    """Return the input-channel axis of a weight whose output-channel axis is CHANNEL_AXIS.

    Conv and transposed-Gemm weights have output channels first and input channels
    second; ConvTranspose and MatMul weights the other way round.
    """
    return 1 if channel_axis % weight_ndim == 0 else 0


def weight_block_size(
    shape: tuple[int, ...], channel_axis: int, bits: int, block_size: int | None
) -> int | None:
    """Return the block size a weight of SHAPE gets at BITS, or None for per-channel scales.

    Blocks apply below 8 bits, to weights of two or more dimensions whose input-channel
    count BLOCK_SIZE divides.
    """
    if block_size is None or bits >= 8 or len(shape) < 2:
        return None
    channels = shape[block_axis(len(shape), channel_axis)]
    return block_size if channels % block_size == 0 else None


def storage_bits(bits: int, block_size: int | None) -> float:
    """Return the stored bits per weight: BITS, plus the block scales' share when blocked."""
    return bits + SCALE_BITS / block_size if block_size else float(bits)


def weight_qmax(bits: int) -> int:
    """Return the largest quantized magnitude of a symmetric narrow-range weight."""
    if bits < 2 or bits > 8:
        raise ValueError(f"weight bits must be between 2 and 8, got {bits}")
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class WeightQuantization:
    """A symmetric weight quantization, per channel or per block.

    Attributes:
        q: Integer weights, same shape as the float weight, int8 dtype.
        scale: float32 scales: shape (channels,) per channel; per block, the weight's
            shape with the input-channel axis divided by block_size.
        axis: DequantizeLinear's axis: the output-channel axis per channel, the
            input-channel axis per block.
        bits: Bit width the integer values fit in.
        block_size: Input channels per scale, or None for per-channel scales.
    """

    q: np.ndarray
    scale: np.ndarray
    axis: int
    bits: int
    block_size: int | None = None

    def dequantize(self) -> np.ndarray:
        """Return the float32 weight the integers stand for."""
        return self.q.astype(np.float32) * _expand_scales(self.scale, self.q.ndim, self.axis, self.block_size)


def _expand_scales(scale: np.ndarray, ndim: int, axis: int, block_size: int | None) -> np.ndarray:
    """Return SCALE broadcastable to the weight: per-channel scales reshaped, block scales repeated."""
    if block_size is None:
        shape = [1] * ndim
        shape[axis] = -1
        return scale.reshape(shape)
    return np.repeat(scale, block_size, axis=axis)


def _scale_rows(weight: np.ndarray, axis: int, block_size: int | None) -> tuple[np.ndarray, tuple[int, ...]]:
    """Return the weight as rows that share one scale, and the scale tensor's shape.

    Per channel, a row is one output channel. Per block, a row is block_size
    consecutive input channels at one position of the other axes.
    """
    if block_size is None:
        rows = np.moveaxis(weight, axis, 0)
        return rows.reshape(rows.shape[0], -1), (weight.shape[axis],)
    moved = np.moveaxis(weight, axis, -1)
    blocks = moved.reshape(*moved.shape[:-1], moved.shape[-1] // block_size, block_size)
    scale_shape = list(weight.shape)
    scale_shape[axis] //= block_size
    return blocks.reshape(-1, block_size), tuple(scale_shape)


def _rows_to_scale_tensor(
    row_scales: np.ndarray, weight_shape: tuple[int, ...], axis: int, block_size: int | None
) -> np.ndarray:
    """Arrange per-row scales (from _scale_rows) as the scale tensor."""
    if block_size is None:
        return row_scales
    moved_shape = [d for i, d in enumerate(weight_shape) if i != axis] + [weight_shape[axis] // block_size]
    return np.moveaxis(row_scales.reshape(moved_shape), -1, axis)


def weight_scales(
    weight: np.ndarray,
    bits: int,
    axis: int,
    clipping: WeightClipping | str = WeightClipping.MAX_ABS,
    block_size: int | None = None,
) -> np.ndarray:
    """Return the scales (float32) of a symmetric weight grid, per channel or per block.

    The numpy and torch quantizers both take their scales from here, so the
    exported integers and the torch emulation use identical grids.

    Args:
        weight: Float weight.
        bits: Bit width, 2..8.
        axis: Output-channel axis per channel; input-channel axis per block.
        clipping: Max-abs or MSE scales.
        block_size: Input channels per scale, or None for one scale per output channel.

    Raises:
        ValueError: when bits is outside 2..8, axis is not an axis of weight, the
            block size does not divide that axis, or the clipping method is unknown.
    """
    if not -weight.ndim <= axis < weight.ndim:
        raise ValueError(f"channel axis {axis} is not an axis of a {weight.ndim}-D weight")
    try:
        clipping = WeightClipping(clipping)
    except ValueError:
        choices = ", ".join(c.value for c in WeightClipping)
        raise ValueError(f"unknown weight clipping {clipping!r}; use one of {choices}") from None
    qmax = weight_qmax(bits)
    axis = axis % weight.ndim
    if block_size is not None and (block_size < 1 or weight.shape[axis] % block_size):
        raise ValueError(
            f"invalid block size {block_size} for the {weight.shape[axis]} channels of axis {axis}: "
            "use a size >= 1 that divides them, or None for per-channel scales"
        )
    rows, _ = _scale_rows(np.asarray(weight, dtype=np.float32), axis, block_size)
    return _rows_to_scale_tensor(_row_scales(rows, qmax, bits, clipping), weight.shape, axis, block_size)


def _row_scales(rows: np.ndarray, qmax: int, bits: int, clipping: WeightClipping) -> np.ndarray:
    """Return one scale per row of ROWS: max-abs, or MSE clipping where it applies."""
    absmax = np.abs(rows).max(axis=1)
    scale = np.maximum(absmax / qmax, MIN_SCALE).astype(np.float32)
    if clipping is WeightClipping.MAX_ABS or bits > MSE_CLIPPING_MAX_BITS:
        return scale

    # Grid search per channel; ties keep the wider range (ratios run from 1 down).
    best_error = _rounding_error(rows, scale, qmax)
    for ratio in CLIP_RATIOS[1:]:
        candidate = np.maximum(absmax * np.float32(ratio) / qmax, MIN_SCALE).astype(np.float32)
        error = _rounding_error(rows, candidate, qmax)
        better = error < best_error
        scale = np.where(better, candidate, scale)
        best_error = np.where(better, error, best_error)
    return scale


def _rounding_error(rows: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Return ||Q(w) - w||^2 per row (channel) for the given scales, in float64."""
    q = np.clip(np.round(rows / scale[:, None]), -qmax, qmax)
    return ((q * scale[:, None] - rows).astype(np.float64) ** 2).sum(axis=1)


def quantize_weight_np(
    weight: np.ndarray,
    bits: int,
    axis: int,
    clipping: WeightClipping | str = WeightClipping.MAX_ABS,
    block_size: int | None = None,
) -> WeightQuantization:
    """Quantize a float weight symmetrically, per output channel or per block.

    Args:
        weight: Float weight.
        bits: Bit width, 2..8.
        axis: Output-channel axis.
        clipping: MAX_ABS (default) or MSE scales (MSE applies to 4 bits and fewer).
        block_size: Input channels per scale below 8 bits, where it divides their
            count (see :func:`weight_block_size`); None for per-channel scales.

    Raises:
        ValueError: when bits is outside 2..8, axis is not an axis of weight, or the
            clipping method is unknown.
    """
    scale, scale_axis, block = _scales_for(weight, bits, axis, clipping, block_size)
    qmax = weight_qmax(bits)

    expanded = _expand_scales(scale, weight.ndim, scale_axis, block)
    q = np.clip(np.round(weight / expanded), -qmax, qmax).astype(np.int8)
    return WeightQuantization(q=q, scale=scale, axis=scale_axis, bits=bits, block_size=block)


def _scales_for(
    weight: np.ndarray, bits: int, axis: int, clipping: WeightClipping | str, block_size: int | None
) -> tuple[np.ndarray, int, int | None]:
    """Return (scales, their DequantizeLinear axis, the block size or None) for a weight."""
    if not -weight.ndim <= axis < weight.ndim:
        raise ValueError(f"channel axis {axis} is not an axis of a {weight.ndim}-D weight")
    axis = axis % weight.ndim
    block = weight_block_size(tuple(weight.shape), axis, bits, block_size)
    scale_axis = axis if block is None else block_axis(weight.ndim, axis)
    return weight_scales(weight, bits, scale_axis, clipping, block), scale_axis, block


class _RoundSTE(torch.autograd.Function):
    """Rounding whose gradient is the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def fake_quantize_weight(
    weight: torch.Tensor,
    bits: int,
    axis: int,
    clipping: WeightClipping | str = WeightClipping.MAX_ABS,
    block_size: int | None = None,
) -> torch.Tensor:
    """Return Q_b(weight) as float, symmetric per channel or per block, with a straight-through gradient.

    The scale is computed from the detached weight (by :func:`weight_scales`, as in
    the export) so that quantization-aware fine-tuning moves the weights, not the grid.
    Arguments as in :func:`quantize_weight_np`.
    """
    qmax = weight_qmax(bits)
    scale, scale_axis, block = _scales_for(
        weight.detach().float().cpu().numpy(), bits, axis, clipping, block_size
    )
    expanded = torch.from_numpy(_expand_scales(scale, weight.ndim, scale_axis, block)).to(weight.dtype)

    q = torch.clamp(_RoundSTE.apply(weight / expanded), -qmax, qmax)
    return q * expanded


def weight_quantization_error(
    weight: torch.Tensor,
    bits: int,
    axis: int,
    clipping: WeightClipping | str = WeightClipping.MAX_ABS,
    block_size: int | None = None,
) -> float:
    """Return ||Q_b(W) - W||^2, the squared Frobenius norm of the quantization error."""
    with torch.no_grad():
        return float(((fake_quantize_weight(weight, bits, axis, clipping, block_size) - weight) ** 2).sum())


@dataclass(frozen=True)
class ActivationQParams:
    """uint8 affine quantization of one activation tensor: x = scale * (q - zero_point)."""

    scale: float
    zero_point: int

    @property
    def rmin(self) -> float:
        """Smallest float value the grid represents."""
        return self.scale * (ACTIVATION_QMIN - self.zero_point)

    @property
    def rmax(self) -> float:
        """Largest float value the grid represents."""
        return self.scale * (ACTIVATION_QMAX - self.zero_point)


def activation_qparams(rmin: float, rmax: float) -> ActivationQParams:
    """Return uint8 parameters covering [rmin, rmax], widened to include 0.

    Zero must be exactly representable (zero padding and ReLU outputs); for a
    non-negative range this gives zero point 0.

    Raises:
        ValueError: when rmin or rmax is not finite or rmin > rmax.
    """
    if not (np.isfinite(rmin) and np.isfinite(rmax)):
        raise ValueError(f"activation range [{rmin}, {rmax}] is not finite; check the calibration data")
    if rmin > rmax:
        raise ValueError(f"activation range has rmin {rmin} > rmax {rmax}")

    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    scale = (rmax - rmin) / (ACTIVATION_QMAX - ACTIVATION_QMIN)
    if scale < MIN_SCALE:
        return ActivationQParams(scale=1.0, zero_point=0)
    scale = float(np.float32(scale))
    zero_point = int(np.clip(round(ACTIVATION_QMIN - rmin / scale), ACTIVATION_QMIN, ACTIVATION_QMAX))
    return ActivationQParams(scale=scale, zero_point=zero_point)


def fake_quantize_activation(x: torch.Tensor, qparams: ActivationQParams) -> torch.Tensor:
    """Return the uint8 fake-quantized activation (QuantizeLinear then DequantizeLinear).

    Rounding is half to even, as in onnxruntime's QuantizeLinear; the gradient is
    straight-through inside the range and zero outside it.
    """
    scale = torch.tensor(qparams.scale, dtype=x.dtype)
    q = torch.clamp(_RoundSTE.apply(x / scale) + qparams.zero_point, ACTIVATION_QMIN, ACTIVATION_QMAX)
    return (q - qparams.zero_point) * scale


class RangeObserver:
    """Collects an activation tensor's range over calibration batches.

    MINMAX keeps the running min and max. PERCENTILE keeps, per batch, the
    given lower and upper percentiles and averages them over batches, so memory
    does not grow with the number of batches.

    Raises:
        ValueError: on an unknown method or a percentile outside (50, 100].
    """

    def __init__(self, method: RangeMethod | str = RangeMethod.MINMAX, percentile: float = 99.99):
        try:
            self.method = RangeMethod(method)
        except ValueError:
            choices = ", ".join(m.value for m in RangeMethod)
            raise ValueError(f"unknown range method {method!r}; use one of {choices}") from None
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self._lo: list[float] = []
        self._hi: list[float] = []

    def update(self, x: np.ndarray) -> None:
        """Add one batch of the tensor's values."""
        flat = np.asarray(x, dtype=np.float32).ravel()
        if flat.size == 0:
            return
        if self.method is RangeMethod.MINMAX:
            self._lo.append(float(flat.min()))
            self._hi.append(float(flat.max()))
        else:
            lo, hi = np.percentile(flat, [100.0 - self.percentile, self.percentile])
            self._lo.append(float(lo))
            self._hi.append(float(hi))

    def qparams(self) -> ActivationQParams:
        """Return the uint8 parameters of the observed range.

        Raises:
            ValueError: when no data was observed.
        """
        if not self._lo:
            raise ValueError("no calibration data reached this tensor")
        if self.method is RangeMethod.MINMAX:
            return activation_qparams(min(self._lo), max(self._hi))
        return activation_qparams(float(np.mean(self._lo)), float(np.mean(self._hi)))
