"""Check a ``device`` option before any work: a typo or a missing GPU is one clear error, not a traceback from
deep inside torch after the inputs were opened."""

from __future__ import annotations

import torch

from mergescale.errors import ConfigError

_KNOWN = "cpu, cuda, cuda:N or mps"


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`, after checking this machine has it.

    Raises:
        ConfigError: an unknown device type (``"tpu"``), or a device this machine lacks (``"cuda"`` without a
            usable CUDA GPU, ``"cuda:3"`` with one GPU, ``"mps"`` off Apple silicon).
    """
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device).strip())
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {str(device)!r}: unknown device type; use {_KNOWN}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            )
            raise ConfigError(f"device {str(device)!r}: CUDA is not available ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"device {str(device)!r}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})"
            )
        return dev
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available):
        raise ConfigError(f"device {str(device)!r}: mergescale cannot compute on it; use {_KNOWN}")
    if not is_available():
        raise ConfigError(f"device {str(device)!r}: not available on this machine; use --device cpu")
    return dev
