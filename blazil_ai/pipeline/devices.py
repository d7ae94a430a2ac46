"""Torch devices of the pipeline: whether one exists on this host, and what a process has used of it."""

from __future__ import annotations

from blazil_ai.errors import ConfigError


def check_device(name: str, option: str = "--device") -> None:
    """Check the torch device exists on this host before any stage starts (imports torch)."""
    import torch

    kind, _, index = name.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {name}: no CUDA GPU is visible to torch on this host")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"{option} {name}: this host has {torch.cuda.device_count()} CUDA device(s)")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option} {name}: MPS is not available on this host")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ConfigError(f"{option} {name}: no XPU device is visible to torch on this host")


def memory_peaks(device: str) -> dict[str, float]:
    """This process's peak resident memory (MiB), and peak CUDA memory allocated on ``device`` if it is a GPU."""
    import torch

    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    out["peak_rss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        import resource
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda") and torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return out
