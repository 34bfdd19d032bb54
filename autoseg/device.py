"""Device questions in one place: which device (CUDA when present, else Apple MPS, else CPU; ``--device``
overrides), which AMP dtype, how many threads, and how much GPU memory the planner may budget for."""
from __future__ import annotations

import os

import torch

from autoseg.errors import ConfigurationError

DEVICE_CHOICES = ("auto", "cuda", "cpu", "mps")
# the planner's budget when no CUDA GPU is visible (planning on a CPU machine for a GPU elsewhere): nnU-Net's
# reference GPU size, the one its patch/batch heuristics were calibrated on (docs/planning.md)
DEFAULT_GPU_MEMORY_GB = 8.0


def choose_device(requested: str = "auto") -> torch.device:
    """Resolve ``auto|cuda|cpu|mps`` (``cuda:1`` too) to a torch.device, with a clear error if unavailable."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigurationError(
                "--device cuda was requested but PyTorch sees no CUDA GPU; install a CUDA build of torch "
                "(see README) or use --device cpu"
            )
        return torch.device(requested)
    if requested == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ConfigurationError("--device mps was requested but MPS is not available; use --device cpu")
        return torch.device("mps")
    if requested == "cpu":
        return torch.device("cpu")
    raise ConfigurationError(f"unknown device '{requested}'; use one of {', '.join(DEVICE_CHOICES)}")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for training/inference on ``device``, or None for full precision.

    bf16 where the GPU supports it (no loss scaling needed), fp16 on older GPUs; full precision on CPU/MPS.
    """
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_supports_bf16() -> bool:
    """Native bf16 convolutions/matmuls on this CPU (avx512_bf16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def inference_amp_dtype(device: torch.device, mixed_precision: bool = True) -> torch.dtype | None:
    """Autocast dtype for prediction: the training AMP dtype on CUDA, bf16 on CPUs with native bf16 (about
    2x faster sliding windows on such CPUs, measured in docs/benchmarks.md), else None (full precision)."""
    if not mixed_precision:
        return None
    if device.type == "cuda":
        return amp_dtype(device)
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return None


def configure_threads(num_threads: int | None = None) -> int:
    """Use all cores for intra-op parallelism on CPU (torch sometimes defaults to fewer in containers)."""
    if num_threads is None:
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, num_threads))
    return torch.get_num_threads()


def gpu_memory_budget(requested_gb: float | None = None) -> tuple[float, str]:
    """(GiB the planner may budget for, one line saying where the number came from).

    ``requested_gb`` (``--gpu-memory``) wins; else the total memory of CUDA device 0
    (``torch.cuda.get_device_properties(0).total_memory`` in GiB, the unit ``--gpu-memory`` is read in);
    else ``DEFAULT_GPU_MEMORY_GB``.
    """
    if requested_gb is not None:
        return float(requested_gb), f"GPU memory budget: {float(requested_gb):g} GB from --gpu-memory"
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        gigabytes = round(properties.total_memory / 2**30, 1)
        return gigabytes, f"GPU memory budget: {gigabytes:g} GB from {properties.name}; --gpu-memory overrides"
    return DEFAULT_GPU_MEMORY_GB, (
        f"GPU memory budget: {DEFAULT_GPU_MEMORY_GB:g} GB (the default: PyTorch sees no CUDA GPU); "
        "--gpu-memory overrides"
    )
