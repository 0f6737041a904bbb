"""``hawq-quantize``: Hessian-aware mixed-precision quantization of an ONNX model.

Arguments are checked before the model is loaded; errors end the command with a
one-line message and a non-zero exit status (2 for bad arguments, 1 for a model or
data the tool cannot handle).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

EPILOG = """examples:
  # weights at most 1/6 of their FP32 size, calibration inputs in an .npz named after the inputs
  hawq-quantize model.onnx --calib calib.npz --out model_hawq.onnx --size-ratio 0.1667

  # with labels (cross-entropy Hessian, accuracy in the report), 4/8-bit only, report folder
  hawq-quantize model.onnx --calib calib.npz --labels labels.npy --out q.onnx \\
      --size-mb 0.05 --bits 4,8 --pin-first-last --report hawq_report

  # a folder of images, resized to 640x640, ImageNet normalisation, BGR order
  hawq-quantize det.onnx --calib images/ --image-size 640,640 --mean 0.485,0.456,0.406 \\
      --std 0.229,0.224,0.225 --channel-order BGR --out det_hawq.onnx --size-ratio 0.2
"""

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 2,4,8, got {text!r}"
        ) from None


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated tensor names, got {text!r}")
    return names


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.5,0.5,0.5, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser.

    The defaults repeat QuantizeOptions' and HessianSettings' so that --help needs no
    PyTorch import; a test keeps the two in step.
    """
    parser = argparse.ArgumentParser(
        prog="hawq-quantize",
        description="Quantize an FP32 ONNX model with HAWQ mixed-precision weights (2/4/8 bits, "
        "chosen per layer by the Hessian trace and an integer program) and 8-bit activations, "
        "written as an ONNX QDQ model for onnxruntime's CPU provider.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    # Inputs and output.
    parser.add_argument("model", type=Path, help="FP32 ONNX model (MODEL.onnx)")
    parser.add_argument(
        "--calib",
        type=Path,
        required=True,
        help=".npz with one array per model input (named after it, batch first), "
        "or a folder of images (see --image-size)",
    )
    parser.add_argument(
        "--labels", type=Path, help=".npy (or .npz with one array) of labels, one per calibration sample"
    )
    parser.add_argument("--out", type=Path, required=True, help="QDQ .onnx file to write")

    # Budgets and bit widths.
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--size-ratio", type=float, help="weight size budget as a fraction of FP32, e.g. 0.1667"
    )
    budget.add_argument("--size-mb", type=float, help="weight size budget in MB (1e6 bytes)")
    parser.add_argument(
        "--bops-ratio", type=float, help="optional BOPS budget as a fraction of all-8-bit BOPS"
    )
    parser.add_argument(
        "--bits", type=_int_list, default=(2, 4, 8), help="candidate weight bits (default 2,4,8)"
    )
    parser.add_argument(
        "--pin-first-last", action="store_true", help="keep the first and last layers at 8 bits"
    )
    parser.add_argument("--report", type=Path, help="folder for report.json, report.md and sensitivity.png")

    # Analysis settings.
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="calibration samples per batch (default 32)"
    )
    parser.add_argument("--max-batches", type=int, default=16, help="calibration batches used (default 16)")
    parser.add_argument("--probes", type=int, default=50, help="Hutchinson probes per batch (default 50)")
    parser.add_argument("--iterations", type=int, default=100, help="power-iteration cap (default 100)")
    parser.add_argument(
        "--tolerance", type=float, default=1e-3, help="power-iteration relative tolerance (default 1e-3)"
    )
    parser.add_argument(
        "--trace-method",
        default="per_layer",
        choices=["per_layer", "joint", "gauss_newton"],
        help="trace estimator: per_layer (one Hessian-vector product per layer per probe; "
        "default), joint (one per probe for all layers; noisy on deep networks) or "
        "gauss_newton (one backward pass per output probe for all layers; exact Hessian "
        "for the label-free distillation loss, fastest)",
    )
    parser.add_argument(
        "--skip-eigenvalues",
        action="store_true",
        help="skip the per-layer power iteration (the allocation uses the traces only; "
        "the report then has no eigenvalues)",
    )
    parser.add_argument(
        "--weight-clipping",
        default="max_abs",
        choices=["max_abs", "mse"],
        help="weight scales of 2..4-bit layers: max_abs (default) or mse (the clip ratio "
        "minimising the rounding error)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        metavar="N",
        help="give weights below 8 bits one scale per N input channels (ONNX blocked "
        "quantization) where N divides their count; the size budget counts the scales",
    )
    parser.add_argument(
        "--weight-only",
        action="store_true",
        help="keep every activation in float and quantize only the weights",
    )
    parser.add_argument(
        "--float-activations",
        type=_name_list,
        default=(),
        metavar="NAME,...",
        help="activation tensors (ONNX names) to keep in float",
    )
    parser.add_argument(
        "--auto-float-activations",
        type=int,
        default=0,
        metavar="K",
        help="also keep the K activation tensors with the largest Hessian trace x rounding "
        "noise in float (default 0)",
    )
    parser.add_argument(
        "--float-activation-budget",
        type=float,
        metavar="F",
        help="also keep top-ranked activation tensors in float until the rest carry at most "
        "the fraction F of the total activation score",
    )
    parser.add_argument(
        "--loss",
        default="auto",
        choices=["auto", "cross_entropy", "mse", "l1", "distillation"],
        help="loss for the Hessian (default auto: cross_entropy with integer labels, "
        "mse with float labels, distillation without labels)",
    )
    parser.add_argument(
        "--activation-range",
        default="minmax",
        choices=["minmax", "percentile"],
        help="activation calibration (default minmax)",
    )
    parser.add_argument(
        "--percentile", type=float, default=99.99, help="percentile for --activation-range percentile"
    )
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="quantization-aware fine-tuning epochs per layer block (needs --labels; default 0)",
    )

    # Image-folder preprocessing.
    parser.add_argument("--image-size", type=_int_list, help="image folder: resize to HEIGHT,WIDTH")
    parser.add_argument(
        "--mean", type=_float_list, help="image folder: per-channel mean after scaling to [0, 1]"
    )
    parser.add_argument("--std", type=_float_list, help="image folder: per-channel std")
    parser.add_argument(
        "--channel-order", choices=["RGB", "BGR"], default="RGB", help="image folder channel order"
    )
    parser.add_argument(
        "--layout", choices=["NCHW", "NHWC"], default="NCHW", help="image folder tensor layout"
    )

    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser


