"""Which torch device a device name means: ``auto`` is CUDA where torch sees it and the CPU
elsewhere; ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` mean themselves, where this torch build and
this machine have them. Any other name is refused before it reaches torch.
"""

from __future__ import annotations

import re

import torch

from blocks.errors import InputError

DEVICE_NAME = re.compile(r"(cpu|cuda|mps)(?::(\d{1,4}))?")


class DeviceError(InputError):
    """A device this process cannot use: an unknown name, or CUDA where torch sees none."""


def resolve_device(name: str, setting: str = "--device") -> torch.device:
    """The torch device ``name`` means; ``setting`` says where the name was given (for the error)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = DEVICE_NAME.fullmatch(name)
    if match is None or (match[1] == "cpu" and match[2] not in (None, "0")):
        raise DeviceError(f"{setting} {name[:40]!r} is not a device: use auto, cpu, cuda or cuda:N")
    kind, index = match[1], match[2]
    if kind == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise DeviceError(f"{setting} is {name!r} but this torch build has no CUDA support; use auto or cpu "
                              "(or install a CUDA build of torch)")
        if not torch.cuda.is_available():
            raise DeviceError(f"{setting} is {name!r} but torch sees no CUDA device; use auto or cpu")
        if index is not None and int(index) >= torch.cuda.device_count():
            raise DeviceError(f"{setting} is {name!r} but torch sees {torch.cuda.device_count()} CUDA device(s): "
                              f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{setting} is {name!r} but this machine has no MPS device; use auto or cpu")
    return torch.device(name)
