"""Python entry point of the HAWQ tool: analyse, allocate bits, export a QDQ model.

Typical use::

    from quantized_inference_node.hawq import QuantizeOptions, quantize
    result = quantize("model.onnx", {"input": calib_nchw}, "model_hawq.onnx",
                      options=QuantizeOptions(size_ratio=1 / 6), report_dir="report")

The model is an ONNX model (path or ModelProto) or a ``torch.nn.Module``; a
module is exported to ONNX first (TorchScript exporter, opset 17) and then
handled like any ONNX model, so the analysed graph is the one that is written.

Steps: fold BatchNorm into Conv (ONNX side), convert to a differentiable torch
module, calibrate activation ranges in onnxruntime, compute each layer's Hessian
eigenvalue and trace, the sensitivities Omega_i(b), optionally rank the activation
tensors by their Hessian trace and keep the most sensitive in float, solve the
bit-allocation ILP,
optionally fine-tune with quantization in the loop, write the QDQ model, check it
in onnxruntime against the torch fake-quant model, and write the report.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from .activation_precision import (
    ActivationSensitivity,
    activation_traces,
    check_activation_names,
    rank_activations,
    select_float_activations,
    without_float_activations,
)
from .bit_allocation import BitAllocation, allocate_bits, check_size_budget, weight_size_bytes
from .calibration import CalibrationError, ImagePreprocess, load_calibration, read_input_specs
from .fake_quant import (
    ActivationQParams,
    RangeMethod,
    WeightClipping,
    fake_quantize_activation,
    fake_quantize_weight,
)
from .finetune import finetune
from .hessian import HessianSettings, LayerCurvature, OutputLoss, TraceMethod, layer_curvatures
from .onnx_to_torch import OnnxGraphModule, convert, fold_batchnorm, load_onnx_model
from .qdq_export import (
    ExportResult,
    OnnxLayer,
    activation_tensors,
    build_qdq_model,
    calibrate,
    ensure_node_names,
    find_layers,
    layer_macs,
    propagate_pass_through,
    write_qdq_model,
)
from .sensitivity import LayerSensitivity, layer_sensitivities

LOGGER = logging.getLogger(__name__)

TORCH_EXPORT_OPSET = 17

CalibrationSource = str | Path | Mapping[str, np.ndarray] | np.ndarray


class LossKind(str, Enum):
    """Loss whose Hessian is analysed.

    AUTO: cross-entropy with integer labels on (N, C) logits, MSE with float labels,
    distillation without labels. DISTILLATION: KL divergence between the float
    model's softmax and the model's on (N, C) logits, MSE on any other output.
    L1 is offered for dense regression but its Hessian is zero almost everywhere
    (see :func:`make_loss`).
    """

    AUTO = "auto"
    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"
    L1 = "l1"
    DISTILLATION = "distillation"


class NothingToQuantizeError(ValueError):
    """The model has no Conv, ConvTranspose, Gemm or MatMul with an initializer weight."""


@dataclass(frozen=True)
class QuantizeOptions:
    """All options of the tool, with the defaults the CLI also uses.

    Attributes:
        bits: Candidate weight bit widths, each in 2..8.
        size_ratio: Budget as a fraction of the FP32 size of the quantizable weights.
        size_mb: Budget in MB (1e6 bytes) of quantized weights. quantize() needs one of
            size_ratio and size_mb; analyze() alone needs neither.
        bops_ratio: Optional BOPS budget as a fraction of the all-8-bit BOPS.
        pin_first_last: Keep the first and last layers at 8 bits (needs 8 in bits).
        batch_size: Calibration samples per batch.
        max_batches: Use at most this many calibration batches (None: all).
        activation_range: minmax or percentile activation calibration.
        percentile: Percentile for the percentile method.
        loss: Loss for the Hessian.
        hessian: Power iteration and Hutchinson settings.
        finetune_epochs: Quantization-aware fine-tuning epochs (needs labels; 0: off).
        finetune_lr: Fine-tuning learning rate (Adam).
        seed: Seed of all random choices.
        show_progress: Show tqdm progress bars.
        weight_clipping: Weight scales: max-abs everywhere (default), or MSE clipping for
            2..4-bit layers; the analysis and the export use the same. MSE clipping
            lowers the weight error but lost text on the PP-OCR detector (see
            docs/benchmarks.md), so it is an option, not the default.
        float_activations: Activation tensors (ONNX names) kept in float.
        auto_float_activations: Also keep the K activation tensors with the largest
            Tr(H_a) * scale^2 / 12 in float (activation Hessian traces, HAWQ-V2).
        float_activation_budget: Also keep top-ranked activation tensors in float
            until the summed score of the tensors still quantized is at most this
            fraction of the total (None: off).
        block_size: Give weights below 8 bits one scale per block of this many input
            channels (DequantizeLinear blocked quantization, opset 21) where it divides
            their count; the size budget counts the scales. None: one scale per output
            channel.
        quantize_activations: Quantize activations to uint8 (default); False keeps
            every activation in float (weight-only quantization).
    """

    bits: tuple[int, ...] = (2, 4, 8)
    size_ratio: float | None = None
    size_mb: float | None = None
    bops_ratio: float | None = None
    pin_first_last: bool = False
    batch_size: int = 32
    max_batches: int | None = 16
    activation_range: RangeMethod = RangeMethod.MINMAX
    percentile: float = 99.99
    loss: LossKind = LossKind.AUTO
    hessian: HessianSettings = field(default_factory=HessianSettings)
    finetune_epochs: int = 0
    finetune_lr: float = 1e-4
    seed: int = 0
    show_progress: bool = False
    weight_clipping: WeightClipping = WeightClipping.MAX_ABS
    float_activations: tuple[str, ...] = ()
    auto_float_activations: int = 0
    float_activation_budget: float | None = None
    block_size: int | None = None
    quantize_activations: bool = True

    def __post_init__(self) -> None:
        bits = tuple(self.bits)
        if not bits or any(not isinstance(b, int) or not 2 <= b <= 8 for b in bits):
            raise ValueError(f"bits must be integers in 2..8, e.g. 2,4,8; got {self.bits}")
        if len(set(bits)) != len(bits):
            raise ValueError(f"bits {self.bits} repeats a width")
        object.__setattr__(self, "bits", tuple(sorted(bits)))
        if self.size_ratio is not None and self.size_mb is not None:
            raise ValueError("give one size budget, size_ratio or size_mb, not both")
        if self.size_ratio is not None and not 0.0 < self.size_ratio <= 1.0:
            raise ValueError(f"size_ratio must be in (0, 1], got {self.size_ratio}")
        if self.size_mb is not None and not self.size_mb > 0.0:
            raise ValueError(f"size_mb must be > 0, got {self.size_mb}")
        if self.bops_ratio is not None and not 0.0 < self.bops_ratio <= 1.0:
            raise ValueError(f"bops_ratio must be in (0, 1], got {self.bops_ratio}")
        if self.pin_first_last and 8 not in bits:
            raise ValueError("pin_first_last keeps layers at 8 bits; add 8 to bits")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {self.max_batches}")
        if self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"block_size must be >= 2 input channels or None, got {self.block_size}")
        object.__setattr__(self, "activation_range", RangeMethod(self.activation_range))
        object.__setattr__(self, "loss", LossKind(self.loss))
        try:
            object.__setattr__(self, "weight_clipping", WeightClipping(self.weight_clipping))
        except ValueError:
            choices = ", ".join(c.value for c in WeightClipping)
            raise ValueError(
                f"unknown weight_clipping {self.weight_clipping!r}; use one of {choices}"
            ) from None
        if isinstance(self.float_activations, str):
            raise ValueError(
                "float_activations takes a sequence of tensor names, "
                f"got the string {self.float_activations!r}"
            )
        object.__setattr__(self, "float_activations", tuple(self.float_activations))
        if self.auto_float_activations < 0:
            raise ValueError(f"auto_float_activations must be >= 0, got {self.auto_float_activations}")
        if self.float_activation_budget is not None and not 0.0 <= self.float_activation_budget <= 1.0:
            raise ValueError(
                f"float_activation_budget must be in [0, 1], got {self.float_activation_budget}"
            )

    @property
    def ranks_activations(self) -> bool:
        """Whether the analysis computes activation traces to choose float tensors."""
        return self.auto_float_activations > 0 or self.float_activation_budget is not None


@dataclass
class Batch:
    """One calibration batch: named float inputs (batch first) and optional labels."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None

    @property
    def size(self) -> int:
        """Number of samples."""
        return len(next(iter(self.feeds.values())))


