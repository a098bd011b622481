"""Weights on and off the device: moved in once the slot is held, out before it is released."""

from __future__ import annotations

from typing import Any

from vramflow import gpu, models, torch_thread


def bring_in(loaded: Any, device: str, torch_threads: int | None) -> float:
    """On the torch thread, holding the slot: torch's thread count, then the weights onto
    `device`. Returns the seconds the move took."""
    models.use_torch_threads(torch_threads)
    return models.move_model(loaded, device)


def take_off(loaded: Any, device: str) -> float:
    """Move the weights off `device` and hand its cached memory back to the driver (a garbage
    collection first); returns the seconds the move took."""
    seconds = torch_thread.run(models.move_model, loaded, "cpu")
    gpu.free_memory(device)
    return seconds
