"""Admission by measured memory: how many MiB a device offers and how many a holder needs.

With `VRAMFLOW_ADMISSION=memory` the device's GPU slot counts MiB of the card (of host memory
on a CPU): the limit is the device's size less a margin, and a holder asks for what its model
needs, weights plus the KV cache and activations of the calls it may make. Holders whose needs
fit hold the device side by side; one that does not fit waits. The need is an estimate from the
model's parameters and its attention shape on first use, and the largest peak the process has
recorded for the model once it has run on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import psutil

from vramflow import gpu

MIB = 2**20
# Activations of a forward pass, per token in flight, in multiples of the hidden size (the MLP's
# intermediate and the attention scores dominate; generous for decoder-only models).
ACTIVATION_HIDDEN_MULTIPLE = 16
# Learned peaks are granted with this much room on top.
LEARNED_HEADROOM = 1.1


@dataclass(frozen=True)
class ModelShape:
    """What a model costs in memory: its weights, and per token of a call in flight."""

    weights_bytes: int
    bytes_per_token: int  # KV cache plus activations


def device_mib(device: str, override: int | None = None) -> int:
    """The device's memory in MiB: `override`, else NVML's total (CUDA), else the host's."""
    if override:
        return override
    total = gpu.nvml_snapshot(device).total_bytes
    if total is None:
        total = psutil.virtual_memory().total
    return total // MIB


def model_shape(model: Any) -> ModelShape:
    """Weights (parameters and buffers) and the bytes each token of a call holds."""
    tensors = [*model.parameters(), *model.buffers()]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    element = tensors[0].element_size() if tensors else 4
    config = model.config
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", heads) or heads)
    head_dim = int(getattr(config, "head_dim", 0) or (hidden // heads if hidden else 0))
    kv = 2 * layers * kv_heads * head_dim * element
    activations = ACTIVATION_HIDDEN_MULTIPLE * hidden * element
    return ModelShape(weights, kv + activations)


def need_mib(shape: ModelShape, tokens: int, learned_peak_bytes: int | None = None) -> int:
    """MiB to ask for: the estimate for `tokens` in flight, or the learned peak if larger."""
    estimate = shape.weights_bytes + shape.bytes_per_token * tokens
    if learned_peak_bytes:
        estimate = max(estimate, int(learned_peak_bytes * LEARNED_HEADROOM))
    return max(1, math.ceil(estimate / MIB))


def tokens_within(shape: ModelShape, granted_mib: int) -> int:
    """Tokens in flight a grant of `granted_mib` leaves room for, after the weights."""
    room = granted_mib * MIB - shape.weights_bytes
    return max(0, room // max(1, shape.bytes_per_token))