@dataclass
class PreparedModel:
    """The float model ready for analysis and export.

    Attributes:
        onnx_model: Float ONNX model, BatchNorm folded, every node named.
        module: The same graph as a differentiable torch module.
        layers: Quantizable layers in graph order (export view).
        weights: Their torch weight parameters, in the same order.
    """

    onnx_model: onnx.ModelProto
    module: OnnxGraphModule
    layers: list[OnnxLayer]
    weights: list[torch.nn.Parameter]


@dataclass
class Fidelity:
    """Agreement of a quantized model with the float model on the same inputs.

    Attributes:
        top1_agreement: Fraction of samples with the same argmax (classification), or None.
        relative_error: ||y_q - y_fp|| / ||y_fp|| over all outputs.
        accuracy: Top-1 accuracy with integer labels, or None.
        float_accuracy: The float model's top-1 accuracy on the same samples, or None.
    """

    top1_agreement: float | None
    relative_error: float
    accuracy: float | None
    float_accuracy: float | None


@dataclass
class QuantizeResult:
    """Everything the run computed.

    Attributes:
        layers: Per-layer sensitivities, in graph order.
        allocation: The chosen bits and their size.
        export: The written file.
        fp32_weight_bytes: FP32 size of the quantizable weights.
        size_budget_bytes: The budget the allocation met.
        fidelity: QDQ model (onnxruntime) against the float model, on the calibration set.
        torch_vs_onnxruntime: Largest |difference| between the torch fake-quant model and
            the onnxruntime QDQ model, relative to the output's largest magnitude.
        hessian_seconds: Wall time of the Hessian analysis.
        macs: Per-layer multiply-accumulates for one sample.
        options: The effective options.
        layer_ops: ONNX operator of each layer.
        float_activations: Activation tensors kept in float (named and automatic).
        activation_ranking: Activation sensitivities, largest first (empty unless ranked).
    """

    layers: list[LayerSensitivity]
    allocation: BitAllocation
    export: ExportResult
    fp32_weight_bytes: float
    size_budget_bytes: float
    fidelity: Fidelity
    torch_vs_onnxruntime: float
    hessian_seconds: float
    macs: list[int]
    options: QuantizeOptions
    layer_ops: list[str] = field(default_factory=list)
    float_activations: list[str] = field(default_factory=list)
    activation_ranking: list[ActivationSensitivity] = field(default_factory=list)


