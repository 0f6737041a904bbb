"""HAWQ mixed-precision quantization tool (offline; imports PyTorch).

Hessian-aware bit allocation (HAWQ v1-v3) for ONNX models or torch modules,
exported as standard ONNX QDQ models that onnxruntime's CPU provider runs.
The inference node never imports this package.

Names are imported on first use, so ``hawq-quantize --help`` and argument errors
do not wait for PyTorch to load.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CalibrationError": ".calibration",
    "ExportError": ".qdq_export",
    "HessianSettings": ".hessian",
    "InfeasibleBudgetError": ".bit_allocation",
    "LayerNotInLossError": ".hessian",
    "LossKind": ".api",
    "NothingToQuantizeError": ".api",
    "OutputLoss": ".hessian",
    "QuantizeOptions": ".api",
    "QuantizeResult": ".api",
    "RangeMethod": ".fake_quant",
    "TraceMethod": ".hessian",
    "WeightClipping": ".fake_quant",
    "activation_traces": ".activation_precision",
    "allocate_bits": ".bit_allocation",
    "layer_curvatures": ".hessian",
    "quantize": ".api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