def _load_labels(path: Path) -> np.ndarray:
    """Read labels from .npy or an .npz holding exactly one array."""
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if len(archive.files) != 1:
                raise ValueError(f"labels file {path} contains arrays {archive.files}: keep exactly one")
            return archive[archive.files[0]]
    raise ValueError(f"labels file {path} must be .npy or .npz")


def main(argv: list[str] | None = None) -> int:
    """Run the command; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )

    # Check arguments and paths before loading anything heavy.
    try:
        if not args.model.is_file():
            raise ValueError(f"model {args.model} does not exist")
        if args.model.suffix != ".onnx":
            raise ValueError(f"model {args.model} is not an .onnx file")
        if not args.calib.exists():
            raise ValueError(f"calibration source {args.calib} does not exist")
        if args.calib.is_dir() and args.image_size is None:
            raise ValueError(
                f"{args.calib} is an image folder; give --image-size HEIGHT,WIDTH (and --mean/--std)"
            )
        if args.image_size is not None and len(args.image_size) != 2:
            raise ValueError(f"--image-size takes HEIGHT,WIDTH, got {args.image_size}")
        labels = _load_labels(args.labels) if args.labels else None

        from .api import QuantizeOptions, check_output_path
        from .fake_quant import RangeMethod
        from .hessian import HessianSettings

        options = QuantizeOptions(
            bits=args.bits,
            size_ratio=args.size_ratio,
            size_mb=args.size_mb,
            bops_ratio=args.bops_ratio,
            pin_first_last=args.pin_first_last,
            batch_size=args.batch_size,
            max_batches=args.max_batches,
            activation_range=RangeMethod(args.activation_range),
            percentile=args.percentile,
            loss=args.loss,
            hessian=HessianSettings(
                max_iterations=args.iterations,
                tolerance=args.tolerance,
                probes=args.probes,
                seed=args.seed,
                trace_method=args.trace_method,
                eigenvalues=not args.skip_eigenvalues,
            ),
            weight_clipping=args.weight_clipping,
            block_size=args.block_size,
            quantize_activations=not args.weight_only,
            float_activations=args.float_activations,
            auto_float_activations=args.auto_float_activations,
            float_activation_budget=args.float_activation_budget,
            finetune_epochs=args.finetune_epochs,
            seed=args.seed,
            show_progress=True,
        )
        if options.finetune_epochs and labels is None:
            raise ValueError("--finetune-epochs needs --labels")
        check_output_path(args.out)
        preprocess = None
        if args.calib.is_dir():
            from .calibration import ImagePreprocess

            channels = len(args.mean or args.std or (0, 0, 0))
            preprocess = ImagePreprocess(
                size_hw=args.image_size,
                mean=args.mean or (0.0,) * channels,
                std=args.std or (1.0,) * channels,
                channel_order=args.channel_order,
                layout=args.layout,
            )
    except (ValueError, OSError) as error:
        parser.exit(EXIT_USAGE, f"hawq-quantize: error: {_one_line(error)}\n")

    # The analysis, allocation and export.
    try:
        from .api import quantize

        result = quantize(
            args.model,
            args.calib,
            args.out,
            labels=labels,
            options=options,
            report_dir=args.report,
            preprocess=preprocess,
        )
    except (ValueError, OSError) as error:
        print(f"hawq-quantize: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_FAILURE

    bits = ",".join(str(b) for b in result.allocation.bits)
    agreement = result.fidelity.top1_agreement
    print(
        f"wrote {result.export.path} ({result.export.file_bytes / 1e3:.1f} kB); "
        f"weight bits per layer {bits}; "
        f"weights {100 * result.allocation.size_bytes / result.fp32_weight_bytes:.1f} % of FP32"
        + (f"; top-1 agreement with FP32 {agreement:.4f}" if agreement is not None else "")
        + (f"; accuracy {result.fidelity.accuracy:.4f}" if result.fidelity.accuracy is not None else "")
    )
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