def torch_to_onnx(module: torch.nn.Module, example_inputs: Sequence[np.ndarray]) -> onnx.ModelProto:
    """Export a torch module in eval mode to an ONNX model with a dynamic batch axis.

    Raises:
        ValueError: when the exporter fails (the message names the exporter's error).
    """
    module = copy.deepcopy(module).eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(x[:1])) for x in example_inputs)
    names = [f"input_{i}" for i in range(len(args))]
    buffer = io.BytesIO()
    try:
        with warnings_silenced():
            torch.onnx.export(
                module,
                args,
                buffer,
                dynamo=False,
                opset_version=TORCH_EXPORT_OPSET,
                input_names=names,
                output_names=["output"],
                dynamic_axes={**{n: {0: "batch"} for n in names}, "output": {0: "batch"}},
            )
    except Exception as error:
        raise ValueError(
            f"cannot export the torch module to ONNX: {error}; export it yourself and pass the .onnx"
        ) from error
    return onnx.load_from_string(buffer.getvalue())


@contextlib.contextmanager
def warnings_silenced() -> Iterator[None]:
    """Hide the TorchScript exporter's deprecation warnings."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def prepare_model(model: onnx.ModelProto | str | Path) -> PreparedModel:
    """Fold BatchNorm, name nodes, convert to torch and list the quantizable layers.

    Raises:
        FileNotFoundError: the model path does not exist.
        UnsupportedOperatorError: the converter lacks some operators (all are named).
        NothingToQuantizeError: no Conv, ConvTranspose, Gemm or MatMul has an initializer weight.
    """
    onnx_model = fold_batchnorm(load_onnx_model(model))
    ensure_node_names(onnx_model)
    module = convert(onnx_model).eval()
    onnx_model = module.model
    if not module.quantizable_nodes:
        ops = sorted({n.op_type for n in onnx_model.graph.node})
        raise NothingToQuantizeError(
            f"the model has nothing to quantize: no Conv, ConvTranspose, Gemm or MatMul with a "
            f"weight initializer (its operators: {ops})"
        )
    layers = find_layers(onnx_model, module.quantizable_nodes)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    weights = [module.weight_parameters[layer.weight] for layer in layers]
    for weight in weights:
        weight.requires_grad_(True)
    return PreparedModel(onnx_model=onnx_model, module=module, layers=layers, weights=weights)


def make_batches(
    model: onnx.ModelProto,
    calibration: CalibrationSource,
    labels: np.ndarray | None,
    batch_size: int,
    max_batches: int | None,
    preprocess: ImagePreprocess | None = None,
) -> list[Batch]:
    """Load calibration inputs (checked against the model's inputs) and cut them into batches.

    Args:
        model: The float ONNX model.
        calibration: An .npz file, a folder of images (with PREPROCESS), a mapping
            input name -> array (batch first), or one array for a single-input model.
        labels: Optional labels, one per sample in file order (integer classes or float targets).
        batch_size: Samples per batch.
        max_batches: Keep at most this many batches.
        preprocess: How images become the input tensor (image folders only).

    Raises:
        CalibrationError: on missing or unknown inputs, wrong dtypes or shapes, an
            empty source, or labels of the wrong length (see calibration.load_calibration).
        FileNotFoundError: when the source path does not exist.
    """
    if isinstance(calibration, np.ndarray):
        specs = read_input_specs(model)
        if len(specs) != 1:
            raise CalibrationError(
                f"the model has inputs {[s.name for s in specs]}; pass a dict of arrays named after them"
            )
        calibration = {specs[0].name: calibration}
    max_samples = None if max_batches is None else max_batches * batch_size
    data = load_calibration(calibration, model, preprocess, batch_size, max_samples)

    if labels is not None:
        labels = np.asarray(labels)
        available = len(labels)
        total = sum(len(next(iter(b.values()))) for b in data.batches)
        if max_samples is not None:
            available = min(available, max_samples)
        if available != total:
            raise CalibrationError(
                f"{len(labels)} labels for {total} calibration samples; give one per sample"
            )
    batches, start = [], 0
    for feeds in data.batches:
        size = len(next(iter(feeds.values())))
        batches.append(Batch(feeds=feeds, labels=None if labels is None else labels[start : start + size]))
        start += size
    return batches


def _first_output(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, tuple) else outputs


def resolve_loss(kind: LossKind, output: torch.Tensor, labels: np.ndarray | None) -> LossKind:
    """Return the concrete loss for AUTO, and check an explicit choice fits the data.

    Raises:
        ValueError: when the chosen loss needs labels that are missing or of the wrong kind.
    """
    if kind is LossKind.AUTO:
        if labels is None:
            return LossKind.DISTILLATION
        if np.issubdtype(labels.dtype, np.integer) and output.ndim == 2:
            return LossKind.CROSS_ENTROPY
        return LossKind.MSE
    if kind is LossKind.CROSS_ENTROPY and (
        labels is None or not np.issubdtype(labels.dtype, np.integer) or output.ndim != 2
    ):
        raise ValueError("cross_entropy needs integer class labels and (N, C) logits")
    if kind in (LossKind.MSE, LossKind.L1) and labels is None:
        raise ValueError(f"loss {kind.value} needs labels; use distillation without labels")
    if kind is LossKind.L1:
        LOGGER.warning(
            "the L1 loss has a zero Hessian almost everywhere for ReLU networks; the traces "
            "will be near zero and the allocation uninformative (use mse)"
        )
    return kind


def make_loss(
    kind: LossKind, output: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor:
    """Return the mean loss of one batch.

    Distillation compares the model with the float model's outputs (TEACHER). At
    the float weights it has zero gradient, since the model is its own teacher,
    but its Hessian is the Gauss-Newton matrix J^T H_out J (H_out the Hessian of
    KL or MSE in the outputs, positive semi-definite), which measures how much a
    weight perturbation moves the outputs: that is what the second-order analysis
    needs, with no labels. L1's second derivative in the outputs is zero, so its
    Gauss-Newton term vanishes and, for piecewise-linear (ReLU) networks, so does
    the Hessian of each layer block.
    """
    if kind is LossKind.CROSS_ENTROPY:
        return F.cross_entropy(output, labels)
    if kind is LossKind.MSE:
        return F.mse_loss(output, labels.to(output.dtype).reshape(output.shape))
    if kind is LossKind.L1:
        return F.l1_loss(output, labels.to(output.dtype).reshape(output.shape))
    if output.ndim == 2:
        return F.kl_div(
            F.log_softmax(output, dim=1),
            F.log_softmax(teacher, dim=1),
            reduction="batchmean",
            log_target=True,
        )
    return F.mse_loss(output, teacher)


def _loss_closures(
    module: OnnxGraphModule, batches: Sequence[Batch], kind: LossKind
) -> list[Callable[[], torch.Tensor]]:
    """Return one closure per batch that computes its mean loss at the module's current weights."""
    closures = []
    for batch in batches:
        feeds = {n: torch.from_numpy(a) for n, a in batch.feeds.items()}
        with torch.no_grad():
            teacher = _first_output(module(**feeds)).detach()
        labels = None if batch.labels is None else torch.from_numpy(np.asarray(batch.labels))

        def closure(feeds=feeds, teacher=teacher, labels=labels) -> torch.Tensor:
            output = _first_output(module(**feeds))
            return make_loss(kind, output, teacher, labels)

        closures.append(closure)
    return closures


@contextlib.contextmanager
def quantized_weights(
    prepared: PreparedModel,
    bits: Sequence[int],
    clipping: WeightClipping = WeightClipping.MAX_ABS,
    block_size: int | None = None,
) -> Iterator[None]:
    """Temporarily replace the layer weights with their fake-quantized values."""
    saved = [w.detach().clone() for w in prepared.weights]
    try:
        with torch.no_grad():
            for w, layer, b in zip(prepared.weights, prepared.layers, bits, strict=True):
                w.copy_(fake_quantize_weight(w, b, layer.channel_axis, clipping, block_size))
        yield
    finally:
        with torch.no_grad():
            for w, s in zip(prepared.weights, saved, strict=True):
                w.copy_(s)


def set_activation_quantization(
    prepared: PreparedModel, qparams: Mapping[str, ActivationQParams] | None
) -> None:
    """Fake-quantize the named activation tensors of the torch module (None: switch off)."""
    transforms = {
        name: partial(fake_quantize_activation, qparams=params) for name, params in (qparams or {}).items()
    }
    prepared.module.set_activation_transform(transforms)


def _write_back_weights(prepared: PreparedModel) -> onnx.ModelProto:
    """Return the float ONNX model with the (fine-tuned) torch weights as initializers."""
    model = onnx.ModelProto.FromString(prepared.onnx_model.SerializeToString())
    by_name = {layer.weight: w for layer, w in zip(prepared.layers, prepared.weights, strict=True)}
    for init in model.graph.initializer:
        if init.name in by_name:
            array = by_name[init.name].detach().numpy().astype(np.float32)
            init.CopyFrom(onnx.numpy_helper.from_array(array.reshape(tuple(init.dims)), init.name))
    return model


def onnxruntime_outputs(model: onnx.ModelProto | str | Path, batches: Sequence[Batch]) -> np.ndarray:
    """Run a model in onnxruntime over the batches; return its first output, concatenated."""
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, b.feeds)[0] for b in batches])


