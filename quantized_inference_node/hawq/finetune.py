"""Quantization-aware fine-tuning of a chosen bit configuration (straight-through estimator).

Every weight and activation is fake-quantized in the forward pass; the gradient
taken at the quantized weights updates float "shadow" weights, whose quantized
values the next step uses. Layer blocks are unfrozen one at a time in HAWQ v1's
order, descending lambda_i * ||Q(W_i) - W_i||^2, so the layers the quantization
hurts most train longest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from .fake_quant import WeightClipping, fake_quantize_weight

LOGGER = logging.getLogger(__name__)


def finetune(
    weights: Sequence[torch.nn.Parameter],
    channel_axes: Sequence[int],
    bits: Sequence[int],
    order: Sequence[int],
    losses: Sequence[Callable[[], torch.Tensor]],
    epochs: int,
    lr: float,
    seed: int = 0,
    names: Sequence[str] | None = None,
    clipping: WeightClipping | str = WeightClipping.MAX_ABS,
    block_size: int | None = None,
) -> None:
    """Fine-tune the weights in place; on return they hold the float (shadow) values.

    Activation fake quantization must already be switched on in the model the loss
    closures run.

    Args:
        weights: The layers' weight parameters, which the loss closures read.
        channel_axes: Output-channel axis of each weight.
        bits: Weight bit width of each layer.
        order: Layer indices, most sensitive first; block k trains layers order[:k + 1].
        losses: One closure per batch returning that batch's loss at the current weights.
        epochs: Passes over the batches per block.
        lr: Adam learning rate.
        seed: Seed of torch's global generator during fine-tuning.
        names: Layer names for the log.
        clipping: How the weight scales are chosen (as in the analysis and export).
        block_size: Input channels per weight scale below 8 bits (None: per channel).

    Raises:
        ValueError: when the sequences differ in length, ORDER is not a permutation of
            the layers, or epochs or lr is not positive.
    """
    if not len(weights) == len(channel_axes) == len(bits):
        raise ValueError(
            f"{len(weights)} weights, {len(channel_axes)} axes and {len(bits)} bit widths must match"
        )
    if sorted(order) != list(range(len(weights))):
        raise ValueError(f"order {list(order)} must list each of the {len(weights)} layers once")
    if epochs < 1 or lr <= 0:
        raise ValueError(f"epochs must be >= 1 and lr > 0, got {epochs} and {lr}")
    torch.manual_seed(seed)
    shadows = [w.detach().clone() for w in weights]

    for position, layer_index in enumerate(order):
        # Unfreeze one more block, most sensitive first.
        active = list(order[: position + 1])
        trainable = [shadows[i].requires_grad_(True) for i in active]
        optimizer = torch.optim.Adam(trainable, lr=lr)

        for _ in range(epochs):
            for loss_fn in losses:
                with torch.no_grad():
                    for w, s, axis, b in zip(weights, shadows, channel_axes, bits, strict=True):
                        w.copy_(fake_quantize_weight(s, b, axis, clipping, block_size))
                grads = torch.autograd.grad(loss_fn(), [weights[i] for i in active])
                optimizer.zero_grad()
                for shadow, grad in zip(trainable, grads, strict=True):
                    shadow.grad = grad
                optimizer.step()
        LOGGER.info(
            "fine-tuned block %d/%d (layer %s)",
            position + 1,
            len(order),
            names[layer_index] if names else layer_index,
        )

    with torch.no_grad():
        for w, s in zip(weights, shadows, strict=True):
            w.copy_(s.detach())
