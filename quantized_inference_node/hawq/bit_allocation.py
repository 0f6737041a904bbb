"""Choose one weight bit width per layer by integer linear programming (HAWQ v3).

Binary variable x[i, b] is 1 when layer i gets b bits. The program minimises
sum_i,b Omega_i(b) x[i, b] subject to one choice per layer, the model-size budget
sum_i,b n_i b / 8 x[i, b] <= S and, optionally, the BOPS budget
sum_i,b MACs_i b b_act x[i, b] <= B. scipy's HiGHS solves it exactly in
milliseconds for hundreds of layers.

Sizes count the nominal bits of the quantized weights (n_i * b / 8 bytes), as
HAWQ does; the exported file stores 2-bit weights in int4, see qdq_export. Layers
quantized per block also pay for their block scales: pass their stored bits per
weight (b + 32 / block size) as ``bits_per_weight``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

LOGGER = logging.getLogger(__name__)

MB = 1e6


class InfeasibleBudgetError(ValueError):
    """No bit configuration satisfies the budgets."""


@dataclass(frozen=True)
class BitAllocation:
    """The chosen configuration.

    Attributes:
        bits: Weight bit width per layer.
        size_bytes: Nominal size of the quantized weights, sum n_i b_i / 8.
        bops: Bit operations, sum MACs_i * b_i * activation bits (0 without MACs).
        total_omega: The minimised objective, sum Omega_i(b_i).
    """

    bits: list[int]
    size_bytes: float
    bops: float
    total_omega: float


def weight_size_bytes(num_params: Sequence[int], bits: Sequence[int]) -> float:
    """Return the nominal size sum n_i b_i / 8 in bytes."""
    return float(sum(n * b for n, b in zip(num_params, bits, strict=True)) / 8.0)


def check_size_budget(
    num_params: Sequence[int],
    bit_widths: Sequence[int],
    size_budget_bytes: float,
    pinned: Mapping[int, int] | None = None,
    bits_per_weight: Sequence[Mapping[int, float]] | None = None,
) -> float:
    """Check that the size budget admits some configuration; return the smallest size.

    Call it before the (expensive) Hessian analysis so an impossible budget fails fast.
    ``bits_per_weight`` gives per layer the stored bits of each width (default: the width).

    Raises:
        InfeasibleBudgetError: naming the smallest achievable size.
    """
    pinned = dict(pinned or {})
    fewest = min(bit_widths)
    min_size = 0.0
    for i, n in enumerate(num_params):
        width = pinned.get(i, fewest)
        min_size += n * (bits_per_weight[i].get(width, width) if bits_per_weight else width) / 8.0
    if min_size > size_budget_bytes * (1 + 1e-9):
        raise InfeasibleBudgetError(
            f"size budget {size_budget_bytes / MB:.6f} MB is below the smallest achievable "
            f"size {min_size / MB:.6f} MB (every layer at its fewest allowed bits); "
            "raise the budget, add smaller bit widths or unpin layers"
        )
    return float(min_size)


def allocate_bits(
    omega: Sequence[Mapping[int, float]],
    num_params: Sequence[int],
    size_budget_bytes: float,
    macs: Sequence[int] | None = None,
    bops_budget: float | None = None,
    pinned: Mapping[int, int] | None = None,
    activation_bits: int = 8,
    bits_per_weight: Sequence[Mapping[int, float]] | None = None,
) -> BitAllocation:
    """Solve the bit-allocation ILP.

    Args:
        omega: Per layer, Omega_i(b) for each candidate bit width b (same keys for all).
        num_params: Weight entries per layer.
        size_budget_bytes: Largest allowed nominal weight size, bytes.
        macs: Multiply-accumulates per layer for one sample; needed for a BOPS budget.
        bops_budget: Largest allowed sum MACs_i * b_i * activation_bits, or None.
        pinned: Layer index -> fixed bit width (e.g. first and last layer at 8).
        activation_bits: Activation bit width used in BOPS.
        bits_per_weight: Per layer, the stored bits per weight of each candidate width,
            where they differ from the width (block scales); sizes use them.

    Raises:
        ValueError: on inconsistent inputs (lengths, a pinned width that is not a candidate,
            a BOPS budget without MACs).
        InfeasibleBudgetError: when no configuration fits; the message gives the
            smallest achievable size or BOPS.
    """
    pinned = dict(pinned or {})
    num_layers = len(omega)
    if num_layers == 0:
        raise ValueError("no layers to allocate bits to")
    if len(num_params) != num_layers:
        raise ValueError(f"{len(num_params)} parameter counts for {num_layers} layers")
    candidates = sorted(omega[0])
    if any(sorted(o) != candidates for o in omega):
        raise ValueError("every layer needs Omega for the same candidate bit widths")
    for index, b in pinned.items():
        if b not in candidates:
            raise ValueError(f"layer {index} is pinned to {b} bits, not one of {candidates}")
    if bits_per_weight is not None and len(bits_per_weight) != num_layers:
        raise ValueError(f"{len(bits_per_weight)} storage entries for {num_layers} layers")
    if bops_budget is not None and (macs is None or len(macs) != num_layers):
        raise ValueError("a BOPS budget needs the MACs of every layer")

    # Variables x[i, k] flattened row-major; allowed[i, k] is False where a pin forbids it.
    nb = len(candidates)
    allowed = np.ones((num_layers, nb), dtype=bool)
    for index, b in pinned.items():
        allowed[index] = [c == b for c in candidates]
    cost = np.array([[o[b] for b in candidates] for o in omega], dtype=np.float64)
    layer_storage = bits_per_weight or [{}] * num_layers
    stored = np.array([[s.get(b, b) for b in candidates] for s in layer_storage], dtype=np.float64)
    sizes = np.asarray(num_params, dtype=np.float64)[:, None] * stored / 8.0
    bops = (
        np.outer(np.asarray(macs, dtype=np.float64), candidates) * activation_bits
        if macs is not None
        else np.zeros_like(sizes)
    )

    # Check the budgets against their lower bounds first, for a useful message.
    # NOTE: 2-bit layers count 2 bits here but take 4 bits in the file (int4 storage).
    min_size = check_size_budget(num_params, candidates, size_budget_bytes, pinned, bits_per_weight)
    if bops_budget is not None:
        min_bops = float(np.where(allowed, bops, np.inf).min(axis=1).sum())
        if min_bops > bops_budget * (1 + 1e-9):
            raise InfeasibleBudgetError(
                f"BOPS budget {bops_budget:.4g} is below the smallest achievable {min_bops:.4g}; "
                "raise it or add smaller bit widths"
            )

    # Scale the objective so HiGHS's absolute tolerances do not round tiny Omegas to 0.
    scale = float(np.abs(cost).max()) or 1.0
    one_per_layer = np.kron(np.eye(num_layers), np.ones((1, nb)))
    rows = [one_per_layer, sizes.reshape(1, -1)]
    lower = [np.ones(num_layers), [-np.inf]]
    upper = [np.ones(num_layers), [size_budget_bytes]]
    if bops_budget is not None:
        rows.append(bops.reshape(1, -1))
        lower.append([-np.inf])
        upper.append([bops_budget])
    constraints = LinearConstraint(np.vstack(rows), np.concatenate(lower), np.concatenate(upper))
    result = milp(
        c=(cost / scale).ravel(),
        constraints=constraints,
        integrality=np.ones(cost.size),
        bounds=Bounds(np.zeros(cost.size), allowed.ravel().astype(float)),
    )
    if result.status != 0 or result.x is None:
        raise InfeasibleBudgetError(
            f"no bit configuration meets both budgets (solver: {result.message}); "
            f"the smallest achievable size is {min_size / MB:.6f} MB"
        )

    choice = np.round(result.x).reshape(num_layers, nb).argmax(axis=1)
    bits = [candidates[k] for k in choice]
    chosen = np.arange(num_layers), choice
    allocation = BitAllocation(
        bits=bits,
        size_bytes=float(sizes[chosen].sum()),
        bops=float(bops[chosen].sum()),
        total_omega=float(cost[chosen].sum()),
    )
    LOGGER.info(
        "bit allocation: %s, %.4f MB, objective %.4g",
        bits,
        allocation.size_bytes / MB,
        allocation.total_omega,
    )
    return allocation
