"""Helpers every benchmark shares and that import no more than torch: the device's name and a sync."""
from __future__ import annotations

import os
import platform

import torch


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model and logical core count."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU {model}, {os.cpu_count()} logical cores"


def sync(device: str) -> None:
    """Wait for the GPU (nothing on a CPU), so a timer reads finished work."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
