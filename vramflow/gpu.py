"""Devices, slot names, VRAM statistics (torch + NVML) and out-of-memory handling.

All pynvml calls live here; a figure NVML or torch cannot give becomes `None`, never a crash.
On a machine without CUDA the same code runs and reports device `cpu` with GPU fields `None`.
"""

from __future__ import annotations

import gc
import logging
import re
import socket
import threading
from dataclasses import dataclass

import torch

from vramflow.errors import ConfigError

log = logging.getLogger(__name__)

_OOM_PATTERNS = re.compile(
    r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED|"
    r"CUDNN_STATUS_NOT_ENOUGH_WORKSPACE|HIP out of memory",
    re.IGNORECASE,
)


def resolve_device(requested: str) -> str:
    """`auto` → `cuda:0` when CUDA is available, else `cpu`; validates explicit choices."""
    if requested == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if re.fullmatch(r"cuda(:\d+)?", requested):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {requested!r} asked for, but CUDA is not available here")
        return requested if ":" in requested else "cuda:0"
    raise ConfigError(f"unknown device {requested!r}: use auto, cpu or cuda:N")


def slot_name(template: str, device: str, host: str | None = None) -> str:
    """The Prefect concurrency limit guarding `device` on `host`, e.g. vramflow-gpu-box1-0."""
    host = host or socket.gethostname()
    index = device.split(":", 1)[1] if ":" in device else device
    name = template.format(host=host, device=index)
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", name).lower()


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/cuBLAS/cuDNN out-of-memory errors, and nothing else."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and bool(_OOM_PATTERNS.search(str(exc)))


def free_memory(device: str) -> None:
    """Drop unreachable tensors and hand cached blocks back to the driver (CUDA only: on a CPU
    there is nothing to hand back, and `gc.collect` costs about 0.3 s in a loaded process)."""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()


@dataclass
class MemorySnapshot:
    """Device-wide memory as NVML sees it (other processes included)."""

    used_bytes: int | None = None
    free_bytes: int | None = None
    total_bytes: int | None = None


_nvml_lock = threading.Lock()
_nvml_ready: bool | None = None


def _nvml_init() -> bool:
    global _nvml_ready
    with _nvml_lock:
        if _nvml_ready is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_ready = True
            except Exception as exc:  # no driver, no library, no permission: all mean "no NVML"
                log.debug("NVML unavailable: %s", exc)
                _nvml_ready = False
        return _nvml_ready


def nvml_snapshot(device: str) -> MemorySnapshot:
    """NVML memory of the physical GPU behind `device`; all None on CPU or without NVML."""
    if not device.startswith("cuda") or not _nvml_init():
        return MemorySnapshot()
    try:
        import pynvml

        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        uuid = getattr(props, "uuid", None)
        handle = (
            pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            if uuid is not None
            else pynvml.nvmlDeviceGetHandleByIndex(index)
        )
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return MemorySnapshot(int(info.used), int(info.free), int(info.total))
    except Exception as exc:
        log.debug("NVML read failed: %s", exc)
        return MemorySnapshot()


def reset_peaks(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def torch_peaks(device: str) -> tuple[int | None, int | None]:
    """(max allocated, max reserved) since the last reset; (None, None) on CPU."""
    if not device.startswith("cuda"):
        return None, None
    return int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.max_memory_reserved(device))
