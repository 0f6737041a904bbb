"""Write a HAWQ run's report: report.json, report.md and sensitivity.png."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .api import QuantizeResult

LOGGER = logging.getLogger(__name__)


def report_dict(result: QuantizeResult) -> dict:
    """Return the report as plain JSON-ready data."""
    options = dataclasses.asdict(result.options)
    options["activation_range"] = result.options.activation_range.value
    options["loss"] = result.options.loss.value
    options["weight_clipping"] = result.options.weight_clipping.value
    options["hessian"]["trace_method"] = result.options.hessian.trace_method.value
    options["float_activations"] = list(result.options.float_activations)
    fid = result.fidelity
    float_set = set(result.float_activations)
    return {
        "summary": {
            "output": str(result.export.path),
            "file_bytes": result.export.file_bytes,
            "opset": result.export.opset,
            "fp32_weight_bytes": result.fp32_weight_bytes,
            "quantized_weight_bytes": result.allocation.size_bytes,
            "stored_weight_bytes": result.export.weight_storage_bytes,
            "size_budget_bytes": result.size_budget_bytes,
            "weight_size_ratio": result.allocation.size_bytes / result.fp32_weight_bytes,
            "bops": result.allocation.bops,
            "total_omega": result.allocation.total_omega,
            "top1_agreement_with_fp32": fid.top1_agreement,
            "relative_output_error": fid.relative_error,
            "accuracy": fid.accuracy,
            "fp32_accuracy": fid.float_accuracy,
            "torch_vs_onnxruntime_max_relative_difference": result.torch_vs_onnxruntime,
            "hessian_seconds": result.hessian_seconds,
        },
        "options": options,
        "layers": [
            {
                "name": s.name,
                "op_type": op,
                "parameters": s.num_params,
                "macs": macs,
                "top_eigenvalue": _finite(s.top_eigenvalue),
                "eigenvalue_per_parameter": _finite(s.v1_key),
                "trace": s.trace,
                "trace_per_parameter": s.trace / s.num_params,
                "quantization_error": {str(b): e for b, e in s.quant_error.items()},
                "omega": {str(b): o for b, o in s.omega.items()},
                "bits": bits,
            }
            for s, bits, macs, op in zip(
                result.layers,
                result.allocation.bits,
                result.macs,
                result.layer_ops or ["?"] * len(result.layers),
                strict=True,
            )
        ],
        "activations": {
            "float": list(result.float_activations),
            "ranking": [
                {
                    "name": a.name,
                    "trace": a.trace,
                    "scale": a.scale,
                    "score": a.score,
                    "float": a.name in float_set,
                }
                for a in result.activation_ranking
            ],
        },
    }


def _finite(value: float) -> float | None:
    """Return VALUE, or None for NaN (eigenvalues skipped), which JSON cannot hold."""
    return None if math.isnan(value) else value


def _fmt(value: float | None, pattern: str = "{:.4f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def report_markdown(data: dict) -> str:
    """Return report.md's text from report_dict's data."""
    s = data["summary"]
    lines = [
        "# HAWQ quantization report",
        "",
        f"- Output: `{s['output']}` ({s['file_bytes'] / 1e3:.1f} kB, opset {s['opset']})",
        f"- Weights: {s['quantized_weight_bytes'] / 1e3:.2f} kB nominal "
        f"({100 * s['weight_size_ratio']:.2f} % of FP32 {s['fp32_weight_bytes'] / 1e3:.2f} kB; "
        f"budget {s['size_budget_bytes'] / 1e3:.2f} kB), {s['stored_weight_bytes'] / 1e3:.2f} kB as stored",
        f"- Top-1 agreement with FP32: {_fmt(s['top1_agreement_with_fp32'])}; "
        f"relative output error {s['relative_output_error']:.4f}",
        f"- Accuracy: {_fmt(s['accuracy'])} (FP32 {_fmt(s['fp32_accuracy'])})",
        f"- Torch fake-quant vs onnxruntime, max relative difference: "
        f"{s['torch_vs_onnxruntime_max_relative_difference']:.2e}",
        f"- Hessian analysis: {s['hessian_seconds']:.1f} s",
        "",
        "| layer | op | params | λ_max | λ/n | Tr(H)/n | "
        + " | ".join(f"Ω({b})" for b in data["layers"][0]["omega"])
        + " | bits |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(data["layers"][0]["omega"]) + "---:|",
    ]
    for layer in data["layers"]:
        omegas = " | ".join(f"{o:.3e}" for o in layer["omega"].values())
        lines.append(
            f"| {layer['name']} | {layer['op_type']} | {layer['parameters']} | "
            f"{_fmt(layer['top_eigenvalue'], '{:.3e}')} | "
            f"{_fmt(layer['eigenvalue_per_parameter'], '{:.3e}')} | "
            f"{layer['trace_per_parameter']:.3e} | {omegas} | {layer['bits']} |"
        )

    activations = data.get("activations", {})
    floats = activations.get("float", [])
    lines += [
        "",
        "## Activations",
        "",
        f"Kept in float ({len(floats)}): " + (", ".join(f"`{n}`" for n in floats) or "none") + ".",
    ]
    ranking = activations.get("ranking", [])
    if ranking:
        lines += [
            "",
            "Ranked by Tr(H_a)·scale²/12 (expected loss increase from uint8 rounding):",
            "",
            "| rank | tensor | Tr(H_a) | scale | score | float |",
            "|---:|---|---:|---:|---:|---|",
        ]
        for rank, row in enumerate(ranking[:20], start=1):
            lines.append(
                f"| {rank} | `{row['name']}` | {row['trace']:.3e} | {row['scale']:.3e} | "
                f"{row['score']:.3e} | {'yes' if row['float'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def plot_sensitivity(data: dict, path: Path) -> None:
    """Save a PNG of Tr(H)/n and lambda/n per layer (log scale) with the chosen bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = data["layers"]
    x = range(len(layers))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.4 * len(layers)), 6), sharex=True)
    top.semilogy(x, [max(abs(la["trace_per_parameter"]), 1e-30) for la in layers], "o-", label="Tr(H)/n")
    if all(la["eigenvalue_per_parameter"] is not None for la in layers):
        top.semilogy(
            x, [max(abs(la["eigenvalue_per_parameter"]), 1e-30) for la in layers], "s--", label="λ_max/n"
        )
    top.set_ylabel("sensitivity")
    top.legend()
    bottom.bar(x, [la["bits"] for la in layers], color="tab:green")
    bottom.set_ylabel("weight bits")
    bottom.set_xticks(list(x))
    bottom.set_xticklabels([la["name"] for la in layers], rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: QuantizeResult, folder: Path) -> Path:
    """Write report.json, report.md and sensitivity.png into FOLDER (created if needed).

    Raises:
        OSError: when the folder cannot be created or written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = report_dict(result)
    (folder / "report.json").write_text(json.dumps(data, indent=2))
    (folder / "report.md").write_text(report_markdown(data))
    plot_sensitivity(data, folder / "sensitivity.png")
    LOGGER.info("report written to %s", folder)
    return folder