def fidelity(quantized: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> Fidelity:
    """Compare quantized outputs with the float model's (and with labels when given)."""
    classification = reference.ndim == 2
    error = float(np.linalg.norm(quantized - reference) / max(np.linalg.norm(reference), 1e-30))
    agreement = float(np.mean(quantized.argmax(1) == reference.argmax(1))) if classification else None
    accuracy = float_accuracy = None
    if classification and labels is not None and np.issubdtype(labels.dtype, np.integer):
        accuracy = float(np.mean(quantized.argmax(1) == labels))
        float_accuracy = float(np.mean(reference.argmax(1) == labels))
    return Fidelity(agreement, error, accuracy, float_accuracy)


def check_output_path(path: Path) -> Path:
    """Return PATH when a model can be written there.

    Raises:
        ValueError: when the folder does not exist or is not writable, or PATH is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"output path {path} is a folder; give a file name such as {path / 'model_hawq.onnx'}"
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"cannot write {path}: no write permission; choose another --out")
    return path


@dataclass
class Analysis:
    """The float model analysed: everything the bit allocation and the export need.

    Attributes:
        prepared: The model (ONNX and torch views) and its layers.
        batches: The calibration batches.
        qparams: uint8 parameters per quantized activation tensor (float ones left out).
        macs: Per-layer multiply-accumulates for one sample.
        loss: The loss whose Hessian was analysed.
        sensitivities: Per-layer eigenvalue, trace and Omega_i(b).
        hessian_seconds: Wall time of the weight Hessian analysis.
        fp32_weight_bytes: FP32 size of the quantizable weights.
        weight_clipping: How the weight scales were chosen (the export uses the same).
        block_size: Input channels per weight scale below 8 bits (None: per channel).
        float_activations: Activation tensors kept in float.
        activation_ranking: Activation sensitivities, largest first (empty unless ranked).
        activation_seconds: Wall time of the activation traces.
    """

    prepared: PreparedModel
    batches: list[Batch]
    qparams: dict[str, ActivationQParams]
    macs: list[int]
    loss: LossKind
    sensitivities: list[LayerSensitivity]
    hessian_seconds: float
    fp32_weight_bytes: float
    weight_clipping: WeightClipping = WeightClipping.MAX_ABS
    block_size: int | None = None
    float_activations: list[str] = field(default_factory=list)
    activation_ranking: list[ActivationSensitivity] = field(default_factory=list)
    activation_seconds: float = 0.0

    @property
    def num_params(self) -> list[int]:
        """Weight entries per layer."""
        return [layer.num_params for layer in self.prepared.layers]

    @property
    def labels(self) -> np.ndarray | None:
        """The calibration labels in batch order, or None."""
        if self.batches[0].labels is None:
            return None
        return np.concatenate([b.labels for b in self.batches])


@dataclass
class ExportCheck:
    """A written QDQ model and how it compares with the float and the torch fake-quant model."""

    export: ExportResult
    fidelity: Fidelity
    torch_vs_onnxruntime: float


def _size_budget(options: QuantizeOptions, fp32_bytes: float) -> float:
    if options.size_mb is not None:
        return options.size_mb * 1e6
    if options.size_ratio is not None:
        return options.size_ratio * fp32_bytes
    raise ValueError("give a size budget: size_ratio (e.g. 0.1667) or size_mb")


def _pinned(options: QuantizeOptions, num_layers: int) -> dict[int, int]:
    return {0: 8, num_layers - 1: 8} if options.pin_first_last else {}


def analyze(
    model: onnx.ModelProto | str | Path | torch.nn.Module,
    calibration: CalibrationSource,
    labels: np.ndarray | None = None,
    options: QuantizeOptions | None = None,
    preprocess: ImagePreprocess | None = None,
) -> Analysis:
    """Prepare the model, calibrate activations and compute every layer's sensitivity.

    Use it directly to try several budgets or configurations on one analysis
    (:func:`choose_bits`, :func:`export_configuration`); :func:`quantize` runs it.
    Arguments are as in :func:`quantize`; a size budget in OPTIONS is checked for
    feasibility before the Hessian analysis when one is given.

    Raises: as :func:`quantize`.
    """
    options = options or QuantizeOptions()
    torch.manual_seed(options.seed)

    # Load, fold BatchNorm, convert; check the calibration data against the model.
    if isinstance(model, torch.nn.Module):
        if not isinstance(calibration, (Mapping, np.ndarray)):
            raise ValueError("with a torch module, pass the calibration inputs as arrays")
        arrays = list(calibration.values()) if isinstance(calibration, Mapping) else [calibration]
        model = torch_to_onnx(model, [np.asarray(a, dtype=np.float32) for a in arrays])
        calibration = dict(zip([f"input_{i}" for i in range(len(arrays))], arrays, strict=True))
    prepared = prepare_model(model)
    batches = make_batches(
        prepared.onnx_model, calibration, labels, options.batch_size, options.max_batches, preprocess
    )
    layers = prepared.layers
    LOGGER.info("%d quantizable layers, %d calibration batches", len(layers), len(batches))

    # Fail fast on a size budget no configuration meets.
    num_params = [layer.num_params for layer in layers]
    fp32_bytes = weight_size_bytes(num_params, [32] * len(layers))
    if options.size_mb is not None or options.size_ratio is not None:
        budget = _size_budget(options, fp32_bytes)
        check_size_budget(num_params, options.bits, budget, _pinned(options, len(layers)))

    # Activation ranges (onnxruntime) and per-layer MACs.
    calib = calibrate(
        prepared.onnx_model,
        activation_tensors(prepared.onnx_model, layers),
        (b.feeds for b in batches),
        options.activation_range,
        options.percentile,
    )
    qparams = propagate_pass_through(prepared.onnx_model, calib.qparams)
    check_activation_names(options.float_activations, qparams)
    macs = [
        layer_macs(layer, _layer_output_shape(prepared, layer, batches, calib.output_shapes))
        for layer in layers
    ]

    # Hessian eigenvalues and traces, then Omega_i(b).
    with torch.no_grad():
        probe_output = _first_output(prepared.module(**_torch_feeds(batches[0])))
    batch_labels = None if batches[0].labels is None else batches[0].labels
    kind = resolve_loss(options.loss, probe_output, batch_labels)
    LOGGER.info("Hessian loss: %s", kind.value)
    closures = _loss_closures(prepared.module, batches, kind)
    gauss_newton = options.hessian.trace_method is TraceMethod.GAUSS_NEWTON
    started = time.perf_counter()
    curvatures: list[LayerCurvature] = layer_curvatures(
        closures,
        [b.size for b in batches],
        prepared.weights,
        [layer.node_name for layer in layers],
        options.hessian,
        show_progress=options.show_progress,
        outputs=_output_closures(prepared.module, batches) if gauss_newton else None,
        output_loss=_output_loss(kind, probe_output) if gauss_newton else OutputLoss.MSE,
    )
    hessian_seconds = time.perf_counter() - started
    sensitivities = layer_sensitivities(
        curvatures,
        prepared.weights,
        [layer.channel_axis for layer in layers],
        options.bits,
        options.weight_clipping,
        options.block_size,
    )

    # Activation tensors kept in float: the named ones, then the top-ranked by trace.
    started = time.perf_counter()
    ranking = _rank_activation_tensors(prepared, closures, batches, list(calib.qparams), qparams, options)
    activation_seconds = time.perf_counter() - started
    automatic = select_float_activations(
        ranking, options.auto_float_activations, options.float_activation_budget
    )
    float_names = list(dict.fromkeys([*options.float_activations, *automatic]))
    if float_names:
        LOGGER.info("activations kept in float: %s", ", ".join(float_names))
    qparams = without_float_activations(qparams, float_names, prepared.onnx_model)
    if not options.quantize_activations:
        LOGGER.info("weight-only quantization: every activation stays in float")
        qparams = {}
    return Analysis(
        prepared,
        batches,
        qparams,
        macs,
        kind,
        sensitivities,
        hessian_seconds,
        fp32_bytes,
        weight_clipping=options.weight_clipping,
        block_size=options.block_size,
        float_activations=float_names,
        activation_ranking=ranking,
        activation_seconds=activation_seconds,
    )


def _output_closures(module: OnnxGraphModule, batches: Sequence[Batch]) -> list[Callable[[], torch.Tensor]]:
    """Return one closure per batch computing the module's first output at its current weights."""
    closures = []
    for batch in batches:
        feeds = _torch_feeds(batch)
        closures.append(lambda feeds=feeds: _first_output(module(**feeds)))
    return closures


def _output_loss(kind: LossKind, output: torch.Tensor) -> OutputLoss:
    """Return the output loss whose Gauss-Newton matrix matches the analysed loss.

    Raises:
        ValueError: for the L1 loss, whose second derivative in the outputs is zero.
    """
    if kind is LossKind.CROSS_ENTROPY or (kind is LossKind.DISTILLATION and output.ndim == 2):
        return OutputLoss.SOFTMAX
    if kind in (LossKind.MSE, LossKind.DISTILLATION):
        return OutputLoss.MSE
    raise ValueError(
        f"gauss_newton traces need a mse, cross_entropy or distillation loss, not {kind.value}; "
        "use trace_method per_layer"
    )


def _rank_activation_tensors(
    prepared: PreparedModel,
    closures: Sequence[Callable[[], torch.Tensor]],
    batches: Sequence[Batch],
    names: Sequence[str],
    qparams: Mapping[str, ActivationQParams],
    options: QuantizeOptions,
) -> list[ActivationSensitivity]:
    """Rank the calibrated activation tensors by Tr(H_a) * scale^2 / 12 when the options ask."""
    if not options.ranks_activations:
        return []
    # Only the activations are differentiated here; the weights' graph would cost time.
    for weight in prepared.weights:
        weight.requires_grad_(False)
    try:
        traces = activation_traces(
            prepared.module,
            closures,
            [b.size for b in batches],
            names,
            options.hessian.probes,
            options.hessian.seed + 2,
        )
    finally:
        for weight in prepared.weights:
            weight.requires_grad_(True)
    return rank_activations(traces, qparams)


def choose_bits(analysis: Analysis, options: QuantizeOptions) -> BitAllocation:
    """Solve the bit-allocation ILP for the budgets in OPTIONS.

    Raises:
        ValueError: when OPTIONS gives no size budget.
        InfeasibleBudgetError: when no configuration fits.
    """
    budget = _size_budget(options, analysis.fp32_weight_bytes)
    bops_budget = (
        options.bops_ratio * sum(m * 8 * 8 for m in analysis.macs) if options.bops_ratio is not None else None
    )
    return allocate_bits(
        [s.omega for s in analysis.sensitivities],
        analysis.num_params,
        budget,
        macs=analysis.macs,
        bops_budget=bops_budget,
        pinned=_pinned(options, len(analysis.sensitivities)),
        bits_per_weight=[s.storage_bits for s in analysis.sensitivities],
    )


def export_configuration(analysis: Analysis, bits: Sequence[int], out_path: str | Path) -> ExportCheck:
    """Write the QDQ model for one bit configuration and check it in onnxruntime.

    The check runs the calibration batches through the float model, the written
    model (both onnxruntime) and the torch fake-quant model.

    Raises:
        ValueError: when the output path cannot be written or bits do not match the layers.
        ExportError: when the QDQ model fails the checker or onnxruntime refuses it.
    """
    out_path = check_output_path(Path(out_path))
    prepared = analysis.prepared

    float_model = _write_back_weights(prepared)
    qdq = build_qdq_model(
        float_model,
        prepared.layers,
        list(bits),
        analysis.qparams,
        analysis.weight_clipping,
        analysis.block_size,
    )
    export = write_qdq_model(qdq, out_path)

    # The reference is the original float model, also after fine-tuning.
    reference = onnxruntime_outputs(prepared.onnx_model, analysis.batches)
    quantized = onnxruntime_outputs(out_path, analysis.batches)
    set_activation_quantization(prepared, analysis.qparams)
    try:
        weights = quantized_weights(prepared, bits, analysis.weight_clipping, analysis.block_size)
        with weights, torch.no_grad():
            emulated = np.concatenate(
                [_first_output(prepared.module(**_torch_feeds(b))).numpy() for b in analysis.batches]
            )
    finally:
        set_activation_quantization(prepared, None)
    mismatch = float(np.abs(emulated - quantized).max() / max(np.abs(quantized).max(), 1e-30))
    return ExportCheck(export, fidelity(quantized, reference, analysis.labels), mismatch)


def quantize(
    model: onnx.ModelProto | str | Path | torch.nn.Module,
    calibration: CalibrationSource,
    out_path: str | Path,
    labels: np.ndarray | None = None,
    options: QuantizeOptions | None = None,
    report_dir: str | Path | None = None,
    preprocess: ImagePreprocess | None = None,
) -> QuantizeResult:
    """Quantize a float model with HAWQ mixed-precision weights and 8-bit activations.

    Args:
        model: Float ONNX model (path or ModelProto) or a torch module (exported to ONNX).
        calibration: An .npz file (one array per model input, named after it, batch first),
            a folder of images (needs PREPROCESS), a mapping input name -> array, or one
            array for a single-input model; arrays already preprocessed.
        out_path: Where to write the QDQ .onnx model.
        labels: Optional labels, one per calibration sample: integer classes for
            (N, C) logits or float targets shaped like the output.
        options: QuantizeOptions; it must give a size budget.
        report_dir: Folder for report.json, report.md and sensitivity.png, or None.
        preprocess: How images of a calibration folder become the input tensor.

    Returns:
        A QuantizeResult.

    Raises:
        ValueError: on a bad option or an unwritable output path (before any analysis).
        CalibrationError: on calibration data that do not fit the model.
        UnsupportedOperatorError: when the converter lacks some operators.
        NothingToQuantizeError: when the model has no quantizable layer.
        LayerNotInLossError: when a layer does not influence the outputs.
        InfeasibleBudgetError: when the budget is below the smallest achievable size.
        ExportError: when the QDQ model cannot be written or loaded.
    """
    if options is None or (options.size_mb is None and options.size_ratio is None):
        raise ValueError("give options with a size budget, e.g. QuantizeOptions(size_ratio=0.1667)")
    out_path = check_output_path(Path(out_path))
    if report_dir is not None and Path(report_dir).exists() and not Path(report_dir).is_dir():
        raise ValueError(f"report folder {report_dir} is a file; give a folder path")
    if options.finetune_epochs > 0 and labels is None:
        raise ValueError("fine-tuning needs labels; pass labels or set finetune_epochs=0")

    # Sensitivities, then the bit allocation.
    analysis = analyze(model, calibration, labels, options, preprocess)
    allocation = choose_bits(analysis, options)

    # Optional quantization-aware fine-tuning, most sensitive blocks first.
    if options.finetune_epochs > 0:
        prepared = analysis.prepared
        order = sorted(
            range(len(prepared.layers)),
            key=lambda i: -analysis.sensitivities[i].finetune_key(allocation.bits[i]),
        )
        # The closures take the float model's outputs now, before quantization is switched on.
        losses = _loss_closures(prepared.module, analysis.batches, analysis.loss)
        set_activation_quantization(prepared, analysis.qparams)
        try:
            finetune(
                prepared.weights,
                [layer.channel_axis for layer in prepared.layers],
                allocation.bits,
                order,
                losses,
                options.finetune_epochs,
                options.finetune_lr,
                options.seed,
                names=[layer.node_name for layer in prepared.layers],
                clipping=options.weight_clipping,
                block_size=options.block_size,
            )
        finally:
            set_activation_quantization(prepared, None)

    # Write the QDQ model, check it, report.
    check = export_configuration(analysis, allocation.bits, out_path)
    result = QuantizeResult(
        layers=analysis.sensitivities,
        allocation=allocation,
        export=check.export,
        fp32_weight_bytes=analysis.fp32_weight_bytes,
        size_budget_bytes=_size_budget(options, analysis.fp32_weight_bytes),
        fidelity=check.fidelity,
        torch_vs_onnxruntime=check.torch_vs_onnxruntime,
        hessian_seconds=analysis.hessian_seconds,
        macs=analysis.macs,
        options=options,
        layer_ops=[layer.op_type for layer in analysis.prepared.layers],
        float_activations=analysis.float_activations,
        activation_ranking=analysis.activation_ranking,
    )
    LOGGER.info(
        "wrote %s: %.1f kB, weights %.2f%% of FP32, top-1 agreement %s",
        check.export.path,
        check.export.file_bytes / 1e3,
        100 * allocation.size_bytes / analysis.fp32_weight_bytes,
        check.fidelity.top1_agreement,
    )
    if report_dir is not None:
        from .report import write_report

        write_report(result, Path(report_dir))
    return result


def _torch_feeds(batch: Batch) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(a) for n, a in batch.feeds.items()}


def _layer_output_shape(
    prepared: PreparedModel, layer: OnnxLayer, batches: Sequence[Batch], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[int, ...]:
    """Per-sample output shape of a layer: from calibration, else by running the torch module."""
    if layer.output in shapes:
        return shapes[layer.output]
    with torch.no_grad():
        feeds = {n: torch.from_numpy(a[:1]) for n, a in batches[0].feeds.items()}
        values = prepared.module.run(feeds, capture=[layer.output])
    return tuple(values[layer.output].shape[1:])
