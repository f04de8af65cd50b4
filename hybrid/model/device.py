"""Which torch device a device name means: ``auto`` is CUDA where torch sees it and the CPU
elsewhere; ``cpu``, ``cuda``, ``cuda:N`` (and any other name torch knows) mean themselves."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device this process cannot use: CUDA named where torch sees none."""


def resolve_device(name: str, setting: str = "--device") -> torch.device:
    """The torch device ``name`` means; ``setting`` says where the name was given (for the error)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"{setting} is {name!r} but torch sees no CUDA device; use auto or cpu")
    return torch.device(name)
