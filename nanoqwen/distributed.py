"""Devices and dtypes: `--device auto` picks CUDA, then Apple MPS, then CPU; dtype follows the device."""

from __future__ import annotations

import argparse

import torch

from nanoqwen.errors import NanoQwenError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def add_device_arguments(p: argparse.ArgumentParser, dtype_help: str = "default: bfloat16 on CUDA, else float32"
                         ) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help=dtype_help)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise NanoQwenError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NanoQwenError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise NanoQwenError("--device mps was asked for but Apple MPS is not available; use --device cpu or auto")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The named dtype, or the device's natural one: bf16 on CUDA (fp16 where bf16 is missing), else fp32."""
    if name is not None:
        dtype = DTYPES[name]
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise NanoQwenError("this GPU has no bfloat16; use --dtype float16 or float32")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
